"""3D instructions (`medvl generate` on volume records): facts measured on the stored grid, the six
formats, validation against the facts, Chinese pairs, plane volumes, and the real spleen CT."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SHARED_DATA

from medvl.curate.card import load_card
from medvl.curate.pipeline import curate
from medvl.generate.backend import seeded
from medvl.generate.pipeline import generate
from medvl.generate.template import TemplateBackend
from medvl.generate.volume import write_volume
from medvl.records import read_rows
from medvl.samples import FORMATS, validate_volume
from medvl.synth import benchmark3d as b3
from medvl.synth.volumes import write_phantoms
from medvl.volume_facts import label_measures, merge_measures, reformat, volume_facts

CARDS = REPO / "configs" / "cards"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """Six curated phantoms (two per region, one of each with a lesion) and their generated samples."""
    root = tmp_path_factory.mktemp("gen3d")
    write_phantoms(root / "src", 6, seed=3)
    card = (CARDS / "synthetic-3d.yaml").read_text()
    card = card.replace("${MEDVL_SYNTH_3D:-../../runs/synthetic-3d}", ".")
    (root / "src" / "card.yaml").write_text(card)
    curate([load_card(root / "src" / "card.yaml")], root / "cur", workers=1)
    generate([root / "cur"], root / "gen", TemplateBackend(), zh_share=0.5, seed=0, workers=1)
    return root


def volume_records(root: Path) -> list[dict]:
    return [r for r in read_rows(root / "cur" / "data") if r["kind"] == "volume"]


def test_label_measures_against_hand_counted_voxels():
    labels = np.zeros((4, 6, 8), np.uint8)
    labels[1:3, 2:4, 5:8] = 2  # 2 x 2 x 3 = 12 voxels, centroid (1.5, 2.5, 6)
    labels[0, 0, 0] = 9  # a label the card does not name
    m = label_measures(labels, {2: "lesion"})
    assert m == {"lesion": {"voxels": 12, "centroid": [1.5, 2.5, 6.0]}}
    merged = merge_measures({"voxels": 4, "centroid": [0.0, 0.0, 0.0]}, m["lesion"])
    assert merged == {"voxels": 16, "centroid": [1.125, 1.875, 4.5]}


def test_facts_of_a_curated_phantom_match_the_benchmarks_rules(phantoms):
    """The generator's facts come from curation's stored measures; the benchmark computes its gold from
    the label array. On the same phantom curated by the card (its label volume on the stored grid,
    recomputed here from the NIfTI files with the card's spec) both say the same."""
    import SimpleITK as sitk

    for r in volume_records(phantoms):
        facts = volume_facts(r)
        src = phantoms / "src" / r["file"]
        img = sitk.ReadImage(str(src))
        lab = sitk.ReadImage(str(src).replace(".nii.gz", "_seg.nii.gz"))
        prepared = b3.SPEC.apply(img, lab, name=r["file"])
        stored = np.load(phantoms / "cur" / facts.file)
        assert np.array_equal(stored, prepared.array)
        lesion = b3.lesion_facts(prepared.labels, b3.SPEC.spacing)
        if lesion is None:
            assert "lesion" not in facts.labels and "lesion" in facts.absent
            continue
        f = facts.labels["lesion"]
        assert f.voxels == lesion["voxels"]
        assert f.side == b3.side_of(lesion["column"], prepared.labels.shape[2])
        assert f.third == b3.third_of(lesion["slice"], prepared.labels.shape[0])
        assert f.size == b3.size_grade(lesion["diameter_mm"])


def test_every_format_is_written_and_passes_validation(phantoms):
    report = json.loads((phantoms / "gen" / "report.json").read_text())
    assert report["read"] == report["kept"] + report["rejected"] + report["quarantined"] + report["skipped"]
    assert report["skipped"] == 0 and report["quarantined"] == 0
    samples = read_rows(phantoms / "gen" / "samples.jsonl")
    volume_ids = {r["id"] for r in volume_records(phantoms)}
    vol = [s for s in samples if s["provenance"]["record_id"] in volume_ids]
    assert {s["format"] for s in vol} == set(FORMATS) and {s["lang"] for s in vol} == {"en", "zh"}
    kinds = {s["kind"].split(":")[0] for s in vol if s["format"] == "perception"}
    assert kinds == {"organ", "presence", "side", "third", "size", "plane"}
    for s in vol:
        if s["format"] == "text":
            assert "volume" not in s and "image" not in s
            continue
        assert (phantoms / "gen" / s["volume"]).is_file()
    # A plane question names the stored volume turned to its gold plane.
    records = {r["id"]: r for r in volume_records(phantoms)}
    for s in (s for s in vol if s.get("kind") == "plane" and s["lang"] == "en"):
        stored = np.load(phantoms / "cur" / volume_facts(records[s["provenance"]["record_id"]]).file)
        assert np.array_equal(np.load(phantoms / "gen" / s["volume"]), reformat(stored, s["plane"]))
        assert s["options"][ord(s["answer"]) - 65] == s["plane"]
    # Chinese samples keep their English pair's letters and numbers (validated), and say it in Chinese.
    zh = [s for s in vol if s["lang"] == "zh"]
    assert zh and all(s["pair_id"].endswith(":en") for s in zh)


def _facts_and_samples(phantoms, with_lesion: bool):
    for r in volume_records(phantoms):
        facts = volume_facts(r)
        if ("lesion" in facts.labels) == with_lesion:
            out = {}
            for fmt in FORMATS:
                for raw in write_volume(facts, fmt, "en", seeded(0, facts.record_id, fmt)):
                    s = {
                        "id": f"x:{fmt}",
                        **({"volume": facts.file} if fmt != "text" else {}),
                        **raw,
                        "format": fmt,
                        "lang": "en",
                        "provenance": {},
                    }
                    out.setdefault((fmt, raw.get("kind", "").split(":")[0]), s)
            return facts, out
    raise AssertionError("no such phantom")


def test_every_rule_fires_on_a_crafted_bad_volume_sample(phantoms):
    facts, samples = _facts_and_samples(phantoms, with_lesion=True)
    for s in samples.values():
        assert validate_volume(s, facts) == [], s
    bad = copy.deepcopy(samples[("caption", "")])
    bad["conversations"][1]["value"] = "This is a CT volume. It shows a lesion and nothing else."
    assert "missing label" in validate_volume(bad, facts)
    side = copy.deepcopy(samples[("perception", "side")])
    wrong = next(o for o in side["options"] if o != side["options"][ord(side["answer"]) - 65])
    side["answer"] = "AB"[side["options"].index(wrong)]
    side["conversations"][1]["value"] = wrong
    assert validate_volume(side, facts) == ["mc options"]
    region = copy.deepcopy(samples[("region", "")])
    region["box"] = [0, 0, 0, 1, 1, 1]
    assert "box mismatch" in validate_volume(region, facts)
    text = copy.deepcopy(samples[("text", "")])
    text["volume"] = facts.file
    assert validate_volume(text, facts) == ["schema"]
    inst = copy.deepcopy(samples[("caption", "")])
    lesion = facts.labels["lesion"]
    other = "patient's left" if lesion.side == "patient's right" else "patient's right"
    inst["conversations"][1]["value"] += f" The lesion lies on the {other}."
    assert "laterality" in validate_volume(inst, facts)
    no_lesion, clean = _facts_and_samples(phantoms, with_lesion=False)
    absent = copy.deepcopy(clean[("caption", "")])
    absent["conversations"][1]["value"] += " A lesion is seen."
    assert "asserted absent" in validate_volume(absent, no_lesion)
    image = copy.deepcopy(clean[("caption", "")])
    image["conversations"][0]["value"] = image["conversations"][0]["value"].replace("<image>\n", "")
    assert "image token" in validate_volume(image, no_lesion)


def test_a_record_without_measures_is_quarantined_with_its_reason(phantoms, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = read_rows(phantoms / "cur" / "data")
    old = next(r for r in rows if r["kind"] == "volume")
    vol = json.loads(old["volume"])
    del vol["measures"]
    broken = {**old, "id": old["id"] + "-old", "volume": json.dumps(vol)}
    (tmp_path / "cur" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([old, broken]), tmp_path / "cur" / "data" / "part-0.parquet")
    (tmp_path / "cur" / "volumes").symlink_to(phantoms / "cur" / "volumes")
    gen = tmp_path / "gen"
    report = generate([tmp_path / "cur"], gen, TemplateBackend(), formats=("caption",), zh_share=0.0, seed=0)
    assert report["quarantined"] == 1 and report["kept"] == 1
    (q,) = read_rows(tmp_path / "gen" / "quarantine.jsonl")
    assert q["item"] == broken["id"] and "measures" in json.dumps(q)


@pytest.mark.skipif(not (SHARED_DATA / "spleen_ct").exists(), reason="shared spleen CT absent")
def test_the_real_spleen_ct_gets_instructions_stating_only_what_it_shows(tmp_path):
    """The real abdominal CT (MSD spleen2, a field of view cropped around the spleen, manual label): its
    facts come from the stored label grid, and where the volume cannot tell a fact it is not stated. The
    spleen fills the crop (its box spans columns 7-82 of 96, centroid column 48.3 against the middle
    47.5), so no sample says on which side of the patient it lies."""
    curate([load_card(CARDS / "spleen-ct.yaml")], tmp_path / "cur", workers=1)
    (rec,) = [r for r in read_rows(tmp_path / "cur" / "data") if r["kind"] == "volume"]
    facts = volume_facts(rec)
    spleen = facts.labels["spleen"]
    stored = np.load(tmp_path / "cur" / facts.file)
    assert stored.shape == facts.shape == (2, 32, 96, 96)
    assert spleen.side is None and abs(spleen.centroid[2] - 47.5) < 2  # within the side margin
    assert spleen.slices == (6, 26) and spleen.third == "middle third"  # centroid slice 16.6 of 32
    report = generate([tmp_path / "cur"], tmp_path / "gen", TemplateBackend(), zh_share=0.0, seed=0)
    samples = [
        s for s in read_rows(tmp_path / "gen" / "samples.jsonl") if s["provenance"]["record_id"] == rec["id"]
    ]
    assert samples and report["skipped"] == 0 and report["rejected"] == 0
    assert {s["format"] for s in samples} == set(FORMATS)
    for s in samples:
        assert not str(s.get("kind", "")).startswith("side:")
        assert "patient's" not in " ".join(t["value"] for t in s["conversations"])
    caption = next(s for s in samples if s["format"] == "caption")
    assert "spleen" in caption["conversations"][1]["value"]
