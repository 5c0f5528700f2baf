"""PET/CT report sentences -> (SUVmax, image number, side): the first step of ConTEXTual Net 3D's weak
labels (Huemann et al. 2025, arXiv 2502.00528), where a sentence such as "hypermetabolic mass in the
left thigh, SUVmax 7.9, image 31" picks the lesion its label is grown from.

A sentence is kept only when it names exactly one image (slice) number and exactly one current SUV of
at least 2.5, and is not a background/reference template: an ambiguous sentence would put the label
on the wrong lesion, and dropping it costs one training example. Every drop has one short reason
(:data:`REASONS`). An **image number** is the 1-based axial image counted from the most superior
slice (as a viewer lists a head-first series); the SUV is the number as written (reports quote one
decimal). The rules and their phrasings are in docs/grounding.md; the patterns in
:mod:`medseg.reports.patterns`.

The paper voted over three local LLMs for the numbers; :func:`parse_sentence` takes such an
``extractor`` (any callable ``sentence -> SentenceFacts``) and :func:`consensus` majority-votes
several. medseg ships none and needs no LLM library.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from medseg.errors import MedsegError
from medseg.reports.patterns import find_images, find_series, find_suvs, is_background, laterality, mask

SUV_THRESHOLD = 2.5  # the paper's cut: fainter uptake does not give a reliable SUV-threshold label
REASONS = {
    "empty": "no text",
    "background reference": "quotes a background/reference uptake (liver, mediastinal blood pool)",
    "no image number": "names no axial image (slice) number",
    "no SUV": "names no SUV value",
    "only prior SUV": "its only SUV is an earlier exam's (previously, prior, from, compared to, was)",
    "several images": "names more than one image number (several lesions, or a range)",
    "several SUVs": "names more than one current SUV (several lesions, or a range)",
    f"SUV below {SUV_THRESHOLD}": f"its SUV is below {SUV_THRESHOLD}",
    "no consensus": "the extractors did not agree (a majority) on the SUV and image number",
}
_TEXT_RULES = ("empty", "background reference", "several images", "several SUVs")


@dataclass(frozen=True)
class SentenceFacts:
    """What one sentence says. ``suvmax``/``image`` are set whenever the sentence names exactly one
    (also on some dropped sentences, e.g. "SUV below 2.5"); ``previous_suv`` holds the values marked as
    earlier; ``notes`` explain choices (``"bilateral"``, ``"SUVmean/SUVpeak ignored"``)."""

    keep: bool
    reason: str  # "" when kept, else one of REASONS
    suvmax: float | None = None
    image: int | None = None
    laterality: str = ""  # "left" | "right" | ""
    series: int | None = None
    previous_suv: tuple[float, ...] = ()
    notes: tuple[str, ...] = ()


class Extractor(Protocol):
    """An optional second opinion on a sentence's numbers (e.g. a local LLM prompted for
    "slice" and "SUV"): returns SentenceFacts with at least ``suvmax`` and ``image`` filled in."""

    def __call__(self, sentence: str) -> SentenceFacts: ...


class ReportTableError(MedsegError):
    """A sentence table (CSV) lacks a column, is empty, or repeats an id."""


# --- one sentence ----------------------------------------------------------------------------------------
def extract(sentence: str) -> SentenceFacts:
    """The rule-based reading of ``sentence`` (what :func:`parse_sentence` returns without an extractor)."""
    masked = mask(sentence)
    images = find_images(masked)
    axial = [i for i in images if not i.plane and i.image >= 1]
    notes = ["non-axial or zero image ignored"] if len(axial) < len(images) else []
    suvs = find_suvs(masked, images)
    current = [s for s in suvs if not s.previous]
    chosen = [s for s in current if s.kind in ("max", "")] or current
    if len(chosen) < len(current):
        notes.append("SUVmean/SUVpeak ignored")
    elif chosen and chosen[0].kind in ("mean", "peak"):
        notes.append(f"SUV{chosen[0].kind} read as SUVmax")
    image_values = list(dict.fromkeys(i.image for i in axial))
    suv_values = list(dict.fromkeys(s.value for s in chosen))
    previous = tuple(s.value for s in suvs if s.previous)
    side, side_note = laterality(sentence)
    notes += [side_note] if side_note else []
    series = next((i.series for i in axial if i.series is not None), None)
    reason = _reason(sentence, image_values, suv_values, previous)
    return SentenceFacts(
        keep=not reason,
        reason=reason,
        suvmax=suv_values[0] if len(suv_values) == 1 else None,
        image=image_values[0] if len(image_values) == 1 else None,
        laterality=side,
        series=series if series is not None else find_series(masked),
        previous_suv=previous,
        notes=tuple(notes),
    )


def _reason(sentence: str, images: list[int], suvs: list[float], previous: tuple[float, ...]) -> str:
    """The first drop rule that applies ("" when none does); the order is documented in REASONS."""
    if not sentence.strip():
        return "empty"
    if is_background(sentence):
        return "background reference"
    if not images:
        return "no image number"
    if not suvs:
        return "only prior SUV" if previous else "no SUV"
    if len(images) > 1:
        return "several images"
    if len(suvs) > 1:
        return "several SUVs"
    return _threshold(suvs[0])


def _threshold(suv: float) -> str:
    return f"SUV below {SUV_THRESHOLD}" if suv < SUV_THRESHOLD else ""


def parse_sentence(sentence: str, extractor: Extractor | None = None) -> SentenceFacts:
    """Keep or drop ``sentence`` and say why, with its SUVmax, image number and side.

    With an ``extractor`` its ``suvmax``/``image`` (and side or series, when it gives them) replace
    the rules' numbers; the text rules (background template, several images or SUVs) and the SUV
    threshold still apply, as in the paper, where the regular expressions chose the sentences and
    the LLMs read the numbers. A disagreement with the rules is noted."""
    rules = extract(sentence)
    if extractor is None:
        return rules
    other = extractor(sentence)
    notes = list(rules.notes) + ["numbers from the extractor"]
    if (rules.suvmax, rules.image) != (other.suvmax, other.image) and rules.reason not in _TEXT_RULES:
        notes.append(f"rules read SUV {rules.suvmax}, image {rules.image}")
    if rules.reason in _TEXT_RULES:
        reason = rules.reason
    elif not other.keep and other.reason:
        reason = other.reason
    elif other.image is None:
        reason = "no image number"
    elif other.suvmax is None:
        reason = "no SUV"
    else:
        reason = _threshold(other.suvmax)
    return replace(
        rules,
        keep=not reason,
        reason=reason,
        suvmax=other.suvmax,
        image=other.image,
        laterality=other.laterality or rules.laterality,
        series=other.series if other.series is not None else rules.series,
        notes=tuple(notes),
    )


_UNDECIDED = object()


def _majority(values: list, need: int):
    """The value at least ``need`` voters gave (None is a vote too), else ``_UNDECIDED``."""
    value, count = Counter(values).most_common(1)[0]
    return value if count >= need else _UNDECIDED


def consensus(extractors: Sequence[Extractor], sentence: str) -> SentenceFacts:
    """Majority vote of ``extractors`` on the SUVmax (compared at one decimal, as reports quote it)
    and, separately, the image number: more than half must agree on each, else the sentence is
    dropped as "no consensus". The paper voted so over three local LLMs. Use it as an extractor:
    ``parse_sentence(s, extractor=functools.partial(consensus, [llm_a, llm_b, llm_c]))``."""
    if not extractors:
        raise ValueError("consensus needs at least one extractor")
    votes = [extract_one(sentence) for extract_one in extractors]
    need = len(votes) // 2 + 1
    suv = _majority([None if v.suvmax is None else round(v.suvmax, 1) for v in votes], need)
    image = _majority([v.image for v in votes], need)
    side = _majority([v.laterality for v in votes], need)
    tally = f"{len(votes)} votes, {need} needed"
    if suv is _UNDECIDED or image is _UNDECIDED:
        return SentenceFacts(keep=False, reason="no consensus", notes=(tally,))
    reason = "no image number" if image is None else "no SUV" if suv is None else ""
    side = "" if side is _UNDECIDED else side
    return SentenceFacts(keep=not reason, reason=reason, suvmax=suv, image=image, laterality=side, notes=(tally,))


# --- whole reports ---------------------------------------------------------------------------------------
_HEADER = re.compile(r"^[A-Z][A-Za-z0-9 /&,()-]{0,40}:$")  # "FINDINGS:", "Chest:" on a line of its own
_ENUM = re.compile(r"^(?:\d{1,2}[.)]|\(\d{1,2}\)|[-*•])\s+")
_ENUM_END = re.compile(r"(?:^|:)\s*\d{1,2}\.$")  # "2." or "CHEST: 1.": a marker, not a sentence end
_HEADER_ENUM = re.compile(r"^([A-Z][\w /&-]{0,40}:)\s*(?:\d{1,2}[.)]|\(\d{1,2}\))\s+")  # "CHEST: 1. Node"
_END = re.compile(r"[.!?]+(?=\s|$)")
_NEXT = re.compile(r"\s*(\S?)")
_NEXT_ENUM = re.compile(r"\s*\d{1,2}[.)]\s")  # an inline enumeration: "... image 31. 2. Liver ..."
_LAST_WORD = re.compile(r"([A-Za-z][A-Za-z.]*)$")
# words whose period never ends a sentence, even before a capital ("e.g. Left axilla", "approx. Two")
_ABBREVIATIONS = frozenset(
    "e.g i.e approx appr vs no nos img im fig figs dr mr mrs ms st ca cf incl resp ser se lt rt sr jr pt est".split()
)


def split_sentences(text: str) -> list[str]:
    """Split a whole report into sentences (docs/grounding.md, "Splitting").

    * Lines: a blank line, a bullet or an enumeration ("1.", "2)", "-") at a line start, or a line
      that starts with a capital, begins a new item; a line that starts in lower case, with a digit or
      a bracket continues the previous one (hard-wrapped text). Header-only lines ("FINDINGS:") go.
    * Periods, "!" and "?" end a sentence only before white space and a capital letter (or an
      inline enumeration "2. "): so never inside numbers ("7.9"), before digits ("approx. 3 cm",
      "no. 31", "img. 31"), before lower case ("3.2 cm. in the ..."); never after the abbreviations
      in ``_ABBREVIATIONS`` ("e.g.", "approx.", "vs.") or a single letter; an enumeration marker
      alone ("2.", "CHEST: 1.") is not a sentence, and is removed from the start of one.
    * Semicolons split a sentence only when at least two of its parts each name an image number and
      a current SUV (separate findings); parts without their own numbers stay with the one before.
    """
    text = text.replace("_x000D_", "\n").replace("\r\n", "\n").replace("\r", "\n")
    out = []
    for item in _items(text):
        for sentence in _split_periods(item):
            out += _split_semicolons(_HEADER_ENUM.sub(r"\1 ", _ENUM.sub("", sentence)).strip())
    return [s for s in out if s]


def _continues(line: str) -> bool:
    """A hard-wrapped line: it starts in lower case, with a bracket or comma, or a digit that is no
    enumeration ("3.2 cm node" continues, "2. Liver" does not)."""
    return bool(line) and (line[0].islower() or line[0] in "(," or (line[0].isdigit() and not _ENUM.match(line)))


def _items(text: str) -> list[str]:
    items: list[str] = []
    current = ""
    for raw in text.split("\n"):
        line = " ".join(raw.split())
        if current and _continues(line):
            current += " " + line
            continue
        if current:
            items.append(current)
        current = "" if not line or _HEADER.match(line) else line
    return items + [current] if current else items


def _split_periods(item: str) -> list[str]:
    pieces, start = [], 0
    for m in _END.finditer(item):
        after = _NEXT.match(item, m.end()).group(1)
        if after and not (after.isupper() or _NEXT_ENUM.match(item, m.end())):
            continue
        word = _LAST_WORD.search(item[max(start, m.start() - 12) : m.start()])  # a short window: linear time
        if after and word and (word.group(1).lower().rstrip(".") in _ABBREVIATIONS or len(word.group(1)) == 1):
            continue
        if _is_marker(item, start, m.end()):
            continue
        pieces.append(item[start : m.end()].strip())
        start = m.end()
    rest = item[start:].strip()
    return pieces + [rest] if rest else pieces


def _is_marker(item: str, start: int, end: int) -> bool:
    """Whether the period at ``end`` closes an enumeration marker ("2.", "CHEST: 1."), not a sentence."""
    if end - start <= 6:
        return bool(_ENUM_END.search(item[start:end].strip()))
    return bool(re.search(r":\s*\d{1,2}\.$", item[end - 6 : end]))


def _has_finding(part: str) -> bool:
    facts = extract(part)
    return facts.image is not None and facts.suvmax is not None


def _split_semicolons(sentence: str) -> list[str]:
    parts = [p.strip() for p in sentence.split(";") if p.strip()]
    findings = [_has_finding(p) for p in parts]
    if sum(findings) < 2:
        return [sentence]
    groups: list[list[str]] = []
    has: list[bool] = []
    for part, finding in zip(parts, findings):
        if groups and not (finding and has[-1]):
            groups[-1].append(part)
            has[-1] = has[-1] or finding
        else:
            groups.append([part])
            has.append(finding)
    return ["; ".join(g) for g in groups]


def parse_reports(rows: list[dict], extractor: Extractor | None = None) -> list[dict]:
    """One output row per sentence of each input row's ``sentence`` (a whole report or one sentence):
    its other columns passed through, ``id`` suffixed ``_s1``, ``_s2``, ... when the text holds several
    sentences, and ``sentence``, ``keep``, ``reason``, ``suvmax``, ``image``, ``laterality`` set.
    ValueError when the suffixed ids collide with other rows' ids."""
    out = []
    for row in rows:
        sentences = split_sentences(str(row.get("sentence") or "")) or [""]
        for k, sentence in enumerate(sentences, 1):
            facts = parse_sentence(sentence, extractor)
            new = dict(row)
            new["id"] = f"{row['id']}_s{k}" if len(sentences) > 1 else row["id"]
            new.update(sentence=sentence, keep=facts.keep, reason=facts.reason, suvmax=facts.suvmax)
            new.update(image=facts.image, laterality=facts.laterality)
            out.append(new)
    repeated = [i for i, n in Counter(r["id"] for r in out).items() if n > 1]
    if repeated:
        raise ValueError(f"sentence ids collide with other rows' ids: {', '.join(map(str, repeated[:3]))}")
    return out


