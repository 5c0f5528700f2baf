"""Report sentence parsing (medseg.reports.parse): SUVmax, image number and side of PET/CT report
sentences, the drop rules, sentence splitting, the LLM-extractor hook, the CSV pass and
``medseg reports parse``. The phrasings are our own, written the way radiologists write."""

from __future__ import annotations

import csv
import functools
import io

import pytest
from conftest import run_main

from medseg.reports.parse import (
    REASONS,
    SentenceFacts,
    consensus,
    parse_reports,
    parse_sentence,
    read_table,
    split_sentences,
    table_csv,
)

K = ""  # kept: no reason
BG, NOIMG, NOSUV, PRIOR = "background reference", "no image number", "no SUV", "only prior SUV"
IMGS, SUVS, LOW = "several images", "several SUVs", "SUV below 2.5"

# (sentence, reason, suvmax, image, laterality)
CASES = [
    # --- SUV keyword spellings and what sits between keyword and number
    ("Hypermetabolic mass in the left thigh, SUVmax 7.9, image 31.", K, 7.9, 31, "left"),
    ("Right axillary node (SUV max 7.9) on image 31.", K, 7.9, 31, "right"),
    ("Left inguinal node, SUV-max: 12, image 31.", K, 12.0, 31, "left"),
    ("Max SUV = 7.9 on axial image 31.", K, 7.9, 31, ""),
    ("Max SUV 7.9 within a moderately FDG-avid tumor (axial 31).", K, 7.9, 31, ""),
    ("Soft tissue mass, SUV 5.1, transaxial #12.", K, 5.1, 12, ""),
    ("Maximum SUV of 6.4 in the sternum, image 88.", K, 6.4, 88, ""),
    ("Sternal lesion, SUV maximum 6.4, image 88.", K, 6.4, 88, ""),
    ("Sternal lesion with maxSUV 6.4 on image 88.", K, 6.4, 88, ""),
    ("Sternal lesion, SUV 6.4, image 88.", K, 6.4, 88, ""),
    ("SUVmax: 7.9 in a right hilar node on image 72.", K, 7.9, 72, "right"),
    ("Hilar node with an SUV of 7.9 on image 72.", K, 7.9, 72, ""),
    ("Hilar node, max SUV = 7.9, image 72.", K, 7.9, 72, ""),
    ("Pleural nodule with an SUV max of 12 on image 64.", K, 12.0, 64, ""),
    ("The SUV max is 5.3 in the liver dome lesion (image 101).", K, 5.3, 101, ""),
    ("Nodal conglomerate measuring SUV up to 9.1 on image 150.", K, 9.1, 150, ""),
    ("Uptake with SUV approximately 4.4 on image 99.", K, 4.4, 99, ""),
    ("Nodule with SUVmax measuring 3.6 on image 70.", K, 3.6, 70, ""),
    ("Mass (SUV max 7.9) in the left thigh, image 301.", K, 7.9, 301, "left"),
    ("Mass with SUV max of approximately 7.9 on image 301.", K, 7.9, 301, ""),
    ("Mass with SUVmax=7.9 on image 301.", K, 7.9, 301, ""),
    ("Mass with SUV max 7.9 g/mL on image 301.", K, 7.9, 301, ""),
    ("Mass with SUVmax 7.9g/ml on image 301.", K, 7.9, 301, ""),
    ("Mass with SUV(max) 7.9 on image 301.", K, 7.9, 301, ""),
    ("Mass with SUV_max 7.9 on image 301.", K, 7.9, 301, ""),
    ("Mass with SUV max. 7.9 on image 301.", K, 7.9, 301, ""),
    ("The SUV max on image 31 is 7.9.", K, 7.9, 31, ""),
    ("suv max 7.9 on image 31 in the right lobe", K, 7.9, 31, "right"),
    ("SUV max 2.5 on image 31.", K, 2.5, 31, ""),
    ("Peak SUV 5.2 in the right lobe, image 31.", K, 5.2, 31, "right"),
    ("T12 lesion SUV 5.1 on image 31 at 10:30 am, 40% smaller.", K, 5.1, 31, ""),
    # --- image number spellings
    ("Node on img 44 with SUV 5.0.", K, 5.0, 44, ""),
    ("Node on img. 44 with SUV 5.0.", K, 5.0, 44, ""),
    ("Node (im 44) with SUV 5.0.", K, 5.0, 44, ""),
    ("Node on slice 44 with SUV 5.0.", K, 5.0, 44, ""),
    ("Node on axial image 44 with SUV 5.0.", K, 5.0, 44, ""),
    ("Node on axial slice 44 with SUV 5.0.", K, 5.0, 44, ""),
    ("Node on transaxial PET image 44 with SUV 5.0.", K, 5.0, 44, ""),
    ("Node (series 4 image 112) with SUV 5.0.", K, 5.0, 112, ""),
    ("Node (series 4, image 112) with SUV 5.0.", K, 5.0, 112, ""),
    ("Node (se 4 im 112), SUV 5.0.", K, 5.0, 112, ""),
    ("Node with SUV 5.0 (4:112).", K, 5.0, 112, ""),
    ("Node with SUV 5.0, image 4/112.", K, 5.0, 112, ""),
    ("Node with SUV 5.0, image 4:112.", K, 5.0, 112, ""),
    ("Node on image #31 with SUV 5.0.", K, 5.0, 31, ""),
    ("Node on slice # 31 with SUV 5.0.", K, 5.0, 31, ""),
    ("Node on image number 31 with SUV 5.0.", K, 5.0, 31, ""),
    ("Node on image no. 31 with SUV 5.0.", K, 5.0, 31, ""),
    ("Node on image 112 of series 4 with SUV 5.0.", K, 5.0, 112, ""),
    ("Node seen on the 31st image with SUV 5.0.", K, 5.0, 31, ""),
    ("Node, slice location 218, SUV max 6.0.", K, 6.0, 218, ""),
    ("Node with SUV 5.0 on PET/CT axial slice 90.", K, 5.0, 90, ""),
    ("Image 31: left supraclavicular node, SUV 5.0.", K, 5.0, 31, "left"),
    ("Node on image 31 (also seen on image 31 of the CT), SUV 5.0.", K, 5.0, 31, ""),
    # --- several clauses, sizes, dates and times around the numbers
    (
        "For example the largest left axillary node is noted on slice 104 that measures 2.1 x 1.1 cm "
        "and shows SUV max of 5.5.",
        K,
        5.5,
        104,
        "left",
    ),
    ("A 3.2 x 2.1 cm node, SUV max 7.9, image 31.", K, 7.9, 31, ""),
    ("Node measuring 3.2 cm with SUV 7.9 on image 31.", K, 7.9, 31, ""),
    ("Compared to the PET/CT of 12/03/2019, the node (image 31) has SUV 7.9.", K, 7.9, 31, ""),
    ("Imaging at 60 minutes: node SUV 7.9 on image 31.", K, 7.9, 31, ""),
    ("Mass measuring 11.6 cm compared to 23 cm previously with an SUV max of 6.0 (slice 218).", K, 6.0, 218, ""),
    ("L1 vertebral body lesion with SUV 6.0 on image 140.", K, 6.0, 140, ""),
    # --- earlier values are not several SUVs: the current one is kept
    ("Node SUV max 7.9 (previously 5.1), image 31.", K, 7.9, 31, ""),
    ("Node SUVmax 7.9, prior SUV 4.2, image 31.", K, 7.9, 31, ""),
    ("Node SUV max increased to 7.9 from 6.0, image 31.", K, 7.9, 31, ""),
    ("Node SUV max increased from 6.0 to 7.9, image 31.", K, 7.9, 31, ""),
    ("Node SUV max 7.9 compared to 3.1 on the prior exam (image 31).", K, 7.9, 31, ""),
    ("Node SUV max 7.9, was 5.5, image 31.", K, 7.9, 31, ""),
    ("Node SUV 7.9 versus 5.5 on the prior, image 31.", K, 7.9, 31, ""),
    ("Node on slice 94 has SUV 3.3 today, SUV 6.3 on the prior exam.", K, 3.3, 94, ""),
    ("Node SUV max of 5.1 previously, now 7.9, image 31.", K, 7.9, 31, ""),
    ("Node (image 31) SUV 7.9, compared with baseline SUV 9.9.", K, 7.9, 31, ""),
    (
        "Currently SUV max is 3.3 on slice 94 compared to 6.3 on the prior PET/CT from October 28, 2015.",
        K,
        3.3,
        94,
        "",
    ),
    ("Previously SUV 5.1, image 31.", PRIOR, None, 31, ""),
    ("Node on image 31, prior SUV max 5.1.", PRIOR, None, 31, ""),
    # --- laterality
    ("R axillary node, SUV 4.4, image 70.", K, 4.4, 70, "right"),
    ("L inguinal node, SUV 4.4, image 170.", K, 4.4, 170, "left"),
    ("Bilateral hilar nodes, the largest with SUV 4.4 on image 70.", K, 4.4, 70, ""),
    ("Left tonsil (slice 57) SUV max 7.3 compared to 4.0 on the right.", K, 7.3, 57, ""),
    ("Upright positioning; bright uptake with SUV 4.4 on image 70.", K, 4.4, 70, ""),
    # --- drops: missing numbers
    ("No hypermetabolic lesions.", NOIMG, None, None, ""),
    ("Image quality is good.", NOIMG, None, None, ""),
    ("Images were acquired 60 minutes after injection of 10.2 mCi F-18 FDG.", NOIMG, None, None, ""),
    ("Hypermetabolic node in the left axilla, SUV 7.9.", NOIMG, 7.9, None, "left"),
    ("Node on series 3 with SUV 7.9.", NOIMG, 7.9, None, ""),
    ("Follow-up PET/CT dated 12/03/2019 with SUV 7.9.", NOIMG, 7.9, None, ""),
    ("A 3.2 x 2.1 cm node on image 31.", NOSUV, None, 31, ""),
    ("Node on image 31 measures 12 mm.", NOSUV, None, 31, ""),
    ("SUV-avid node on image 31.", NOSUV, None, 31, ""),
    ("Coronal image 45 shows a node with SUV 7.9.", NOIMG, 7.9, None, ""),
    ("Node on image 0 with SUV 5.0.", NOIMG, 5.0, None, ""),
    ("Node with SUL 5.1 on image 31.", NOSUV, None, 31, ""),  # not supported: SUL
    ("7.9 SUVmax in the node on image 31.", NOSUV, None, 31, ""),  # not supported: number before keyword
    # --- drops: several images or SUVs
    ("Nodes with SUV 7.9 on image 31 and 6.1 on image 40.", IMGS, 7.9, None, ""),  # 6.1: no keyword of its own
    ("Nodes on images 31-35 with SUV up to 7.9.", IMGS, 7.9, None, ""),
    ("Nodes on slices 88 and 92, SUV 5.0.", IMGS, 5.0, None, ""),
    ("Nodes on image 31 with SUVs of 7.9 and 6.1.", SUVS, None, 31, ""),
    ("Node on image 31 with SUV 7.9, another with SUV 6.1.", SUVS, None, 31, ""),
    ("Nodes on image 31 with SUV ranging from 3.1 to 5.4.", SUVS, None, 31, ""),
    ("Node on image 31 with SUV 3.1-5.4.", SUVS, None, 31, ""),
    ("Node on image 31 with SUV 7,9.", SUVS, None, 31, ""),  # not supported: decimal comma
    # --- drops: background templates and faint uptake
    ("Background liver SUVmean 2.1.", BG, 2.1, None, ""),
    ("Mediastinal blood pool SUV 1.8 (image 60).", BG, 1.8, 60, ""),
    ("Reference liver uptake SUV mean 2.3 on image 120.", BG, 2.3, 120, ""),
    ("Background activity in the liver: SUV 2.4 on image 120.", BG, 2.4, 120, ""),
    ("Node on image 31 with SUV 1.9.", LOW, 1.9, 31, ""),
    ("Right paratracheal node now SUV max of 1.5 (slice 95) compared to prior SUV max of 1.7.", LOW, 1.5, 95, "right"),
    ("Node with uptake above background, SUV 4.0 on image 31.", K, 4.0, 31, ""),
    ("", "empty", None, None, ""),
]


