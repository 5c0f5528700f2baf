"""The generated report sentences (medseg/reports/generate.py) and ``medseg reports generate``: seeded,
labelled as generated, every sentence carrying its lesion's SUVmax (one decimal) and image number,
in many phrasings; facts from the real sts_fdg_petct crops."""

from __future__ import annotations

import csv
import re

import pytest
from conftest import SHARED_DATA, require, run_main

from medseg.reports import generate as gen
from medseg.reports.generate import SOURCE, TEMPLATES, generate_sentences, lesion_facts

STS = SHARED_DATA / "sts_fdg_petct"
FACTS = [
    {"case": "c1", "suvmax": 7.911, "image": 31, "image_range": [17, 47]},
    {"case": "c2", "suvmax": 21.676, "image": 29, "image_range": [20, 35]},
    {"case": "c3", "suvmax": 3.397, "image": 4, "image_range": [2, 9]},
    {"case": "c4", "suvmax": 10.05, "image": 100, "image_range": [90, 110]},
]


@pytest.fixture(scope="module")
def real_facts():
    require(STS / "lesions.csv")
    return lesion_facts(STS)


def _skeleton(sentence: str) -> str:
    """The phrasing without the facts, the lesion noun or the grade."""
    text = re.sub(r"\d+(\.\d)?", "#", sentence)
    for word in sorted(gen.LESIONS, key=len, reverse=True):
        text = text.replace(word, "N").replace(word.capitalize(), "N")
    return re.sub(r"\b(mildly|moderately|intensely|mild|moderate|intense)\b", "G", text, flags=re.I)


def _carries_facts(row: dict) -> None:
    decimals = re.findall(r"\d+\.\d+", row["sentence"])
    assert decimals == [f"{row['suvmax']:.1f}"], row["sentence"]
    assert re.search(rf"(?<![\d.]){row['image']}(?!\d|\.\d)", row["sentence"]), row["sentence"]


def test_reproducible_with_a_seed():
    a = generate_sentences(FACTS, per_lesion=4, seed=7)
    assert a == generate_sentences(FACTS, per_lesion=4, seed=7)
    assert [r["sentence"] for r in a] != [r["sentence"] for r in generate_sentences(FACTS, per_lesion=4, seed=8)]
    # seeded per case: a case's sentences do not depend on the other rows
    assert generate_sentences(FACTS[1:2], per_lesion=4, seed=7) == a[4:8]


def test_every_row_is_labelled_and_carries_its_facts():
    rows = generate_sentences(FACTS, per_lesion=6, seed=0)
    assert len(rows) == 24 and len({r["id"] for r in rows}) == 24
    for row, fact in zip(rows, [f for f in FACTS for _ in range(6)]):
        assert list(row) == list(gen.COLUMNS)
        assert row["generated"] is True and row["source"] == SOURCE == "generated:medseg.reports.generate v1"
        assert (
            row["case"] == fact["case"] and row["suvmax"] == round(fact["suvmax"], 1) and row["image"] == fact["image"]
        )
        _carries_facts(row)
        assert not re.search(r"\b(left|right)\b", row["sentence"], re.I)  # no laterality unless known
    assert "generated" in gen.__doc__.lower() and "never" in gen.__doc__


def test_every_template_carries_the_facts_and_reads_well():
    assert len(TEMPLATES) >= 20
    import random

    for template in TEMPLATES:
        for suv in (3.44, 6.0, 12.96):
            row = {"case": "x", "suvmax": suv}
            text = gen._sentence(template, row, 57, random.Random(0))
            _carries_facts({"sentence": text, "suvmax": round(suv, 1), "image": 57})
            assert "  " not in text and "soft tissue soft tissue" not in text and text[0].isupper()
            assert not re.search(r"\ba [aeiou]|\ban [^aeiouAEIOUFS]", text), text
            if suv < 4:
                assert "intense" not in text.lower(), text


def test_many_distinct_phrasings(real_facts):
    rows = generate_sentences(real_facts, per_lesion=3, seed=0)
    assert len(rows) == 3 * len(real_facts) == 153
    assert len({_skeleton(r["sentence"]) for r in rows}) >= 20
    for case in {r["case"] for r in rows}:  # a lesion's sentences differ from each other
        mine = [_skeleton(r["sentence"]) for r in rows if r["case"] == case]
        assert len(set(mine)) == 3
    orders = {"image first": 0, "suv first": 0}
    for r in rows:
        s = r["sentence"]
        orders["image first" if s.find(str(r["image"])) < s.find(f"{r['suvmax']:.1f}") else "suv first"] += 1
    assert min(orders.values()) > 10  # the facts come in both orders
    assert any(":" in r["sentence"] for r in rows) and any("series" in r["sentence"] for r in rows)


