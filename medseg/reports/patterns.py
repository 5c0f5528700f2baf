"""How PET/CT reports write SUVs, image numbers and sides: the regular expressions behind
:mod:`medseg.reports.parse`, and the functions that find each mention with its position.

Everything works on a *masked* copy of the sentence (:func:`mask`): dates, times, sizes and numbers
with units (``12/03/2019``, ``3.2 x 2.1 cm``, ``60 minutes``) are overwritten with NUL characters of
the same length, so they can never be read as an SUV or an image number and every position still
points into the original sentence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

I = re.IGNORECASE  # noqa: E741
NUM = r"\d+(?:\.\d+)?"
MASK = "\x00"

# --- masks: numbers that are never SUVs or image numbers -------------------------------------------------
_UNIT = (
    r"(?:cm|mm|cc|ml|mls|mci|mbq|kbq|gbq|mg/dl|mmol/l|mg|kg|lbs?|hu|min|mins|minutes?|hrs?|hours?|sec|seconds?"
    r"|days?|weeks?|wks?|months?|mos?|years?|yrs?|year-old|o'clock)"
)
_MASKS = [
    re.compile(r"\b\d{1,4}([/.-])\d{1,2}\1\d{2,4}\b"),  # 12/03/2019, 2019-03-12, 12.03.2019
    re.compile(r"\b\d{1,2}/(?:19|20)\d{2}\b"),  # 03/2019
    re.compile(r"\b\d{1,2}:\d{2}\s*(?:[ap]\.?m\b\.?)", I),  # 10:30 am
    re.compile(r"(?:\bat|@)\s*\d{1,2}:\d{2}\b", I),  # at 10:30
    re.compile(rf"{NUM}(?:\s*(?:x|×|by)\s*{NUM})+(?:\s*{_UNIT}(?![\w/]))?", I),  # 3.2 x 2.1 cm
    re.compile(rf"{NUM}\s*(?:{_UNIT}(?![\w/])|%)", I),  # 60 minutes, 1.2 cm, 40%
    re.compile(r"\b[A-Za-z]-?\d+\b"),  # F-18, L1, T12, C7: isotopes and vertebrae
]


def mask(text: str) -> str:
    """``text`` with dates, times, sizes and other numbers with units overwritten (same length)."""
    for pattern in _MASKS:
        text = pattern.sub(lambda m: MASK * len(m.group(0)), text)
    return text


# --- image (slice) numbers -----------------------------------------------------------------------------
_PLANE = r"(?:(?P<plane>coronal|sagittal|mip)\s+)?"
_IMG_WORD = r"(?:(?:axial|transaxial|transverse|fused|pet(?:/ct)?|ct)\s+)*(?:images?|imgs?|im|slices?)\b\.?"
IMG_KW = rf"\b{_PLANE}{_IMG_WORD}"
_IMG_FILL = r"(?:\s|[#:=(]|\b(?:number|num|nos?|nr|location|position|level)\b\.?)*"
_SERIES_WORD = r"\b(?:series|ser|se)\b\.?\s*(?:number\s*|no\.?\s*|#\s*)?"
_AFTER_OK = (
    r"(?=\s*(?:$|[),.;:(\]\x00]|(?:and|or|on|in|of|at|with|respectively|series|image|slice|suv|previously|prior"
    r"|today|now|compared|versus|vs|from|to|g/ml|which|where|that|measur\w*)\b))"
)
_IMAGE_PATTERNS = [
    # series 4 image 112, series 4, image 112, se 4 im 112
    re.compile(
        rf"{_SERIES_WORD}(?P<series>\d{{1,3}})(?:\s*[,;/])?\s*(?:and\s+)?{IMG_KW}{_IMG_FILL}(?P<image>\d{{1,4}})", I
    ),
    # image 4/112, image 4:112 (series, then image)
    re.compile(rf"{IMG_KW}{_IMG_FILL}(?P<series>\d{{1,3}})\s*[/:]\s*(?P<image>\d{{1,4}})(?![\d/:]|\.\d)", I),
    # image 112 (of series 4)
    re.compile(
        rf"{IMG_KW}{_IMG_FILL}(?P<image>\d{{1,4}})(?!\d|\.\d)(?:(?:\s*,)?(?:\s*(?:of|on|in|from))?(?:\s*the)?\s*"
        rf"{_SERIES_WORD}(?P<series>\d{{1,3}})\b)?",
        I,
    ),
    re.compile(r"\(\s*(?P<series>\d{1,3})\s*:\s*(?P<image>\d{1,4})\s*\)"),  # (4:112)
    re.compile(rf"\b(?P<image>\d{{1,4}})(?:st|nd|rd|th)\s+{_PLANE}{_IMG_WORD}", I),  # 31st image
    re.compile(r"\b(?:trans)?axial\s*#?\s*(?P<image>\d{1,4})(?![\d/:]|\.\d)", I),  # (axial 31)
]
_IMAGE_MORE = re.compile(
    rf"\s*(?:-|–|to|through|thru|and|or|,|&)\s*(?:{_IMG_WORD}{_IMG_FILL})?(?:\d{{1,3}}\s*[/:]\s*)?"
    rf"(?P<image>\d{{1,4}})(?!\d|\.\d){_AFTER_OK}",
    I,
)
SERIES_ALONE = re.compile(r"\b(?:series|ser)\b\.?\s*(?:number\s*|no\.?\s*|#\s*)?(?P<series>\d{1,3})\b", I)


@dataclass(frozen=True)
class ImageMention:
    """One image number in a sentence; ``plane`` is ``"coronal"``/``"sagittal"``/``"mip"`` for a
    non-axial one (which is not a slice index and is not used)."""

    image: int
    series: int | None
    start: int  # the span of the whole mention ("series 4 image 112"), not only the number
    end: int
    plane: str = ""


def find_images(masked: str) -> list[ImageMention]:
    """Every image number in ``masked`` (the output of :func:`mask`), ranges and lists
    (``images 31-35``, ``slices 88 and 92``) as one mention per number."""
    found: list[ImageMention] = []
    taken = [False] * len(masked)
    for pattern in _IMAGE_PATTERNS:
        for m in pattern.finditer(masked):
            if any(taken[m.start() : m.end()]):
                continue
            groups = m.groupdict()
            series = int(groups["series"]) if groups.get("series") else None
            plane = (groups.get("plane") or "").lower()
            found.append(ImageMention(int(m.group("image")), series, m.start(), m.end(), plane))
            end = m.end()
            while more := _IMAGE_MORE.match(masked, end):
                found.append(ImageMention(int(more.group("image")), series, more.start(), more.end(), plane))
                end = more.end()
            taken[m.start() : end] = [True] * (end - m.start())
    return sorted(found, key=lambda x: x.start)


def find_series(masked: str) -> int | None:
    """A series number named without an image (``series 3``), or None."""
    m = SERIES_ALONE.search(masked)
    return int(m.group("series")) if m else None


# --- SUV values ----------------------------------------------------------------------------------------
_KIND = r"max(?:imum|imal)?|peak|mean|avg|average"
SUV_KW = re.compile(
    rf"\b(?P<pre>{_KIND})\.?[\s-]*SUVs?\b|\bSUVs?(?:[\s_-]*(?:\(\s*)?(?P<post>{_KIND})(?:\s*\))?(?!\w)\.?)?(?![a-z])", I
)
_PREV_WORDS = r"prior|previous(?:ly)?|earlier|last|baseline|formerly|initial(?:ly)?|original(?:ly)?"
_SUV_FILL = re.compile(
    r"(?:\s+|[(:=,~<>]|\b(?:of|is|was|were|are|measuring|measures|measured|up\s+to|approximately|approx\.?|about"
    r"|around|roughly|nearly|value|values|reaching|now|currently|today|increased|decreased|to|from|ranging|range"
    r"|between|greater\s+than|less\s+than|the|an?|" + _PREV_WORDS + r")(?!\w)"
    r"|\b(?:on|at|in)\s+(?:the\s+)?(?:" + _PREV_WORDS + r")(?:\s+(?:study|exam|examination|scan|pet(?:/ct)?|ct))?\b"
    r"|\b(?:on|at|in)\s+" + IMG_KW + r"\s*#?\s*\d{1,4}\b)*",
    I,
)
_NUMBER = re.compile(rf"(?<![\d.]){NUM}(?!\d)")
_PREV_BEFORE_KW = re.compile(
    rf"(?:\b(?:{_PREV_WORDS}|from|versus)|\bvs\.?|\bcompared\s+(?:to|with))\s+"
    r"(?:(?:an?|the|its|study|exam|examination|scan|pet(?:/ct)?|ct)\s+)*$",
    I,
)
_PREV_AFTER = re.compile(
    r"(?:\s*g/ml\b)?(?:\s*,)?\s*(?:previously\b(?![\s:=,]*\d)|(?:on|in|at|from|during)\s+(?:the\s+)?"
    r"(?:prior|previous|preceding|earlier|last|baseline|old)\b|\(\s*(?:prior|previous(?:ly)?|baseline)\s*\))",
    I,
)
_FROM = re.compile(r"\bfrom\b", I)
_RANGE = re.compile(r"\b(?:rang\w*|between)\b", I)
_PREV_IN_FILL = re.compile(rf"\b(?:{_PREV_WORDS})\b", I)
_BARE_PREV = re.compile(
    r"(?:\b(?:previously|previous|prior|formerly|initially|from|was|were|versus|baseline|before|earlier)|\bvs\.?"
    r"|\bcompared\s+(?:to|with))\s*(?:[:=(,]\s*|(?:an?|the|of|approximately|approx\.?|about|around|roughly)\s+)*$",
    I,
)
_BARE_NOW = re.compile(
    r"\b(?:now|currently|today|presently)\s*(?:[:=(,]\s*|(?:is|of|at|measures|measuring|measured|approximately"
    r"|about)\s+)*$",
    I,
)
_SUV_MORE = re.compile(r"(?:\s*g/ml\b)?\s*(?P<join>,|/|and|or|to|-|–|&)\s*(?:and\s+)?$", I)
_AFTER_OK_RE = re.compile(_AFTER_OK, I)
_MAX_FILL = 40  # characters between an SUV keyword and its number (beyond: not its value)
SUV_LIMIT = 100.0  # larger numbers are not SUVs (image numbers, years)


@dataclass(frozen=True)
class SuvMention:
    """One SUV value: ``kind`` ``"max"``, ``"peak"``, ``"mean"`` or ``""`` (plain "SUV"); ``previous``
    when the report marks it as an earlier exam's (or the other side's) value; ``bound`` when it
    follows its own SUV keyword rather than a bare marker (``previously 5.1``)."""

    value: float
    start: int
    end: int
    kind: str
    previous: bool
    bound: bool = True


def _kind(m: re.Match) -> str:
    word = (m.group("pre") or m.group("post") or "").lower()
    return "max" if word.startswith("max") else "mean" if word in ("avg", "average") else word


def _keyword_mentions(masked: str) -> list[SuvMention]:
    found = []
    for kw in SUV_KW.finditer(masked):
        fill = _SUV_FILL.match(masked, kw.end())
        num = _NUMBER.match(masked, fill.end())
        if num is None or fill.end() - kw.end() > _MAX_FILL:
            continue
        text = fill.group(0)
        from_prev = bool(_FROM.search(text)) and not _RANGE.search(text)
        previous = (
            from_prev
            or bool(_PREV_IN_FILL.search(text))
            or bool(_PREV_BEFORE_KW.search(masked[max(0, kw.start() - 80) : kw.start()]))
            or bool(_PREV_AFTER.match(masked, num.end()))
        )
        found.append(SuvMention(float(num.group(0)), num.start(), num.end(), _kind(kw), previous))
        found += _continued(masked, found[-1], from_prev)
    return found


def _continued(masked: str, first: SuvMention, from_prev: bool) -> list[SuvMention]:
    """The values listed after ``first`` (``SUVs 7.9 and 6.1``, ``from 4.2 to 7.9``): same kind and
    tense, except that ``to`` after a ``from`` value is the current one."""
    more, last = [], first
    for num in _NUMBER.finditer(masked, first.end):
        join = _SUV_MORE.match(masked[last.end : num.start()])
        if join is None or not _AFTER_OK_RE.match(masked, num.end()):
            break
        current = from_prev and join.group("join").lower() == "to"
        previous = (last.previous and not current) or bool(_PREV_AFTER.match(masked, num.end()))
        last = SuvMention(float(num.group(0)), num.start(), num.end(), first.kind, previous, first.bound)
        more.append(last)
        from_prev = from_prev and not current
    return more


def find_suvs(masked: str, images: list[ImageMention]) -> list[SuvMention]:
    """Every SUV value in ``masked``: those after an SUV keyword, then, in a sentence that names an
    SUV at all, bare values after ``previously``/``was``/``from``/``compared to`` (earlier) or
    ``now``/``today`` (current). Numbers that are image numbers are skipped."""

    def in_image(pos: int) -> bool:
        return any(i.start <= pos < i.end for i in images)

    found = [s for s in _keyword_mentions(masked) if not in_image(s.start) and s.value <= SUV_LIMIT]
    if not SUV_KW.search(masked):
        return found
    claimed = {s.start for s in found}
    for num in _NUMBER.finditer(masked):
        if num.start() in claimed or in_image(num.start()):
            continue
        left = masked[max(0, num.start() - 60) : num.start()]
        prev, now = _BARE_PREV.search(left), _BARE_NOW.search(left)
        if not (prev or now) or not _AFTER_OK_RE.match(masked, num.end()) or float(num.group(0)) > SUV_LIMIT:
            continue
        from_prev = bool(prev and re.match(r"from\b", prev.group(0), I))
        bare = SuvMention(float(num.group(0)), num.start(), num.end(), "", bool(prev) and not now, bound=False)
        found.append(bare)
        for more in _continued(masked, bare, from_prev):
            if more.start not in claimed and not in_image(more.start):
                found.append(more)
                claimed.add(more.start)
    return sorted(found, key=lambda s: s.start)


# --- background / reference templates and laterality ---------------------------------------------------
_BACKGROUND = re.compile(
    r"\bbackground\b(?:\s+\w+){0,3}?\s+(?:liver|hepatic|mediastin\w*|blood|activity|uptake|suv\w*|reference)\b"
    r"|(?<!above )(?<!over )(?<!than )(?<!to )(?<!the )\bbackground\b"
    r"|\b(?:liver|hepatic|mediastin\w*)\s+(?:background|reference)\b"
    r"|\bblood[- ]?pool\b|\breference\b|\bnormal\s+liver\b"
    r"|\bliver\b(?:\s+\w+){0,2}?\s+(?:suv\s*-?\s*mean|mean\s+suv)",
    I,
)
# "L"/"R" count as sides only as capital words before a lower-case anatomical word ("R axillary node")
_LEFT = re.compile(r"\b(?i:left)\b|(?<![\w/])L\b\.?(?=\s+[a-z]{3,})")
_RIGHT = re.compile(r"\b(?i:right)\b|(?<![\w/])R\b\.?(?=\s+[a-z]{3,})")
_BILATERAL = re.compile(r"\bbilateral(?:ly)?\b", I)


def is_background(text: str) -> bool:
    """Whether ``text`` quotes a background/reference uptake (liver, mediastinal blood pool):
    a template line of the report, not a lesion. "Above background" alone does not count."""
    return bool(_BACKGROUND.search(text))


def laterality(text: str) -> tuple[str, str]:
    """(``"left"``/``"right"``/``""``, a note): empty with a note for bilateral or both sides."""
    if _BILATERAL.search(text):
        return "", "bilateral"
    left, right = bool(_LEFT.search(text)), bool(_RIGHT.search(text))
    if left and right:
        return "", "left and right"
    return ("left" if left else "right" if right else ""), ""