@pytest.mark.parametrize(("sentence", "reason", "suvmax", "image", "side"), CASES, ids=range(len(CASES)))
def test_sentence(sentence, reason, suvmax, image, side):
    facts = parse_sentence(sentence)
    assert (facts.reason, facts.suvmax, facts.image, facts.laterality) == (reason, suvmax, image, side), facts
    assert facts.keep == (reason == "")
    assert facts.reason == "" or facts.reason in REASONS


def test_enough_phrasings():
    assert len(CASES) >= 80


@pytest.mark.parametrize(
    ("sentence", "previous"),
    [
        ("Node SUV max 7.9 (previously 5.1 and 4.0), image 31.", (5.1, 4.0)),
        ("Node SUV max increased from 6.0 to 7.9, image 31.", (6.0,)),
        ("Node SUV 7.9, compared to an SUV max of 6.3 on the prior, image 31.", (6.3,)),
        ("Node SUV 7.9 on image 31.", ()),
    ],
)
def test_previous_values(sentence, previous):
    facts = parse_sentence(sentence)
    assert facts.keep and facts.suvmax == 7.9 and facts.previous_suv == previous


@pytest.mark.parametrize(
    ("sentence", "series"),
    [
        ("Node (series 4 image 112) SUV 5.0.", 4),
        ("Node (4:112) SUV 5.0.", 4),
        ("Node on image 4/112, SUV 5.0.", 4),
        ("Node on image 112 of series 6, SUV 5.0.", 6),
        ("Node on series 3, SUV 5.0.", 3),
        ("Node on image 112, SUV 5.0.", None),
    ],
)
def test_series(sentence, series):
    assert parse_sentence(sentence).series == series


