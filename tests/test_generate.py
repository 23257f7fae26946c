"""Instruction-data generation: fact sheets (real curated SLAKE, BCCD, BreastMNIST and hand-built records),
every validation rule, the template backend's determinism and Chinese pairs, the `medvl generate` job
(bad records, kill -9 and resume), and training on its output."""

from __future__ import annotations

import copy
import io
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import SHARED_DATA, committed_items, kill_9_after_commits
from PIL import Image

from medvl.errors import InputError
from medvl.generate.backend import seeded
from medvl.generate.pipeline import generate
from medvl.generate.template import TemplateBackend, where
from medvl.prompts import box_1000, format_box
from medvl.samples import FORMATS, RADIOLOGICAL, FactSheet, fact_sheet, lang_of, validate

REPO = Path(__file__).resolve().parents[1]
CARDS = REPO / "configs" / "cards"
REAL = ("slake", "bccd", "breastmnist", "spleen-ct")


@pytest.fixture(scope="session")
def curated(tmp_path_factory) -> dict[str, list[dict]]:
    """The real 2D sources curated from their cards (those whose card exists), records by source."""
    if not SHARED_DATA.is_dir():
        pytest.skip("shared data absent")
    from medvl.curate.card import load_card
    from medvl.curate.pipeline import curate

    os.environ.setdefault("MEDVL_SHARED_DATA", str(SHARED_DATA))
    out = {}
    for name in REAL:
        card = CARDS / f"{name}.yaml"
        if card.exists():
            folder = tmp_path_factory.mktemp("curated") / name
            curate([load_card(card)], folder, workers=2)
            rows = pq.read_table(sorted((folder / "data").glob("*.parquet"))).to_pylist()
            out[name] = [r for r in rows if r["kind"] == "image"]  # the 2D records (a volume has no 2D facts)
            out[name + "_dir"] = folder  # type: ignore[assignment]
    return out