def test_site_and_laterality_only_when_given():
    rows = generate_sentences([{**FACTS[0], "laterality": "Left", "site": "thigh"}], per_lesion=5)
    assert all("in the left thigh" in r["sentence"] for r in rows)
    rows = generate_sentences([{**FACTS[0], "laterality": "left"}], per_lesion=5)  # a side without a site
    assert not any("left" in r["sentence"] for r in rows)


def test_range_mode_names_images_inside_the_lesion():
    rows = generate_sentences(FACTS, per_lesion=10, seed=3, slice_mode="range")
    for row in rows:
        lo, hi = next(f["image_range"] for f in FACTS if f["case"] == row["case"])
        assert lo <= row["image"] <= hi
        _carries_facts(row)
    assert len({r["image"] for r in rows if r["case"] == "c1"}) > 3
    with pytest.raises(ValueError):
        generate_sentences(FACTS, slice_mode="anywhere")
    with pytest.raises(ValueError):
        generate_sentences(FACTS, per_lesion=0)


def test_lesion_facts_from_the_real_crops(real_facts):
    from medseg.io.image import read_image
    from medseg.reports.weak_label import image_to_index, meta_affine

    assert len(real_facts) == 51
    first = real_facts[0]
    # sts_001: SUVmax voxel k = 28 of 59 slices (identity direction: k grows superior) -> image 59 - 28
    assert first["case"] == "sts_001" and first["image"] == 31 and first["image_range"] == [17, 47]
    pet, meta = read_image(first["pet"])
    z = image_to_index(first["image"], meta_affine(meta), pet.shape)
    assert z == 28 and round(float(pet[z].max()), 3) >= round(first["suvmax"], 3)
    for f in real_facts:
        assert f["image_range"][0] <= f["image"] <= f["image_range"][1]


def test_cli_generate(monkeypatch, capsys, tmp_path):
    require(STS / "lesions.csv")
    out = tmp_path / "sentences.csv"
    code, stdout, err = run_main(monkeypatch, capsys, "reports", "generate", "-i", STS, "-o", out, "--per-lesion", "2")
    assert code == 0, err
    assert "102 generated sentences" in stdout and "not clinical" in stdout
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 102 and all(r["generated"] == "True" and r["source"] == SOURCE for r in rows)
    for r in rows:
        _carries_facts({"sentence": r["sentence"], "suvmax": float(r["suvmax"]), "image": int(r["image"])})
    # the sentences feed the weak labeller as they are (id, case, suvmax, image)
    labels = tmp_path / "labels"
    code, _, err = run_main(
        monkeypatch, capsys, "reports", "weak-label", out, "--images", STS / "imagesTr", "-o", labels
    )
    assert code == 0, err
    with (labels / "weak_labels.csv").open(newline="") as f:
        status = {r["id"]: r["status"] for r in csv.DictReader(f)}
    assert status["sts_003_s01"] == status["sts_003_s02"] == "matched" and status["sts_006_s01"] == "matched-split"
    assert status["sts_007_s01"] == "bad-input"  # a PET-only case: not in imagesTr
    before = out.read_bytes()
    code, _, err = run_main(monkeypatch, capsys, "reports", "generate", "-i", STS, "-o", out)
    assert code == 2 and "already exists" in err and out.read_bytes() == before
    code, _, err = run_main(
        monkeypatch, capsys, "reports", "generate", "-i", STS, "-o", out, "--seed", "1", "--overwrite"
    )
    assert code == 0 and out.read_bytes() != before


def test_cli_generate_bad_input(monkeypatch, capsys, tmp_path):
    out = tmp_path / "s.csv"
    code, _, err = run_main(monkeypatch, capsys, "reports", "generate", "-i", tmp_path, "-o", out)
    assert code == 2 and "lesions.csv" in err and len(err.strip().splitlines()) == 1 and not out.exists()
    code, _, err = run_main(monkeypatch, capsys, "reports", "generate", "-i", tmp_path / "x", "-o", out)
    assert code == 2 and "not a folder" in err
    code, _, err = run_main(monkeypatch, capsys, "reports", "generate", "-i", tmp_path, "-o", out, "--per-lesion", "0")
    assert code == 2 and "--per-lesion" in err