def test_notes():
    assert "bilateral" in parse_sentence("Bilateral nodes, SUV 4.4, image 70.").notes
    assert "left and right" in parse_sentence("Left and right nodes, SUV 4.4, image 70.").notes
    mean = parse_sentence("Node SUVmax 7.9, SUVmean 4.1, image 31.")
    assert mean.keep and mean.suvmax == 7.9 and "SUVmean/SUVpeak ignored" in mean.notes


def test_facts_are_frozen():
    facts = parse_sentence("Node SUV 7.9 image 31.")
    with pytest.raises(AttributeError):
        facts.keep = False


# --- splitting -------------------------------------------------------------------------------------------
REPORT = """FINDINGS:
HEAD/NECK: No hypermetabolic lesions. Physiologic uptake in the brain.
CHEST: 1. Hypermetabolic right axillary node, SUV max 7.9 (image 31). It measures approx. 2.1 cm. in short axis.
2. Left hilar node, e.g. the largest, SUVmax 4.2 on img. 80, no. 3 of the list.
ABDOMEN: Liver lesion SUV 6.1 on image no. 120; splenic lesion SUV 5.0 on image 130; no ascites.
Background liver SUVmean 2.1; mediastinal blood pool SUV 1.8.
Node measuring 3.2 x 2.1 cm
with SUV 5.5 on image 140."""