def png(w: int = 64, h: int = 48, seed: int = 0) -> bytes:
    """A slice: noise (the body) on a black background that leaves both side borders clear."""
    arr = np.zeros((h, w), dtype=np.uint8)
    arr[4:-4, 6:-6] = np.random.default_rng(seed).integers(60, 255, (h - 8, w - 12), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def record(i: int = 0, **kw) -> dict:
    """A hand-built curated record: an axial CT of the abdomen with a liver (mask region) and a
    cyst (box), exhaustive over a four-label space."""
    base = {
        "id": f"hand/ct{i:04d}.png",
        "image": {"bytes": png(seed=i), "path": None},
        "width": 64,
        "height": 48,
        "modality": "CT",
        "body_region": "Abdomen",
        "department": "Gastroenterology and Hepatology",
        "original_task": "2D segmentation",
        "clinical_task": "Organ Recognition",
        "labels": ["Liver", "Liver Cancer"],
        "boxes": [
            {"label": "Liver", "x_min": 4.0, "y_min": 6.0, "x_max": 30.0, "y_max": 30.0},
            {"label": "Liver Cancer", "x_min": 40.0, "y_min": 30.0, "x_max": 50.0, "y_max": 40.0},
        ],
        "source": "hand",
        "meta": json.dumps({"axis": "axial"}),
        "split": "train",
        "annotation": json.dumps(
            {"exhaustive": True, "label_space": ["Liver", "Liver Cancer", "Spleen", "Bladder"]}
        ),
        "regions": json.dumps(
            [
                {
                    "label": "Liver",
                    "area_share": 0.2,
                    "cx": 0.27,
                    "cy": 0.375,
                    "x_min": 4,
                    "y_min": 6,
                    "x_max": 30,
                    "y_max": 30,
                }
            ]
        ),
    }
    base.update(kw)
    return base


def write_curated(folder: Path, rows: list[dict]) -> Path:
    (folder / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "data" / "part-00000.parquet")
    return folder


def samples_of(facts: FactSheet, seed: int = 0) -> dict[tuple[str, str], dict]:
    """The template backend's samples for every format and language, finished as the pipeline does."""
    from medvl.generate.pipeline import GenerateStep

    step = GenerateStep(TemplateBackend(), "/nonexistent", FORMATS, 1.0, seed)
    out = {}
    for fmt in FORMATS:
        for lang in ("en", "zh"):
            raws = TemplateBackend().write(facts, fmt, lang, seeded(seed, facts.record_id, fmt))
            for i, raw in enumerate(raws):
                out[fmt, lang] = step.finish(raw, facts, fmt, lang, i, f"{facts.record_id}:{fmt}:{i}:en")
    return out


# ------------------------------------------------------------------------------------- fact sheets


def test_fact_sheets_of_real_sources(curated):
    slake = curated["slake"]
    sides = Counter()
    for r in slake:
        f = fact_sheet(r)
        assert f.boxes == [
            (
                b["label"],
                tuple(box_1000([b["x_min"], b["y_min"], b["x_max"], b["y_max"]], r["width"], r["height"])),
            )
            for b in r["boxes"]
        ]
        assert all(0 <= v <= 1000 for _, box in f.boxes for v in box)
        assert not f.negatives  # the SLAKE card does not claim exhaustive labels
        assert f.convention == RADIOLOGICAL  # CT, MR slices and chest radiographs
        # The stated convention matches the data: "Left Kidney" etc. lie on the patient's left.
        for label in f.labels:
            side = label.split()[0].lower()
            w = where(f, label)
            if side in ("left", "right") and w is not None:
                sides[w[0] == side, w[0] == {"left": "right", "right": "left"}[side]] += 1
    assert sides[False, True] == 0  # never the opposite side
    assert sides[True, False] > 0.85 * sum(sides.values())  # the rest: near the midline band
    if "bccd" in curated:
        for r in curated["bccd"]:
            f = fact_sheet(r)
            assert (
                f.convention is None
                and set(f.labels) <= {"red blood cell", "white blood cell", "platelet"}
                and not f.negatives
            )
            assert f.counts() == dict(Counter(b["label"] for b in r["boxes"]))
    if "spleen-ct" in curated:
        # Exhaustive over one label: a slice without spleen has it as a verified negative. The slices
        # are a crop around the spleen (tissue reaches both borders): no patient side is stated.
        for r in curated["spleen-ct"]:
            f = fact_sheet(r)
            assert sorted(f.labels + f.negatives) == f.label_space == ["spleen"]
            assert f.convention is None and all(x.side is None for x in f.regions)
            assert [x.label for x in f.regions] == f.labels
    if "breastmnist" in curated:
        for r in curated["breastmnist"][:50]:
            f = fact_sheet(r)
            assert len(f.labels) == 1 and not f.boxes
            assert (
                f.negatives == [x for x in f.label_space if x not in f.labels] and f.negatives
            )  # exhaustive


def test_fact_sheet_of_hand_built_and_old_records():
    f = fact_sheet(record())
    assert f.labels == ["Liver", "Liver Cancer"] and f.negatives == ["Bladder", "Spleen"]
    assert f.boxes[0] == ("Liver", (62, 125, 469, 625)) and f.split == "train"
    (liver,) = f.regions
    assert (liver.quadrant, liver.vertical, liver.side) == ("upper left", "middle", "right")
    assert FactSheet.from_json(f.to_json()) == f
    # Not exhaustive: no verified negatives; sagittal: no patient side; an old record: defaults.
    assert (
        fact_sheet(record(annotation=json.dumps({"exhaustive": False, "label_space": ["Spleen"]}))).negatives
        == []
    )
    sag = fact_sheet(record(meta=json.dumps({"axis": "sagittal"})))
    assert sag.convention is None and sag.regions[0].side is None
    # A cropped field of view (tissue up to both side borders) states no patient side either.
    full = np.random.default_rng(0).integers(60, 255, (48, 64), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(full).save(buf, format="PNG")
    assert fact_sheet(record(image={"bytes": buf.getvalue(), "path": None})).convention is None
    old = {k: v for k, v in record().items() if k not in ("split", "annotation", "regions", "meta")}
    f = fact_sheet(old)
    assert (f.split, f.negatives, f.regions, f.label_space) == ("", [], [], ["Liver", "Liver Cancer"])


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        ({"modality": None}, "modality", "missing"),
        ({"image": {"bytes": b"\x89PNG not really", "path": None}}, "image", "not a readable image"),
        ({"width": 65}, "image", "decodes to 64x48"),
        (
            {"boxes": [{"label": "Liver", "x_min": 10.0, "y_min": 10.0, "x_max": 70.0, "y_max": 20.0}]},
            "boxes[0]",
            "outside the 64x48 image",
        ),
    ],
)
def test_bad_records_name_id_and_reason(change, field, problem):
    with pytest.raises(InputError) as e:
        fact_sheet(record(7, **change))
    assert e.value.file == "hand/ct0007.png" and e.value.field == field and problem in e.value.problem