# --- CSV -------------------------------------------------------------------------------------------------
def read_table(path: str | Path) -> list[dict[str, str]]:
    """The rows of a sentence CSV (UTF-8, header row; ``id`` and ``sentence`` columns required, ids
    unique and non-empty); ReportTableError naming the file otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ReportTableError(path, "is not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip() for h in reader.fieldnames or []]
    if not any(header):
        raise ReportTableError(path, "is empty (expected a header row with id and sentence columns)")
    reader.fieldnames = header
    _check_header(path, header)
    rows, lines = [], {}
    for row in reader:
        _check_row(path, row, reader.line_num, lines)
        rows.append(row)
    if not rows:
        raise ReportTableError(path, "has a header but no rows")
    return rows


def _check_header(path: Path, header: list[str]) -> None:
    for column in ("id", "sentence"):
        if column not in header:
            raise ReportTableError(path, f"has no '{column}' column (columns: {', '.join(header)})")
    repeated = [h for h, n in Counter(header).items() if n > 1]
    if repeated:
        raise ReportTableError(path, f"names column '{repeated[0]}' twice")


def _check_row(path: Path, row: dict, line: int, lines: dict[str, int]) -> None:
    if None in row:
        raise ReportTableError(path, f"line {line} has more fields than the header")
    key = (row.get("id") or "").strip()
    if not key:
        raise ReportTableError(path, f"line {line} has an empty id")
    if key in lines:
        raise ReportTableError(path, f"repeats id '{key}' (lines {lines[key]} and {line})")
    lines[key] = line
    row["id"] = key


def table_csv(rows: list[dict]) -> str:
    """``rows`` as CSV text: columns in first-seen order, None as an empty field."""
    columns = list(dict.fromkeys(c for r in rows for c in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: "" if r.get(c) is None else r[c] for c in columns})
    return buf.getvalue()


def summary(rows_in: int, out: list[dict]) -> str:
    """One line: sentences in, kept, dropped by reason."""
    dropped = Counter(r["reason"] for r in out if not r["keep"])
    kept = len(out) - sum(dropped.values())
    reasons = ", ".join(f"{reason}: {n}" for reason, n in dropped.most_common())
    tail = f" ({reasons})" if reasons else ""
    return f"{len(out)} sentences from {rows_in} rows: {kept} kept, {sum(dropped.values())} dropped{tail}"