def test_split_report():
    assert split_sentences(REPORT) == [
        "HEAD/NECK: No hypermetabolic lesions.",
        "Physiologic uptake in the brain.",
        "CHEST: Hypermetabolic right axillary node, SUV max 7.9 (image 31).",
        "It measures approx. 2.1 cm. in short axis.",
        "Left hilar node, e.g. the largest, SUVmax 4.2 on img. 80, no. 3 of the list.",
        "ABDOMEN: Liver lesion SUV 6.1 on image no. 120",
        "splenic lesion SUV 5.0 on image 130; no ascites.",
        "Background liver SUVmean 2.1; mediastinal blood pool SUV 1.8.",
        "Node measuring 3.2 x 2.1 cm with SUV 5.5 on image 140.",
    ]


@pytest.mark.parametrize(
    ("text", "sentences"),
    [
        ("SUV max 7.9 on image 31. Liver normal.", ["SUV max 7.9 on image 31.", "Liver normal."]),
        ("Node e.g. Left axilla SUV 7.9.", ["Node e.g. Left axilla SUV 7.9."]),
        ("Approx. Two nodes. Vs. Prior.", ["Approx. Two nodes.", "Vs. Prior."]),
        ("Node SUV 7.9 on image 31. 2. Liver normal.", ["Node SUV 7.9 on image 31.", "Liver normal."]),
        ("1. Node SUV 7.9.\n2. Liver normal.", ["Node SUV 7.9.", "Liver normal."]),
        ("- Node SUV 7.9\n- Liver normal", ["Node SUV 7.9", "Liver normal"]),
        ("Node SUV 7.9\nLiver normal", ["Node SUV 7.9", "Liver normal"]),
        ("Node SUV 7.9 on\nimage 31.", ["Node SUV 7.9 on image 31."]),
        ("Node SUV 7.9!  Is it new? Yes.", ["Node SUV 7.9!", "Is it new?", "Yes."]),
        ("Node SUV 7.9._x000D_Liver normal.", ["Node SUV 7.9.", "Liver normal."]),
        ("Node SUV 7.9.\r\n\r\nLiver normal.", ["Node SUV 7.9.", "Liver normal."]),
        ("Node on image 31 SUV 7.9; it is new.", ["Node on image 31 SUV 7.9; it is new."]),
        (
            "A: SUV 5 image 31; B: SUV 6 image 40; C: SUV 7 image 50",
            ["A: SUV 5 image 31", "B: SUV 6 image 40", "C: SUV 7 image 50"],
        ),
        ("   \n\n", []),
    ],
)
def test_split(text, sentences):
    assert split_sentences(text) == sentences