# ---------------------------------------------------------------------------------------- validation


def test_template_output_passes_every_rule_on_real_and_hand_built_records(curated):
    sheets = [fact_sheet(record(i)) for i in range(5)]
    for name in REAL:
        sheets += [fact_sheet(r) for r in curated.get(name, [])[:60]]
    seen = Counter()
    for f in sheets:
        made = samples_of(f)
        for (fmt, lang), s in made.items():
            original = made[fmt, "en"] if lang == "zh" else None
            assert validate(s, f, original) == [], (f.record_id, fmt, lang, s["conversations"])
            seen[f.source, fmt] += 1
    for name in ("hand", *(n for n in REAL if n in curated)):
        # Every source gets every image format it can support; text-only everywhere.
        assert {fmt for (src, fmt) in seen if src == name} >= {
            "caption",
            "instruction",
            "dialogue",
            "perception",
            "text",
        }
    assert ("slake", "region") in seen


def _good() -> tuple[FactSheet, dict[tuple[str, str], dict]]:
    f = fact_sheet(record())
    return f, samples_of(f)


def _reply(s: dict, text: str) -> dict:
    s = copy.deepcopy(s)
    s["conversations"][-1]["value"] = text
    return s


def test_every_rule_fires_on_a_crafted_bad_sample():
    f, good = _good()
    cap, reg, mc = good["caption", "en"], good["region", "en"], good["perception", "en"]
    base = "This is a CT image of the abdomen. It shows the liver and the liver cancer."
    bad = {
        "schema": {**cap, "conversations": [{"from": "gpt", "value": "hi"}]},
        "image token": {
            **cap,
            "conversations": [{"from": "human", "value": "Describe it. <image>"}, cap["conversations"][1]],
        },
        "missing label": _reply(cap, "This is a CT image of the abdomen. It shows the liver only."),
        "asserted absent": _reply(cap, base + " A spleen is also seen."),
        "laterality": _reply(cap, base + " The liver lies on the patient's left side."),
        "box mismatch": _reply(cap, base + " The liver is at [1, 2, 3, 4]."),
        "mc options": {**mc, "answer": "D" if mc["answer"] != "D" else "A"},
        "leak phrase": _reply(cap, base + " This is based on the caption."),
        "length": _reply(cap, base + " More." * 500),
        "language": _reply(
            cap, "Ceci est une image de tomodensitométrie de l'abdomen montrant le foie et le cancer."
        ),
    }
    for reason, sample in bad.items():
        assert reason in validate(sample, f), reason
    # Negation-aware: the absent label denied, the present one stated, pass; a synonym counts.
    assert validate(_reply(cap, base + " No spleen or bladder is seen."), f) == []
    assert validate(_reply(cap, "A CT image of the abdomen with the liver and a liver tumour."), f) == []
    assert "missing label" in validate(
        _reply(cap, "A CT image of the abdomen. There is no liver cancer. The liver is seen."), f
    )
    # The region caption's box must be in the question and be the record's.
    assert "box mismatch" in validate({**reg, "box": [0, 0, 10, 10]}, f)
    # Duplicate options.
    dup = copy.deepcopy(mc)
    dup["options"] = [mc["options"][0]] * len(mc["options"])
    assert "mc options" in validate(dup, f)
    # The Chinese version must keep the English letters, numbers and boxes.
    zh_reg, en_reg = good["region", "zh"], good["region", "en"]
    assert validate(zh_reg, f, en_reg) == []
    moved = copy.deepcopy(zh_reg)
    moved["conversations"][1]["value"] = moved["conversations"][1]["value"].replace(
        format_box(reg["box"]), "[1, 1, 2, 2]"
    )
    assert "zh mismatch" in validate(moved, f, en_reg)
    assert "language" in validate(
        _reply(zh_reg, "The region shows the liver, on the patient's right side."), f
    )


@pytest.mark.parametrize(
    "text, present, absent",
    [
        (
            "It shows the retina. No cyst, colon mucosa or nodule is seen.",
            {"retina"},
            {"cyst", "colon mucosa", "nodule"},
        ),
        ("Effusion or pneumothorax is not seen.", set(), {"Effusion", "Pneumothorax"}),
        ("There is a nodule, no effusion.", {"Nodule"}, {"Effusion"}),
        ("A nodule and no effusion.", {"Nodule"}, {"Effusion"}),
        ("No effusion, but a nodule.", {"Nodule"}, {"Effusion"}),
        ("No cyst. A nodule is seen.", {"Nodule"}, {"cyst"}),
        # the 不 of 肺不张 (atelectasis) is part of a label, not a denial of the next one
        ("可见肺不张和胸腔积液。", {"Atelectasis", "Effusion"}, set()),
        ("未见肺不张或胸腔积液。", set(), {"Atelectasis", "Effusion"}),
    ],
)
def test_negation_covers_a_list_and_never_comes_from_a_label(text, present, absent):
    from medvl.samples import assertions

    terms = ["retina", "cyst", "colon mucosa", "Nodule", "Effusion", "Pneumothorax", "Atelectasis"]
    found_present, found_absent = assertions(text, terms)
    assert {t.lower() for t in found_present} == {t.lower() for t in present}
    assert {t.lower() for t in found_absent} == {t.lower() for t in absent}


def test_perception_asks_every_kind_with_distractors_from_the_gold_group():
    """One multiple-choice item per kind of fact; a label's distractors are verified negatives of its own
    clinical task (organs against organs, findings against findings), never a positive."""
    groups = {
        "Liver": "Organ Recognition",
        "Spleen": "Organ Recognition",
        "Bladder": "Organ Recognition",
        "Liver Cancer": "Disease Diagnosis",
        "Cyst": "Disease Diagnosis",
    }
    annotation = json.dumps({"exhaustive": True, "label_space": list(groups), "groups": groups})
    f = fact_sheet(record(annotation=annotation))
    assert f.groups == groups
    from medvl.generate.template import perception_items

    kinds = perception_items(f, seeded(0, f.record_id, "perception"))
    assert {"modality", "body region", "present:Organ Recognition", "present:Disease Diagnosis"} <= set(kinds)
    items = TemplateBackend().write(f, "perception", "en", seeded(0, f.record_id, "perception"))
    assert len(items) == len(kinds)
    by_question = {s["conversations"][0]["value"].split("\n")[1]: s for s in items}
    organ = next(s for q, s in by_question.items() if "organ" in q or "anatomical" in q)
    finding = next(s for q, s in by_question.items() if "finding" in q or "abnormality" in q)
    assert sorted(organ["options"]) == ["bladder", "liver", "spleen"]
    assert organ["conversations"][1]["value"] == "liver"
    assert sorted(finding["options"]) == ["cyst", "liver cancer"]
    assert finding["conversations"][1]["value"] == "liver cancer"
    zh = TemplateBackend().write(f, "perception", "zh", seeded(0, f.record_id, "perception"))
    assert [s["answer"] for s in zh] == [s["answer"] for s in items]  # same letters in both languages