# --- the LLM hook ----------------------------------------------------------------------------------------
def _says(suvmax, image, keep=True, reason=""):
    return lambda sentence: SentenceFacts(keep=keep, reason=reason, suvmax=suvmax, image=image)


def test_extractor_supplies_the_numbers():
    facts = parse_sentence("Node SUV 7.9 on image 13.", extractor=_says(7.9, 31))
    assert facts.keep and (facts.suvmax, facts.image) == (7.9, 31)
    assert any("rules read" in n for n in facts.notes)


def test_extractor_keeps_the_text_rules():
    assert parse_sentence("Background liver SUV 2.1, image 80.", extractor=_says(2.1, 80)).reason == BG
    assert parse_sentence("Nodes on images 31 and 40, SUV 5.", extractor=_says(5.0, 31)).reason == IMGS
    assert parse_sentence("Node SUV 2.1 on image 31.", extractor=_says(2.1, 31)).reason == LOW
    assert parse_sentence("Node SUV 7.9 on image 31.", extractor=_says(7.9, None)).reason == NOIMG
    dropped = parse_sentence("Node SUV 7.9 on image 31.", extractor=_says(None, None, False, "no consensus"))
    assert dropped.reason == "no consensus" and not dropped.keep


def test_consensus():
    sentence = "Node SUV 7.9 on image 31."
    voted = consensus([_says(7.91, 31), _says(7.9, 31), _says(5.0, 13)], sentence)
    assert voted.keep and (voted.suvmax, voted.image) == (7.9, 31)
    split = consensus([_says(7.9, 31), _says(5.0, 31), _says(6.0, 31)], sentence)
    assert not split.keep and split.reason == "no consensus"
    hook = functools.partial(consensus, [_says(7.9, 31), _says(7.9, 31), _says(1.0, 1)])
    assert parse_sentence(sentence, extractor=hook).keep
    with pytest.raises(ValueError):
        consensus([], sentence)


# --- rows and CSV ----------------------------------------------------------------------------------------
def test_parse_reports_rows():
    rows = [
        {"id": "r1", "case": "c1", "sentence": "Node SUV 7.9 on image 31. Liver normal."},
        {"id": "r2", "case": "c2", "sentence": "Mass SUV 1.9 image 40"},
    ]
    out = parse_reports(rows)
    assert [r["id"] for r in out] == ["r1_s1", "r1_s2", "r2"]
    assert [r["case"] for r in out] == ["c1", "c1", "c2"]
    assert out[0] == {
        "id": "r1_s1",
        "case": "c1",
        "sentence": "Node SUV 7.9 on image 31.",
        "keep": True,
        "reason": "",
        "suvmax": 7.9,
        "image": 31,
        "laterality": "",
    }
    assert (out[1]["keep"], out[1]["reason"]) == (False, NOIMG)
    assert (out[2]["reason"], out[2]["suvmax"], out[2]["image"]) == (LOW, 1.9, 40)
    assert rows[0]["id"] == "r1"  # the input rows are not changed