def test_modality_and_region_distractors_come_from_the_job_first():
    """A modality question's distractors are modalities the job's own images show (look-alikes among them
    first) before any the model never sees an image of; the job fills in what it read."""
    from medvl.generate.template import perception_items

    f = fact_sheet(record())  # a CT of the abdomen
    alone = perception_items(f, seeded(0, f.record_id, "perception"))["modality"][1]
    f.run_modalities = ["CT", "Dermoscopy", "Fundus photography", "Histopathology", "MR", "X-ray"]
    f.run_regions = ["Abdomen", "Eye", "Knee", "Skin"]
    for seed in range(20):
        items = perception_items(f, seeded(seed, f.record_id, "perception"))
        gold, pool, _ = items["modality"]
        assert gold == "CT" and sorted(pool[:2]) == ["MR", "X-ray"]  # the look-alikes the job shows
        assert set(pool[:5]) == set(f.run_modalities) - {"CT"}  # then the job's others, then the rest
        assert set(items["body region"][1][:3]) == {"Eye", "Knee", "Skin"}
    assert {"MR", "X-ray", "Ultrasound", "PET"} & set(alone[:2])  # outside a job: look-alikes alone


def test_generate_job_gives_every_sheet_the_job_modalities(tmp_path):
    rows = [record(i) for i in range(4)] + [record(9, modality="MR", body_region="Head")]
    src = write_curated(tmp_path / "cur", rows)
    generate([src], tmp_path / "gen", TemplateBackend(), formats=["perception"], seed=0)
    sheets = [json.loads(line)["facts"] for line in (tmp_path / "gen" / "samples.jsonl").open()]
    assert sheets and all(s["run_modalities"] == ["CT", "MR"] for s in sheets)
    assert all(s["run_regions"] == ["Abdomen", "Head"] for s in sheets)


def test_language_id():
    assert lang_of("A CT image of the abdomen showing the liver and both kidneys.")[0] == "en"
    lang, prob = lang_of("这是一张腹部CT图像，图中可见肝脏和双肾。[12, 40, 300, 500]")
    assert lang == "zh" and 0 < prob <= 1


# ------------------------------------------------------------------------ determinism and Chinese


def test_deterministic_by_seed_and_zh_keeps_letters_numbers_boxes(curated):
    rows = [record(i) for i in range(3)] + curated.get("slake", [])[:20] + curated.get("bccd", [])[:10]
    changed = 0
    for r in rows:
        f = fact_sheet(r)
        a, b, c = samples_of(f, 0), samples_of(f, 0), samples_of(f, 1)
        dump = lambda x: json.dumps(sorted(x.items()), sort_keys=True)  # noqa: E731
        assert dump(a) == dump(b)
        changed += dump(a) != dump(c)
        for fmt in FORMATS:
            if (fmt, "zh") not in a:
                continue
            en, zh = a[fmt, "en"], a[fmt, "zh"]
            assert [en.get(k) for k in ("answer", "box")] == [zh.get(k) for k in ("answer", "box")]
            text = lambda s: "\n".join(t["value"] for t in s["conversations"])  # noqa: E731
            assert re.findall(r"\[[\d, ]+\]", text(en)) == re.findall(r"\[[\d, ]+\]", text(zh))
            assert sorted(re.findall(r"\d+", text(en))) == sorted(re.findall(r"\d+", text(zh)))
            assert len(en.get("options", [])) == len(zh.get("options", []))
    assert changed >= len(rows) // 2


# ------------------------------------------------------------------------------------------ the job


def mixed_rows(n: int) -> list[dict]:
    """n good records and three bad ones (missing modality, unreadable image, box outside the image)."""
    rows = [record(i) for i in range(n)]
    rows[1] = record(1, modality=None)
    rows[2] = record(2, image={"bytes": b"garbage", "path": None})
    rows[3] = record(3, boxes=[{"label": "Liver", "x_min": 0.0, "y_min": 0.0, "x_max": 99.0, "y_max": 9.0}])
    rows[4] = record(4, split="test")  # not generated under the default splits
    return rows


def test_job_counts_bad_records_and_splits(tmp_path):
    src = write_curated(tmp_path / "cur", mixed_rows(12))
    report = generate([src], tmp_path / "gen", TemplateBackend(), zh_share=0.5, seed=3)
    assert report["records"] == 11 and report["quarantined"] == 3
    assert report["read"] == report["kept"] + report["rejected"] + report["quarantined"]
    q = {
        json.loads(line)["item"]: json.loads(line) for line in (tmp_path / "gen" / "quarantine.jsonl").open()
    }
    assert q["hand/ct0001.png"]["field"] == "modality" and q["hand/ct0002.png"]["field"] == "image"
    assert q["hand/ct0003.png"]["field"] == "boxes[0]" and "outside" in q["hand/ct0003.png"]["problem"]
    samples = [json.loads(line) for line in (tmp_path / "gen" / "samples.jsonl").open()]
    assert len(samples) == report["kept"] and {s["provenance"]["record_id"] for s in samples}.isdisjoint(q)
    assert "hand/ct0004.png" not in {s["provenance"]["record_id"] for s in samples}
    for s in samples:
        assert set(s["provenance"]) == {
            "record_id",
            "source",
            "split",
            "format",
            "lang",
            "prompt_version",
            "backend",
            "model",
            "seed",
        }
        if s["format"] != "text":
            assert (tmp_path / "gen" / s["image"]).is_file()
        assert validate(s, FactSheet.from_json(s["facts"])) == []
    langs = Counter(s["lang"] for s in samples)
    assert langs["zh"] > 0 and langs["en"] > langs["zh"]
    counted = sum(c["kept"] for src in report["by"].values() for f in src.values() for c in f.values())
    assert counted == report["kept"]
    # The Parquet copy carries the provenance columns.
    table = pq.read_table(tmp_path / "gen" / "data")
    assert {"record_id", "source", "format", "lang", "backend", "model", "prompt_version", "seed"} <= set(
        table.column_names
    )
    # Re-running is a no-op.
    before = (tmp_path / "gen" / "samples.jsonl").read_bytes()
    assert generate([src], tmp_path / "gen", TemplateBackend(), zh_share=0.5, seed=3) == report
    assert (tmp_path / "gen" / "samples.jsonl").read_bytes() == before


def snapshot(out: Path) -> dict[str, bytes]:
    names = ["samples.jsonl", "rejected.jsonl", "report.json", "quarantine.jsonl"]
    files = [out / n for n in names] + [p for d in ("data", "parts", "images") for p in (out / d).iterdir()]
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