def test_parse_reports_empty_text_and_collisions():
    out = parse_reports([{"id": "a", "sentence": ""}])
    assert out[0]["id"] == "a" and out[0]["reason"] == "empty"
    with pytest.raises(ValueError, match="a_s1"):
        parse_reports([{"id": "a", "sentence": "One. Two."}, {"id": "a_s1", "sentence": "Three."}])


def test_table_round_trip(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text('\ufeffid,sentence,note\nr1,"Node, SUV 7.9,\nimage 31.",x\n', encoding="utf-8")
    rows = read_table(path)
    assert rows == [{"id": "r1", "sentence": "Node, SUV 7.9,\nimage 31.", "note": "x"}]
    back = list(csv.DictReader(io.StringIO(table_csv(parse_reports(rows)))))
    assert back[0]["sentence"] == "Node, SUV 7.9, image 31." and back[0]["keep"] == "True"
    assert back[0]["suvmax"] == "7.9" and back[0]["image"] == "31" and back[0]["note"] == "x"


# --- the command line ------------------------------------------------------------------------------------
def _csv(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_cli_parse(tmp_path, monkeypatch, capsys):
    src = _csv(
        tmp_path / "in.csv",
        'id,sentence,case\nr1,"Node SUV 7.9 on image 31. Liver normal.",c1\nr2,Mass SUV 1.9 image 40,c2\n',
    )
    out = tmp_path / "out.csv"
    code, stdout, err = run_main(monkeypatch, capsys, "reports", "parse", src, "-o", out)
    assert code == 0, err
    assert "3 sentences from 2 rows: 1 kept, 2 dropped" in stdout and "SUV below 2.5: 1" in stdout
    assert len(stdout.strip().splitlines()) == 1
    rows = list(csv.DictReader(out.open()))
    assert [r["id"] for r in rows] == ["r1_s1", "r1_s2", "r2"]
    assert list(rows[0]) == ["id", "sentence", "case", "keep", "reason", "suvmax", "image", "laterality"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind

    code, _, err = run_main(monkeypatch, capsys, "reports", "parse", src, "-o", out)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    code, _, err = run_main(monkeypatch, capsys, "reports", "parse", src, "-o", out, "--overwrite")
    assert code == 0, err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("case,sentence\nc1,Node SUV 7.9 image 31\n", "has no 'id' column"),
        ("id,text\nr1,Node SUV 7.9 image 31\n", "has no 'sentence' column"),
        ("", "is empty"),
        ("id,sentence\n", "has a header but no rows"),
        ("id,sentence\nr1,One.\nr2,Two.\nr1,Three.\n", "repeats id 'r1' (lines 2 and 4)"),
        ("id,sentence\n,One.\n", "line 2 has an empty id"),
        ("id,sentence\nr1,One.,extra\n", "more fields than the header"),
        ("id,sentence\nr1,One. Two.\nr1_s1,Three.\n", "collide"),
    ],
)
def test_cli_errors_write_nothing(tmp_path, monkeypatch, capsys, text, message):
    src = _csv(tmp_path / "in.csv", text)
    out = tmp_path / "out.csv"
    code, stdout, err = run_main(monkeypatch, capsys, "reports", "parse", src, "-o", out)
    assert code == 2 and stdout == ""
    assert err.startswith("medseg: error: ") and str(src) in err and message in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]


def test_cli_not_utf8_and_missing(tmp_path, monkeypatch, capsys):
    src = tmp_path / "in.csv"
    src.write_bytes(b"id,sentence\nr1,caf\xe9 SUV 7.9\n")
    code, _, err = run_main(monkeypatch, capsys, "reports", "parse", src, "-o", tmp_path / "out.csv")
    assert code == 2 and "is not UTF-8 text" in err
    code, _, err = run_main(monkeypatch, capsys, "reports", "parse", tmp_path / "nope.csv", "-o", tmp_path / "o.csv")
    assert code == 2 and "nope.csv" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]