def test_kill9_then_rerun_gives_identical_output(tmp_path):
    src = write_curated(tmp_path / "cur", mixed_rows(500))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "medvl.cli", "generate", str(src), "--out", str(out), "--zh-share", "0.4"]
    done = kill_9_after_commits([*cmd, "--workers", "2"], out)
    assert not (out / "samples.jsonl").exists()
    assert 0 < len(done) < 499
    again = subprocess.run([*cmd, "--workers", "1"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    clean = generate([src], tmp_path / "clean", TemplateBackend(), zh_share=0.4, workers=2)
    assert snapshot(out) == snapshot(tmp_path / "clean")
    report = json.loads((out / "report.json").read_text())
    assert report == clean and report["read"] == report["kept"] + report["rejected"] + report["quarantined"]
    items = committed_items(out)
    assert len(items) == len(set(items)) == 499  # every record (the test-split one left out) exactly once


def test_generated_set_trains(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from medvl.cli import app

    src = write_curated(tmp_path / "cur", [record(i) for i in range(12)])
    out = tmp_path / "gen"
    res = CliRunner().invoke(
        app, ["generate", str(src), "--out", str(out), "--formats", "caption,region,perception,text"]
    )
    assert res.exit_code == 0, res.output
    cfg = {
        "stage": "gen",
        "model": str(tiny_model_dir),
        "output_dir": str(tmp_path / "run"),
        "data": [{"path": str(out / "samples.jsonl"), "image_root": str(out)}],
        "freeze": {"llm": False, "projector": False, "vision": True},
        "lr": 1e-3,
        "global_batch_size": 4,
        "micro_batch_size": 2,
        "max_length": 2048,
        "max_steps": 2,
        "log_every": 1,
        "warmup_ratio": 0.0,
    }
    (tmp_path / "stage.yaml").write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "stage.yaml")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "final").is_dir()


class TwoDOnly(TemplateBackend):
    """The template backend without volume support: what the openai backend is for volumes."""

    volumes = False


def test_a_backend_without_volume_support_skips_volume_records(tmp_path, monkeypatch):
    """A curated set of phantoms (slices and whole volumes) through a backend that writes from 2D images
    only: the volume records are skipped with their reason, the slices generate as usual, and read =
    kept + rejected + quarantined + skipped. (The template backend writes them: test_generate_3d.py.)"""
    from medvl.curate.card import load_card
    from medvl.curate.pipeline import curate
    from medvl.generate.pipeline import SKIP_VOLUME
    from medvl.synth.volumes import write_phantoms

    write_phantoms(tmp_path / "phantoms", 3, shape=(16, 48, 48), seed=1)
    monkeypatch.setenv("MEDVL_SYNTH_3D", str(tmp_path / "phantoms"))
    curate([load_card(CARDS / "synthetic-3d.yaml")], tmp_path / "cur", workers=1)
    rows = pq.read_table(tmp_path / "cur" / "data").to_pylist()
    volumes = {r["id"] for r in rows if r["kind"] == "volume" and r["split"] in ("train", "")}
    assert volumes and any(r["kind"] == "image" for r in rows)
    report = generate([tmp_path / "cur"], tmp_path / "gen", TwoDOnly(), formats=("caption",), seed=0)
    assert report["skipped"] == len(volumes) and report["skipped_reasons"] == {SKIP_VOLUME: len(volumes)}
    assert report["quarantined"] == 0 and report["kept"] > 0
    assert report["read"] == report["kept"] + report["rejected"] + report["quarantined"] + report["skipped"]
    rejected = [json.loads(line) for line in (tmp_path / "gen" / "rejected.jsonl").open()]
    assert not volumes & {r["record_id"] for r in rejected}
    samples = [json.loads(line) for line in (tmp_path / "gen" / "samples.jsonl").open()]
    assert not volumes & {s["provenance"]["record_id"] for s in samples}


def test_cli_prints_its_sum_over_slices_and_volumes(tmp_path, monkeypatch):
    """`medvl generate` on curated phantoms (slices and whole volumes): the line it prints adds up, with
    the skipped records (none: the template backend writes volumes too) in the sum, and says what
    report.json says."""
    from typer.testing import CliRunner

    from medvl.cli import app
    from medvl.curate.card import load_card
    from medvl.curate.pipeline import curate
    from medvl.synth.volumes import write_phantoms

    write_phantoms(tmp_path / "phantoms", 3, shape=(16, 48, 48), seed=1)
    monkeypatch.setenv("MEDVL_SYNTH_3D", str(tmp_path / "phantoms"))
    curate([load_card(CARDS / "synthetic-3d.yaml")], tmp_path / "cur", workers=1)
    out = tmp_path / "gen"
    res = CliRunner().invoke(
        app, ["generate", str(tmp_path / "cur"), "--out", str(out), "--formats", "caption"]
    )
    assert res.exit_code == 0, res.output
    line = re.search(
        r"read (\d+) = kept (\d+) \+ rejected (\d+) \(.*\) \+ quarantined (\d+) \+ skipped (\d+) \((.*)\);",
        res.output,
    )
    assert line, res.output
    read, kept, rejected, quarantined, skipped = map(int, line.groups()[:5])
    report = json.loads((out / "report.json").read_text())
    assert (read, kept, rejected, quarantined, skipped) == tuple(
        report[k] for k in ("read", "kept", "rejected", "quarantined", "skipped")
    )
    assert skipped == 0 and kept > 0 and read == kept + rejected + quarantined + skipped
    assert line.group(6) == "none" and report["skipped_reasons"] == {}
    samples = [json.loads(line) for line in (out / "samples.jsonl").open()]
    assert any(s["provenance"]["record_id"].endswith("#volume") for s in samples)
