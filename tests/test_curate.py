"""Curation on real files: SLAKE (shared data), the DICOM/NIfTI samples shipped by pydicom, pydicom-data
and nibabel, synthetic phantoms written as NIfTI, and small bad inputs written here."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import committed_items, kill_9_after_commits
from PIL import Image

from medvl.curate.card import CardError, load_card
from medvl.curate.images import box_iou, mask_boxes, mask_regions
from medvl.curate.pipeline import curate
from medvl.errors import InputError
from medvl.records import read_rows
from medvl.vocab import BODY_REGIONS, DEPARTMENTS, MODALITIES

REPO = Path(__file__).resolve().parents[1]
CARDS = REPO / "configs" / "cards"
SHARED = Path(os.environ.get("MEDVL_SHARED_DATA", REPO.parent / "shared" / "data"))
SLAKE = SHARED / "slake"


def records(out: Path, image: bool = True) -> list[dict]:
    shards = sorted((out / "data").glob("*.parquet"))
    if not shards:
        return []
    cols = None if image else [c for c in pq.read_schema(shards[0]).names if c != "image"]
    return pq.read_table(shards, columns=cols).to_pylist()


def quarantine(out: Path) -> list[dict]:
    return jsonl(out / "quarantine.jsonl")


def write_card(folder: Path, **fields) -> Path:
    base = dict(
        license="test",
        original_task="2D classification",
        clinical_task="Disease Diagnosis",
        department="Dermatology",
        modality="Dermoscopy",
        root=str(folder),
    )
    path = folder.parent / f"{fields['name']}.yaml"
    path.write_text(yaml.safe_dump({**base, **fields}))
    return path


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_balanced(report: dict, out: Path) -> None:
    """The counts add up, overall and per source, and agree with what the output files hold."""
    c = report["counts"]
    assert c["read"] == c["kept"] + c["quarantined"] + sum(c["dropped"].values())
    for k in ("items", "read", "kept", "quarantined"):
        assert c[k] == sum(s[k] for s in report["by_source"].values())
    for s in report["by_source"].values():
        assert s["read"] == s["kept"] + s["quarantined"] + sum(s["dropped"].values()) >= s["items"]
    assert c["kept"] == len(records(out, image=False))
    assert c["quarantined"] == len(quarantine(out))
    dropped = jsonl(out / "dropped.jsonl")
    assert len(dropped) == sum(c["dropped"].values()) and all(d["reason"] and d["source"] for d in dropped)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from medvl.synth.volumes import write_phantoms

    folder = tmp_path_factory.mktemp("phantoms")
    write_phantoms(folder, 6, shape=(24, 96, 96), seed=1)
    return folder


@pytest.fixture()
def synth_card(phantoms, monkeypatch):
    monkeypatch.setenv("MEDVL_SYNTH_3D", str(phantoms))
    return load_card(CARDS / "synthetic-3d.yaml")


# ---------------------------------------------------------------- cards


def test_card_errors_name_file_and_key(tmp_path):
    good = yaml.safe_load((CARDS / "synthetic-3d.yaml").read_text())
    for patch, key in [
        ({"colour": "x"}, "colour"),
        ({"department_by_region": {"Chest": "Cardiology"}}, "department_by_region"),
        ({"modality": "Sonar"}, "modality"),
        ({"options": {**good["options"], "slice_every": 2}}, "options.slice_every"),
    ]:
        p = tmp_path / "bad.yaml"
        p.write_text(yaml.safe_dump({**good, **patch}))
        with pytest.raises(CardError) as e:
            load_card(p)
        assert str(p) in str(e.value) and f"key '{key}" in str(e.value)
    for name in ("slake", "pydicom-samples", "pydicom-data-samples", "nibabel-samples", "synthetic-3d"):
        card = load_card(CARDS / f"{name}.yaml")
        assert card.research_only and card.license
    assert {p.stem for p in CARDS.glob("*.yaml")} >= {"bccd", "breastmnist", "spleen-ct", "spine-mri"}
    for path in CARDS.glob("*.yaml"):
        card = load_card(path)
        assert card.research_only and card.license and (card.labels() or not card.exhaustive_labels)
    # The split block and the label-space keys are checked like every other key, in one line.
    voc = {**good, "adapter": "voc", "options": {}}
    for patch, key, words in [
        (
            {"split": {"from": "files", "files": {"holdout": "h.txt"}}},
            "split.files",
            "unknown split 'holdout'",
        ),
        ({"split": {"from": "files"}}, "split", "`from: files` needs `files`"),
        (
            {"split": {"from": "pattern", "files": {"train": "t.txt"}}},
            "split",
            "`files` belongs to `from: files`",
        ),
        ({"split": {"from": "guess"}}, "split.from", "'files', 'pattern' or 'index'"),
        ({"split": {"from": "index", "precedence": ["test", "tst"]}}, "split.precedence", "named twice"),
        ({**voc, "split": {"from": "index"}}, "<card>", "reads no splits of its own"),
        ({"label_names": {}, "exhaustive_labels": True}, "<card>", "needs a label space"),
        ({"label_space": "lung"}, "label_space", "valid list"),
    ]:
        p = tmp_path / "bad.yaml"
        p.write_text(yaml.safe_dump({**good, **patch}))
        with pytest.raises(CardError) as e:
            load_card(p)
        assert f"key '{key}" in str(e.value) and words in str(e.value) and "\n" not in str(e.value), str(
            e.value
        )


# ---------------------------------------------------------------- SLAKE


@pytest.mark.skipif(not SLAKE.is_dir(), reason="shared SLAKE data not present")
def test_slake_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVL_SHARED_DATA", str(SHARED))
    card = load_card(CARDS / "slake.yaml")
    out = tmp_path / "slake"
    report = curate([card], out, workers=2, shard_records=256)
    assert_balanced(report, out)
    images = sorted(SLAKE.glob("imgs/*/source.jpg"))
    recs = {r["file"]: r for r in records(out, image=False)}
    dropped = {d["id"] for d in jsonl(out / "dropped.jsonl") if d["reason"] == "duplicate"}
    # Every image is a record (or an exact duplicate of one), with modality, region and department.
    assert report["counts"]["read"] == len(images) and report["counts"]["quarantined"] == 0
    assert len(recs) + len(dropped) == len(images)
    for r in recs.values():
        assert (
            r["modality"] in MODALITIES
            and r["body_region"] in BODY_REGIONS
            and r["department"] in DEPARTMENTS
        )
    # Boxes of detection.json are kept exactly ([x, y, w, h] -> x_min, y_min, x_max, y_max).
    for f, r in recs.items():
        given = [
            (k, v)
            for e in json.loads((SLAKE / f).with_name("detection.json").read_text())
            for k, v in e.items()
        ]
        assert [
            (b["label"], [b["x_min"], b["y_min"], b["x_max"] - b["x_min"], b["y_max"] - b["y_min"]])
            for b in r["boxes"]
        ] == given
    # Mask-derived boxes agree with the given ones on the images with masks.
    with_mask = [r for r in recs.values() if (SLAKE / r["file"]).with_name("mask.png").exists()]
    assert with_mask and all(r["mask_boxes"] or not r["boxes"] for r in with_mask)
    iou = report["mask_box_iou"]
    assert iou["n"] == sum(len(r["boxes"]) for r in with_mask) and iou["p50"] > 0.9
    # Splits come from the index files. They split questions, and some images have questions in several:
    # such an image takes the most held-out split that lists it (the card's precedence).
    listed = {
        split: {"imgs/" + q["img_name"] for q in json.loads((SLAKE / f).read_text())}
        for split, f in (("train", "train.json"), ("validation", "validate.json"), ("test", "test.json"))
    }
    assert listed["train"] & listed["test"]  # the premise of the precedence
    want = {f: "test" for f in listed["test"]}
    want |= {f: "validation" for f in listed["validation"] - listed["test"]}
    want |= {f: "train" for f in listed["train"] - listed["validation"] - listed["test"]}
    assert {f: r["split"] for f, r in recs.items()} == {f: want[f] for f in recs}
    assert report["by_source"]["slake"]["splits"] == dict(sorted(Counter(want[f] for f in recs).items()))
    # Not exhaustive, over the card's label space, which holds every label of every record.
    annotation = json.loads(next(iter(recs.values()))["annotation"])
    assert annotation["exhaustive"] is False and annotation["label_space"] == card.labels()
    assert all(set(r["labels"]) <= set(card.labels()) for r in recs.values())
    # Regions: one per label of the mask, plausible everywhere, and exactly the mask's on a known image.
    for r in with_mask:
        for g in json.loads(r["regions"]):
            assert 0 < g["area_share"] < 1 and g["label"] in card.label_names.values()
            assert (
                g["x_min"] <= g["cx"] * r["width"] <= g["x_max"]
                and g["y_min"] <= g["cy"] * r["height"] <= g["y_max"]
            )
    mask = np.asarray(Image.open(SLAKE / "imgs/xmlab0/mask.png").convert("L"))
    liver = next(v for v, name in card.label_names.items() if name == "Liver")
    ys, xs = np.nonzero(mask == liver)
    (region,) = [g for g in json.loads(recs["imgs/xmlab0/source.jpg"]["regions"]) if g["label"] == "Liver"]
    assert region["area_share"] == pytest.approx(len(xs) / mask.size, abs=1e-6)
    assert (region["cx"], region["cy"]) == pytest.approx(
        ((xs.mean() + 0.5) / mask.shape[1], (ys.mean() + 0.5) / mask.shape[0]), abs=1e-4
    )
    assert [region[k] for k in ("x_min", "y_min", "x_max", "y_max")] == [
        xs.min(),
        ys.min(),
        xs.max() + 1,
        ys.max() + 1,
    ]
    (given,) = [b for b in recs["imgs/xmlab0/source.jpg"]["boxes"] if b["label"] == "Liver"]
    assert box_iou(given, region) > 0.9  # the mask and detection.json outline the same liver
    card_md = (out / "dataset_card.md").read_text()
    assert "Research use only" in card_md and f"read {len(images)} =" in card_md
    for plot in ("original_task", "modality", "department", "clinical_task"):
        assert Image.open(out / "plots" / f"{plot}.png").size[0] > 100
    # Streams as a Hugging Face dataset, images decoded.
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train", streaming=True)
    first = next(iter(ds))
    assert first["image"].size == (first["width"], first["height"])
    # Re-running is a no-op: same shards, byte for byte.
    before = {p: p.read_bytes() for p in (out / "data").glob("*.parquet")}
    again = curate([card], out, workers=2, shard_records=256)
    assert again["counts"] == report["counts"]
    assert {p: p.read_bytes() for p in (out / "data").glob("*.parquet")} == before


# ---------------------------------------------------------------- 3D, resume, engines


def test_synthetic_3d_slices_boxes_and_windows(synth_card, phantoms, tmp_path):
    import SimpleITK as sitk

    out = tmp_path / "s3d"
    report = curate([synth_card], out, workers=1)
    assert_balanced(report, out)
    recs = [r for r in records(out) if r["kind"] == "image"]  # the slices (volumes: test_volumes.py)
    assert {r["file"] for r in recs} == {
        p.relative_to(phantoms).as_posix() for p in phantoms.glob("*/case????.nii.gz")
    }
    for r in recs:
        lab = sitk.GetArrayFromImage(
            sitk.ReadImage(str(phantoms / r["file"].replace(".nii.gz", "_seg.nii.gz")))
        )
        present = {synth_card.label_names[int(v)] for v in np.unique(lab[r["index"]]) if v}
        assert set(r["labels"]) == present  # every structure of the slice has a box, and nothing else
        assert r["body_region"] == r["file"].split("/")[0].capitalize()
        assert (
            json.loads(r["meta"])["ct_window"]
            == {"Chest": "lung", "Abdomen": "abdomen", "Head": "brain"}[r["body_region"]]
        )
        img = np.asarray(Image.open(io.BytesIO(r["image"]["bytes"])))
        assert img.shape == (r["height"], r["width"]) and img.std() > 0
    # Each label's slices are chosen (up to slices_per_label of them), so every label present appears.
    for f in {r["file"] for r in recs}:
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(phantoms / f.replace(".nii.gz", "_seg.nii.gz"))))
        got = {x for r in recs if r["file"] == f for x in r["labels"]}
        assert got == {synth_card.label_names[int(v)] for v in np.unique(lab) if v}


def test_resume_after_kill_matches_a_clean_run(synth_card, tmp_path):
    clean = curate([synth_card], tmp_path / "clean", workers=1, shard_records=5)
    out = tmp_path / "killed"
    curate([synth_card], out, workers=1, shard_records=5, limit=3)  # stopped after 3 items
    # What a kill mid-commit leaves: a temp file and a shard whose part JSON was never written.
    shutil.copy(next((out / "data").glob("*.parquet")), out / "data" / "part-00099.parquet")
    (out / "data" / "part-00100.parquet.tmp").write_bytes(b"partial")
    resumed = curate([synth_card], out, workers=2, shard_records=5)
    assert resumed["counts"] == clean["counts"]
    key = lambda r: (r["id"], r["sha256"], r["duplicate_of"])  # noqa: E731
    assert sorted(map(key, records(out))) == sorted(map(key, records(tmp_path / "clean")))
    assert not list(out.rglob("*.tmp"))


def write_xray(src: Path, n: int) -> Path:
    """n small X-ray-like JPEGs in two class folders, and their card."""
    rng = np.random.default_rng(5)
    for c in ("normal", "pneumonia"):
        (src / c).mkdir(parents=True)
    for i in range(n):
        small = rng.random((12, 12)) * 255
        img = np.asarray(Image.fromarray(small.astype(np.uint8)).resize((160, 160), Image.BILINEAR))
        Image.fromarray(img).save(src / ("normal", "pneumonia")[i % 2] / f"{i:04d}.jpg", quality=90)
    return write_card(src, name="xray", adapter="folder", modality="X-ray", department="Pulmonary Medicine")


def test_resume_after_sigkill_of_the_cli(tmp_path):
    """`medvl curate` is SIGKILLed (with its worker processes) once a shard is committed; re-running
    completes the job and the result equals a clean run's, byte for byte."""
    n = 300
    card = write_xray(tmp_path / "xray", n)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "medvl.cli", "curate", "--card", str(card), "--out", str(out)]
    committed = kill_9_after_commits([*cmd, "--workers", "2", "--shard-records", "10"], out)
    assert not (out / "report.json").exists()
    assert 0 < len(committed) < n  # killed mid-run, after at least one commit

    resumed = curate([load_card(card)], out, workers=1, shard_records=10)
    clean = curate([load_card(card)], tmp_path / "clean", workers=2, shard_records=10)
    assert resumed["counts"] == clean["counts"] and resumed["counts"]["items"] == n
    assert_balanced(resumed, out)
    committed = lambda o: {  # noqa: E731
        p.relative_to(o): p.read_bytes() for d in ("data", "parts") for p in (o / d).iterdir()
    }
    assert committed(out) == committed(tmp_path / "clean")
    items = committed_items(out)
    assert len(items) == len(set(items)) == n  # every item committed exactly once


def test_workers_end_when_the_cli_is_killed(tmp_path):
    """kill -9 of `medvl curate --workers 2` alone (not its process group): its workers end too."""
    from test_jobs import assert_children_die_with

    card = write_xray(tmp_path / "xray", 300)
    cmd = [sys.executable, "-m", "medvl.cli", "curate", "--card", str(card), "--out", str(tmp_path / "o")]
    proc = subprocess.Popen([*cmd, "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert_children_die_with(proc, 2)


@pytest.mark.slow  # starting Ray takes ~20 s here
def test_ray_engine_matches_local(synth_card, tmp_path):
    ray = pytest.importorskip("ray")
    local = curate([synth_card], tmp_path / "local", workers=1)
    if ray.is_initialized():  # an earlier test's job may have started Ray in this process
        ray.shutdown()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        remote = curate([synth_card], tmp_path / "ray", workers=1, engine="ray")
    finally:
        ray.shutdown()
    assert remote["counts"] == local["counts"]
    key = lambda r: (r["id"], r["sha256"], r["duplicate_of"])  # noqa: E731
    assert sorted(map(key, records(tmp_path / "ray"))) == sorted(map(key, records(tmp_path / "local")))


# ---------------------------------------------------------------- bad input, duplicates


def test_faults_are_quarantined_and_duplicates_counted(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "derm"
    for c in ("nevus", "melanoma"):
        (src / c).mkdir(parents=True)
    base = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    base = np.asarray(Image.fromarray(base).resize((128, 128)))  # smooth enough for a stable pHash
    Image.fromarray(base).save(src / "nevus" / "good.png")
    Image.fromarray((rng.random((128, 128, 3)) * 255).astype(np.uint8)).save(src / "nevus" / "other.png")
    shutil.copy(src / "nevus" / "good.png", src / "melanoma" / "exact_copy.png")
    Image.fromarray(np.clip(base.astype(int) + 3, 0, 255).astype(np.uint8)).save(
        src / "melanoma" / "near.jpg", quality=90
    )
    (src / "nevus" / "corrupt.png").write_bytes(rng.bytes(500))
    (src / "nevus" / "empty.png").write_bytes(b"")
    Image.fromarray(base).save(src / "nevus" / "whole.jpg")
    data = (src / "nevus" / "whole.jpg").read_bytes()
    (src / "nevus" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    Image.new("1", (20000, 20000)).save(src / "melanoma" / "bomb.png")  # 400 Mpx in a few kB
    Image.new("L", (1, 300)).save(src / "melanoma" / "sliver.png")
    card = write_card(
        src,
        name="derm",
        adapter="folder",
        max_pixels=10_000_000,
        dedup={"exact": "drop", "near": "drop", "near_distance": 6},
    )

    # Segmentation with a mask of the wrong size, detection with a box outside its image.
    seg = tmp_path / "seg"
    (seg / "images").mkdir(parents=True)
    (seg / "masks").mkdir()
    m = np.zeros((40, 50), np.uint8)
    m[5:10, 5:20] = 1
    m[20:30, 30:45] = 1
    m[30:35, 2:4] = 2
    Image.fromarray((rng.random((40, 50)) * 255).astype(np.uint8)).save(seg / "images" / "a.png")
    Image.fromarray(m).save(seg / "masks" / "a.png")
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(seg / "images" / "b.png")
    Image.fromarray(m).save(seg / "masks" / "b.png")
    seg_card = write_card(
        seg,
        name="seg",
        adapter="mask2d",
        label_names={1: "cyst", 2: "polyp"},
        modality="Ultrasound",
        original_task="2D segmentation",
    )
    coco = tmp_path / "coco"
    coco.mkdir()
    Image.fromarray((rng.random((60, 80)) * 255).astype(np.uint8)).save(coco / "x.png")
    Image.fromarray((rng.random((60, 80)) * 255).astype(np.uint8)).save(coco / "y.png")
    (coco / "ann.json").write_text(
        json.dumps(
            {
                "images": [
                    {"id": 1, "file_name": "x.png", "width": 80, "height": 60},
                    {"id": 2, "file_name": "y.png", "width": 80, "height": 60},
                ],
                "categories": [{"id": 1, "name": "polyp"}],
                "annotations": [
                    {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
                    {"image_id": 2, "category_id": 1, "bbox": [70, 50, 30, 30]},
                ],
            }
        )
    )
    coco_card = write_card(
        coco,
        name="coco",
        adapter="coco",
        modality="Endoscopy",
        options={"annotations": "ann.json"},
        original_task="2D detection",
        department="Gastroenterology and Hepatology",
    )

    out = tmp_path / "out"
    cards = [load_card(card), load_card(seg_card), load_card(coco_card)]
    report = curate(cards, out, workers=2)
    assert_balanced(report, out)
    q = {(e["source"], Path(e["file"]).name): e for e in quarantine(out)}
    expect = {
        ("derm", "corrupt.png"): "not a readable image",
        ("derm", "empty.png"): "empty file",
        ("derm", "truncated.jpg"): "truncated",
        ("derm", "bomb.png"): "pixel limit",
        ("derm", "sliver.png"): "degenerate",
        ("seg", "b.png"): "mask is",
        ("coco", "y.png"): "outside",
    }
    assert set(q) == set(expect)
    for k, words in expect.items():
        assert words in q[k]["problem"] and q[k]["field"]
    dups = [d for d in jsonl(out / "dropped.jsonl") if d["reason"] == "duplicate"]
    # Items run in sorted order, so melanoma/exact_copy.png is the first of the family and is kept.
    first = "derm/melanoma/exact_copy.png"
    assert {(d["id"], d["kind"], d["of"]) for d in dups} == {
        ("derm/nevus/good.png", "exact", first),
        ("derm/melanoma/near.jpg", "near", first),
        ("derm/nevus/whole.jpg", "near", first),
    }
    kept = {r["id"]: r for r in records(out)}
    assert (
        report["counts"]["dropped"]["duplicate"] == len(dups)
        and first in kept
        and "derm/nevus/other.png" in kept
    )
    # Mask -> one box per connected component per label.
    a = kept["seg/images/a.png"]
    assert sorted((b["label"], b["x_min"], b["y_min"], b["x_max"], b["y_max"]) for b in a["boxes"]) == [
        ("cyst", 5, 5, 20, 10),
        ("cyst", 30, 20, 45, 30),
        ("polyp", 2, 30, 4, 35),
    ]


def voc_xml(filename: str, size: tuple[int, int], objects: list[tuple[str, int, int, int, int]]) -> str:
    objs = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax>"
        "</bndbox></object>"
        for n, a, b, c, d in objects
    )
    return (
        f"<annotation><filename>{filename}</filename><size><width>{size[0]}</width>"
        f"<height>{size[1]}</height><depth>3</depth></size>{objs}</annotation>"
    )


def test_pascal_voc(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for name in ("ok", "bigger", "outside"):
        Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(
            root / "JPEGImages" / f"{name}.png"
        )
    ann = {
        "ok": voc_xml("ok.png", (64, 48), [("polyp", 1, 1, 10, 20), ("polyp", 30, 5, 64, 48)]),
        "bigger": voc_xml("bigger.png", (100, 80), [("polyp", 1, 1, 10, 10)]),  # says 100x80; is 64x48
        "outside": voc_xml("outside.png", (64, 48), [("polyp", 50, 10, 70, 20)]),  # xmax 70 > 64
        "missing": voc_xml("nowhere.png", (64, 48), [("polyp", 1, 1, 5, 5)]),
    }
    for name, xml in ann.items():
        (root / "Annotations" / f"{name}.xml").write_text(xml)
    (root / "Annotations" / "broken.xml").write_text("<annotation><filename>ok.png</filename><size>")
    card = write_card(
        root,
        name="voc",
        adapter="voc",
        modality="Endoscopy",
        original_task="2D detection",
        department="Gastroenterology and Hepatology",
    )
    out = tmp_path / "out"
    report = curate([load_card(card)], out, workers=1)
    assert_balanced(report, out)
    (rec,) = records(out)
    assert rec["id"] == "voc/JPEGImages/ok.png" and rec["labels"] == ["polyp"]
    assert json.loads(rec["meta"]) == {"annotation": "Annotations/ok.xml"}
    # VOC corners are 1-based inclusive: (1, 1, 10, 20) covers pixels 0..9 x 0..19.
    assert [(b["x_min"], b["y_min"], b["x_max"], b["y_max"]) for b in rec["boxes"]] == [
        (0, 0, 10, 20),
        (29, 4, 64, 48),
    ]
    q = {Path(e["file"]).name: e for e in quarantine(out)}
    assert set(q) == {"bigger.xml", "outside.png", "missing.xml", "broken.xml"}
    assert q["bigger.xml"]["field"] == "size" and "(100, 80)" in q["bigger.xml"]["problem"]
    assert q["outside.png"]["field"] == "boxes" and "outside the 64x48 image" in q["outside.png"]["problem"]
    assert "JPEGImages/nowhere.png not found" in q["missing.xml"]["problem"]
    assert "malformed VOC annotation" in q["broken.xml"]["problem"]


def test_label_tables_csv_and_json(tmp_path):
    root = tmp_path / "fundus"
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(2)
    for i in range(3):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(root / "img" / f"{i}.png")
    (root / "labels.csv").write_text(
        "file,diagnosis\n0.png,glaucoma\n1.png,cataract|myopia\n2.png,\nmissing.png,normal\n"
    )
    (root / "labels.json").write_text(
        json.dumps(
            [{"file": "0.png", "diagnosis": ["glaucoma", "myopia"]}, {"file": "gone.png", "diagnosis": "x"}]
        )
    )
    common = dict(
        modality="Fundus Photography",
        department="Ophthalmology",
        dedup={"exact": "keep", "near": "keep"},
    )
    csv_opts = {"file": "labels.csv", "image_column": "file", "label_column": "diagnosis", "separator": "|"}
    csv_card = write_card(
        root, name="fundus-csv", adapter="table", options={**csv_opts, "images_dir": "img"}, **common
    )
    json_opts = {**csv_opts, "file": "labels.json"}
    json_card = write_card(
        root, name="fundus-json", adapter="table", options={**json_opts, "images_dir": "img"}, **common
    )
    out = tmp_path / "out"
    report = curate([load_card(csv_card), load_card(json_card)], out, workers=1)
    assert_balanced(report, out)
    got = {r["id"]: r["labels"] for r in records(out, image=False)}
    assert got == {
        "fundus-csv/img/0.png": ["glaucoma"],
        "fundus-csv/img/1.png": ["cataract", "myopia"],
        "fundus-json/img/0.png": ["glaucoma", "myopia"],
    }
    q = {(e["source"], e["file"]): e for e in quarantine(out)}
    assert set(q) == {
        ("fundus-csv", "labels.csv#2"),
        ("fundus-csv", "labels.csv#3"),
        ("fundus-json", "labels.json#1"),
    }
    assert "empty label" in q[("fundus-csv", "labels.csv#2")]["problem"]
    assert "image img/missing.png not found" in q[("fundus-csv", "labels.csv#3")]["problem"]
    # A column the table does not have is a card error: the run stops and names file and column.
    bad = write_card(
        root, name="fundus-bad", adapter="table", options={**csv_opts, "label_column": "dx"}, **common
    )
    with pytest.raises(ValueError, match=r"labels.csv: no column 'dx' \(columns: file, diagnosis\)"):
        curate([load_card(bad)], tmp_path / "bad", workers=1)


def test_mask_boxes_and_iou_units():
    lab = np.zeros((10, 12), np.uint8)
    lab[1:3, 1:4] = 1
    lab[6:9, 8:11] = 1
    lab[4, 4] = 2
    boxes = mask_boxes(lab, {1: "a", 2: "b"})
    assert sorted((b["label"], b["x_min"], b["y_min"], b["x_max"], b["y_max"]) for b in boxes) == [
        ("a", 1, 1, 4, 3),
        ("a", 8, 6, 11, 9),
        ("b", 4, 4, 5, 5),
    ]
    # Regions pool every component of a label (values naming one label pool too): share of the image's
    # pixels, centroid of pixel centres as fractions, box around all of them.
    regions = mask_regions(lab, {1: "a", 2: "a", 3: "c"})
    assert regions == [
        dict(
            label="a",
            area_share=round(16 / 120, 6),
            cx=round(105 / 16 / 12, 4),
            cy=round(84 / 16 / 10, 4),
            x_min=1,
            y_min=1,
            x_max=11,
            y_max=9,
        )
    ]
    assert mask_regions(lab, {7: "none"}) == []
    a = dict(x_min=0, y_min=0, x_max=10, y_max=10)
    assert box_iou(a, a) == 1.0 and box_iou(a, dict(x_min=5, y_min=0, x_max=15, y_max=10)) == pytest.approx(
        1 / 3
    )


# ---------------------------------------------------------------- DICOM privacy and shipped samples


PHI = {
    "PatientName": "Quixotic^Zebulon",
    "PatientID": "PID-7731-XQ",
    "PatientBirthDate": "19230517",
    "PatientAddress": "42 Nowhere Lane Fakeville",
    "InstitutionName": "Saint Imaginary Hospital",
    "ReferringPhysicianName": "Drofnats^Ulysses",
    "AccessionNumber": "ACC99887766",
    "StudyDate": "20991231",
    "StudyInstanceUID": "1.2.826.0.1.3680043.99.123456789",
    "OtherPatientIDs": "ALTID-5550001",
}


def assert_no_phi(out: Path, *texts: str) -> None:
    """No identifier, in any spelling pydicom or a log could give it, in any output byte or text."""
    blobs = [p.read_bytes() for p in out.rglob("*") if p.is_file()] + [t.encode() for t in texts]
    for v in PHI.values():
        for needle in {v, v.replace("^", " "), v.split("^")[0]}:
            assert not any(needle.encode() in b for b in blobs), needle


def write_ct_series(
    folder: Path, hu: np.ndarray, spacing_rc: tuple[float, float], thickness: float, seed: int
):
    """One uint16 file per slice with a rescale slope/intercept, in an orientation that is *not* LPS:
    rows run towards the patient's right (IOP [-1, 0, 0, 0, 1, 0]), so stored columns are mirrored and
    the slice normal points down; file names are a shuffled order of the slices."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    d, h, w = hu.shape
    order = np.random.default_rng(seed).permutation(d)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(d):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = uid = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        for kw, v in PHI.items():
            setattr(ds, kw, v)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.BodyPartExamined, ds.InstanceNumber = "CT", "ABDOMEN", int(order[k]) + 1
        ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [(w - 1) * spacing_rc[1], 0.0, k * thickness]
        ds.PixelSpacing, ds.SliceThickness = list(spacing_rc), thickness
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = h, w, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 0.5, -1024
        ds.PixelData = ((hu[k, :, ::-1].astype(np.int32) + 1024) * 2).astype(np.uint16).tobytes()
        ds.save_as(folder / f"{order[k]:03d}.dcm", enforce_file_format=True)


def test_dicom_series_with_label_volume(tmp_path, capfd):
    import SimpleITK as sitk

    from medvl.imaging import ct_window
    from medvl.synth.phantom import LABELS, make_phantom

    rng = np.random.default_rng(3)
    p = make_phantom("abdomen", (10, 48, 40), rng, lesion=True)
    # Two slices of unlabelled (noisy) soft tissue above the organs: the negatives a scan has.
    tissue = (40 + rng.normal(0, 15, (2, 48, 40))).astype(np.int16)
    hu = np.clip(np.concatenate([p.hu, tissue]), -1024, None)  # stored as unsigned with intercept -1024
    lab = np.concatenate([p.labels, np.zeros((2, 48, 40), np.uint8)])
    spacing_rc, thickness = (0.8, 0.4), 2.5  # rows 0.8 mm apart, columns 0.4 mm: not square
    root = tmp_path / "ct"
    write_ct_series(root / "abd" / "case01", hu, spacing_rc, thickness, seed=0)
    label_img = sitk.GetImageFromArray(lab)  # LPS, origin at the first voxel: the series' own grid
    label_img.SetSpacing((spacing_rc[1], spacing_rc[0], thickness))
    sitk.WriteImage(label_img, str(root / "abd" / "case01_seg.nii.gz"))
    # Bad copies: a label volume on another grid; a series folder with a file that is not DICOM.
    shutil.copytree(root / "abd" / "case01", root / "abd" / "case02")
    label_img.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(label_img, str(root / "abd" / "case02_seg.nii.gz"))
    shutil.copytree(root / "abd" / "case01", root / "abd" / "case03")
    shutil.copy(root / "abd" / "case01_seg.nii.gz", root / "abd" / "case03_seg.nii.gz")
    (root / "abd" / "case03" / "999.dcm").write_bytes(b"not dicom" * 50)
    card = write_card(
        root,
        name="ctseries",
        adapter="dicom",
        modality=None,
        department_by_region={"Abdomen": "Gastroenterology and Hepatology"},
        department=None,
        original_task="3D segmentation",
        clinical_task="Organ Recognition",
        label_names=LABELS,
        dedup={"exact": "drop", "near": "keep"},
        options={"series": True, "labels": "{dir}/{name}_seg.nii.gz", "slices_per_label": 3, "negatives": 2},
    )
    out = tmp_path / "out"
    report = curate([load_card(card)], out, workers=1)
    assert_balanced(report, out)
    recs = sorted(records(out), key=lambda r: r["index"])
    q = {e["file"]: e for e in quarantine(out)}
    assert set(q) == {"abd/case02_seg.nii.gz", "abd/case03"} and len(recs) == report["counts"]["kept"]
    assert (
        "label spacing [1.0, 1.0, 1.0] mm != image [0.4, 0.8, 2.5] mm"
        in q["abd/case02_seg.nii.gz"]["problem"]
    )
    assert "1 of 13 files are not part of the series" in q["abd/case03"]["problem"]
    assert {r["id"] for r in recs} == {f"ctseries/abd/case01#slice{r['index']}" for r in recs}
    names = {int(v): LABELS[int(v)] for v in np.unique(lab) if v}
    assert {x for r in recs for x in r["labels"]} == set(names.values())  # every structure is shown
    assert {10, 11} <= {r["index"] for r in recs}  # the two label-free slices are the negatives
    for r in recs:
        k, meta = r["index"], json.loads(r["meta"])
        assert r["modality"] == "CT" and r["body_region"] == "Abdomen"
        assert meta["ct_window"] == "abdomen" and meta["axis"] == "axial"
        assert meta["spacing_mm"] == list(spacing_rc) and meta["RescaleSlope"] == 0.5
        # Square pixels: 48 rows of 0.8 mm become 96 of 0.4 mm; columns stay.
        assert (r["height"], r["width"]) == (96, 40)
        img = np.asarray(Image.open(io.BytesIO(r["image"]["bytes"]))).astype(float)
        # Slice k is phantom slice k, upright and not mirrored (rescale applied, file order ignored).
        want = ct_window(hu[k], "abdomen").astype(float)
        assert np.abs(img[::2] - want).mean() < 4
        # Boxes: per label, their union is the label's extent in slice k, rows scaled by 2 (nearest).
        assert set(r["labels"]) == {names[int(v)] for v in np.unique(lab[k]) if v}
        for v in np.unique(lab[k])[1:]:
            ys, xs = np.nonzero(lab[k] == v)
            bs = [b for b in r["boxes"] if b["label"] == names[int(v)]]
            got = (min(b["x_min"] for b in bs), min(b["y_min"] for b in bs))
            got += (max(b["x_max"] for b in bs), max(b["y_max"] for b in bs))
            assert got == (xs.min(), 2 * ys.min(), xs.max() + 1, 2 * ys.max() + 2)
    # Radiological view: the liver (patient's right) on the image's left, the spleen on its right.
    centre = lambda r, label: [(b["x_min"] + b["x_max"]) / 2 for b in r["boxes"] if b["label"] == label]  # noqa: E731
    assert all(x < 20 for r in recs for x in centre(r, "liver")) and any(centre(r, "liver") for r in recs)
    assert all(x > 20 for r in recs for x in centre(r, "spleen")) and any(centre(r, "spleen") for r in recs)
    captured = capfd.readouterr()
    assert_no_phi(out, captured.out, captured.err)
    meta = json.loads(recs[0]["meta"])
    assert "PatientName" not in meta and "InstitutionName" not in meta
    assert meta["StudyInstanceUID"] != PHI["StudyInstanceUID"]


def test_dicom_identifiers_never_reach_the_output(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for k, v in PHI.items():
        setattr(ds, k, v)
    folder = tmp_path / "dicom"
    folder.mkdir()
    ds.save_as(folder / "scan.dcm")
    card = write_card(
        folder,
        name="dicomphi",
        adapter="dicom",
        modality=None,
        department="Oncology",
        options={"images": "*.dcm"},
    )
    out = tmp_path / "out"
    report = curate([load_card(card)], out, workers=1)
    assert report["counts"]["kept"] == 1
    rec = records(out)[0]
    assert rec["modality"] == "CT" and json.loads(rec["meta"])["Modality"] == "CT"
    # Raw bytes of every output file, and every decoded value (Parquet pages are compressed).
    assert_no_phi(out, json.dumps({k: v for k, v in rec.items() if k != "image"}, default=str))


def test_shipped_dicom_and_nifti_samples(tmp_path):
    cards = [
        load_card(CARDS / f"{n}.yaml") for n in ("pydicom-samples", "pydicom-data-samples", "nibabel-samples")
    ]
    out = tmp_path / "samples"
    report = curate(cards, out, workers=2)
    assert_balanced(report, out)
    for name, s in report["by_source"].items():
        assert s["kept"] > 0, name
    q = {e["file"]: e for e in quarantine(out)}
    assert "no image" in q["rtplan.dcm"]["problem"] and q["rtplan.dcm"]["field"] == "PixelData"
    assert "4D" in q["functional.nii"]["problem"]
    kept = records(out)
    assert {"CT", "MR", "Ultrasound"} <= {r["modality"] for r in kept}
    assert all(r["id"].startswith(r["source"] + "/" + r["file"]) for r in kept)
    # The same image shipped in several transfer syntaxes is caught as an exact duplicate.
    assert report["counts"]["dropped"]["duplicate"] > 0


# ---------------------------------------------------------------- video


def endoscopy_frames(n: int, h: int = 80, w: int = 96, seed: int = 0) -> list[np.ndarray]:
    """Reddish mucosa under a vignette, with a bright polyp drifting 3 px right per frame (so a kept
    frame's index can be read back from its pixels, through lossy coding)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    tissue = np.kron(rng.random((h // 8, w // 8)), np.ones((8, 8)))
    vignette = np.clip(1.2 - np.hypot(yy - h / 2, xx - w / 2) / (0.6 * w), 0, 1)[..., None]
    base = np.stack([150 + 60 * tissue, 60 + 30 * tissue, 70 + 30 * tissue], -1) * vignette
    frames = []
    for i in range(n):
        f = base.copy()
        f[np.hypot(yy - h / 2, xx - (12 + 3 * i)) < 6] = (250, 235, 225)
        frames.append(f.astype(np.uint8))
    return frames


def polyp_frame_index(img: np.ndarray) -> int:
    cols = np.nonzero((img.astype(int).sum(-1) > 650).any(axis=0))[0]
    return round((cols.mean() - 12) / 3)


def write_mp4(path: Path, frames: list[np.ndarray], fps: int, faststart: bool = False) -> None:
    import av

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())  # flush


def test_video_frames_at_rate(tmp_path):
    clips = tmp_path / "clips"
    (clips / "polyp").mkdir(parents=True)
    (clips / "normal").mkdir()
    frames = endoscopy_frames(20)
    # MP4 (PyAV): 2 s at 10 fps, with the index (moov) at the end and, for the second, at the start.
    write_mp4(clips / "polyp" / "a.mp4", frames, fps=10)
    write_mp4(clips / "normal" / "f.mp4", frames[::-1], fps=10, faststart=True)
    for name in ("a", "f"):
        src = next(clips.glob(f"*/{name}.mp4"))
        src.with_name(f"{name}_truncated.mp4").write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    (clips / "polyp" / "junk.avi").write_bytes(b"RIFF\x00\x00\x00\x00AVI junk")
    # GIF at 200 ms a frame, and a folder of frames (no timing: source_fps).
    small = [Image.fromarray(f[::2, ::2]) for f in frames[:10]]
    small[0].save(clips / "polyp" / "b.gif", save_all=True, append_images=small[1:], duration=200, loop=0)
    (clips / "polyp" / "c").mkdir()
    for i, f in enumerate(small[:6]):
        f.save(clips / "polyp" / "c" / f"{i:03d}.png")
    card = write_card(
        clips,
        name="endo",
        adapter="video",
        modality="Endoscopy",
        original_task="video",
        department="Gastroenterology and Hepatology",
        options={"fps": 2.0, "source_fps": 5.0},
        dedup={"exact": "keep", "near": "keep"},
    )
    out = tmp_path / "out"
    report = curate([load_card(card)], out, workers=1)
    assert_balanced(report, out)
    by_clip: dict[str, list] = {}
    for r in records(out):
        by_clip.setdefault(r["file"], []).append(r)
        assert r["labels"] == [r["file"].split("/")[0]] and r["index_kind"] == "frame"
    # 10 fps sampled at 2 fps: frames 0, 5, 10, 15 (0 .. 1.5 s), read back from the polyp's position.
    for clip, order in (("polyp/a.mp4", range(20)), ("normal/f.mp4", range(19, -1, -1))):
        kept = sorted(by_clip[clip], key=lambda r: r["index"])
        assert [r["index"] for r in kept] == [0, 5, 10, 15]
        assert [json.loads(r["meta"])["time_s"] for r in kept] == [0.0, 0.5, 1.0, 1.5]
        decoded = [np.asarray(Image.open(io.BytesIO(r["image"]["bytes"]))) for r in kept]
        assert [polyp_frame_index(d) for d in decoded] == [order[i] for i in (0, 5, 10, 15)]
        assert decoded[0].shape == (80, 96, 3)
    # GIF: 200 ms a frame; at 2 fps the frame on screen at 0, .5, 1, 1.5 s. Folder: 5 fps, 6 frames.
    assert sorted(r["index"] for r in by_clip["polyp/b.gif"]) == [0, 2, 5, 7]
    assert sorted(r["index"] for r in by_clip["polyp/c"]) == [0, 2, 5]
    q = {e["file"]: e for e in quarantine(out)}
    assert set(q) == {"polyp/a_truncated.mp4", "normal/f_truncated.mp4", "polyp/junk.avi"}
    assert "not a readable video" in q["polyp/a_truncated.mp4"]["problem"]  # its index never arrived
    assert "truncated" in q["normal/f_truncated.mp4"]["problem"]  # index first, frames cut off
    assert "not a readable video" in q["polyp/junk.avi"]["problem"]
    assert not any("truncated" in f or "junk" in f for f in by_clip)  # quarantined whole, no frames kept


def test_cli(tmp_path, synth_card):
    import typer
    from typer.testing import CliRunner

    from medvl.curate.cli import curate as curate_cmd

    app = typer.Typer()
    app.command()(curate_cmd)
    res = CliRunner().invoke(app, ["--card", str(CARDS / "synthetic-3d.yaml"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert f"read {report['counts']['read']} = kept {report['counts']['kept']}" in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n")
    res = CliRunner().invoke(app, ["--card", str(bad), "--out", str(tmp_path / "p")])
    assert res.exit_code == 2 and "bad.yaml" in res.output


# ---------------------------------------------------------------- the other real sources, splits, npz


@pytest.mark.skipif(not (SHARED / "breastmnist").is_dir(), reason="shared data not present")
def test_real_sources_curate_with_their_splits(tmp_path, monkeypatch):
    """BCCD, BreastMNIST, the spleen CT and the spine MRI in one run, each by its shipped card."""
    monkeypatch.setenv("MEDVL_SHARED_DATA", str(SHARED))
    names = ("bccd", "breastmnist", "spleen-ct", "spine-mri")
    cards = [load_card(CARDS / f"{n}.yaml") for n in names]
    out = tmp_path / "real"
    report = curate(cards, out, workers=2)
    assert_balanced(report, out)
    assert report["counts"]["quarantined"] == 0 and not report["counts"]["dropped"]
    recs = records(out, image=False)
    by = {n: [r for r in recs if r["source"] == n] for n in names}
    for r in recs:
        assert (
            r["modality"] in MODALITIES
            and r["body_region"] in BODY_REGIONS
            and r["department"] in DEPARTMENTS
        )
        assert set(r["labels"]) <= set(json.loads(r["annotation"])["label_space"])

    # BreastMNIST: one record per array row, split by array prefix, with MedMNIST's counts.
    npz = np.load(SHARED / "breastmnist" / "breastmnist.npz")
    want = {
        "train": len(npz["train_images"]),
        "validation": len(npz["val_images"]),
        "test": len(npz["test_images"]),
    }
    assert (
        Counter(r["split"] for r in by["breastmnist"])
        == want
        == {"train": 546, "validation": 78, "test": 156}
    )
    row = next(r for r in by["breastmnist"] if r["id"] == "breastmnist/breastmnist.npz/test_images#row3")
    assert (row["file"], row["index"], row["index_kind"], row["width"]) == (
        "breastmnist.npz/test_images",
        3,
        "row",
        28,
    )
    assert row["labels"] == [["malignant", "normal or benign"][int(npz["test_labels"][3])]]
    assert json.loads(row["annotation"]) == {
        "exhaustive": True,
        "label_space": ["malignant", "normal or benign"],
        "groups": {"malignant": "Disease Diagnosis", "normal or benign": "Disease Diagnosis"},
    }
    # The source's one pixel-identical train/test pair is kept and marked, not dropped.
    leaks = [r for r in by["breastmnist"] if r["duplicate_of"] and r["split"] == "test"]
    assert any(r["duplicate_of"].startswith("breastmnist/breastmnist.npz/train_images#") for r in leaks)

    # BCCD: ImageSets/Main's lists, labels renamed, not exhaustive.
    main = SHARED / "bccd" / "BCCD" / "ImageSets" / "Main"
    lists = {
        s: set(main.joinpath(f"{f}.txt").read_text().split())
        for s, f in [("train", "train"), ("validation", "val"), ("test", "test")]
    }
    assert {Path(r["file"]).stem: r["split"] for r in by["bccd"]} == {
        k: s for s, ks in lists.items() for k in ks
    }
    assert {x for r in by["bccd"] for x in r["labels"]} == {"red blood cell", "white blood cell", "platelet"}
    assert json.loads(by["bccd"][0]["annotation"])["exhaustive"] is False
    assert all(json.loads(r["regions"]) == [] for r in by["bccd"])  # boxes, no masks

    # Volumes: no split of their own; each labelled slice has the label's region, inside its boxes.
    for name, label in (("spleen-ct", "spleen"), ("spine-mri", "spinal cord")):
        slices = [r for r in by[name] if r["kind"] == "image"]  # the volumes: test_volumes.py
        assert (
            slices and {r["split"] for r in slices} == {""} and {r["index_kind"] for r in slices} == {"slice"}
        )
        ann = json.loads(slices[0]["annotation"])
        assert (ann["exhaustive"], ann["label_space"], list(ann["groups"])) == (True, [label], [label])
        for r in slices:
            regions = json.loads(r["regions"])
            assert [g["label"] for g in regions] == ([label] if r["labels"] else [])
            for g in regions:
                assert 0 < g["area_share"] < 1
                assert (
                    min(b["x_min"] for b in r["boxes"]) == g["x_min"]
                    and max(b["y_max"] for b in r["boxes"]) == g["y_max"]
                )
    assert {r["file"] for r in by["spine-mri"]} == {"t1/t1w.nii.gz", "t2/t2.nii.gz"}  # masks are no images
    assert report["by_source"]["breastmnist"]["splits"] == dict(sorted(want.items()))


def write_npz(path: Path, **arrays) -> None:
    np.savez_compressed(path, **arrays)


def test_npz_arrays_and_their_faults(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "mnist"
    root.mkdir()
    img = lambda n: rng.integers(0, 256, (n, 12, 12), dtype=np.uint8)  # noqa: E731
    write_npz(
        root / "good.npz",
        train_images=img(5),
        train_labels=np.array([[0], [1], [2], [1], [0]], np.uint8),  # (N, 1) as MedMNIST ships it
        val_images=img(2),
        val_labels=np.array([1, 0]),
        test_images=img(3),
        test_labels=np.array([0, 9, 1]),  # class 9 is not in the card
    )
    write_npz(root / "short.npz", train_images=img(4), train_labels=np.array([0, 1, 0]))
    write_npz(root / "floats.npz", train_images=img(2).astype(np.float32), train_labels=np.array([0, 1]))
    write_npz(root / "nolabels.npz", test_images=img(2))
    write_npz(root / "other.npz", x=np.zeros(3))
    (root / "junk.npz").write_bytes(b"PK\x03\x04 not a zip")
    card = write_card(
        root,
        name="mnist",
        adapter="npz",
        modality="Ultrasound",
        label_names={0: "a", 1: "b", 2: "c"},
        exhaustive_labels=True,
        split={"from": "index"},
        options={"rows_per_item": 2},
    )
    out = tmp_path / "out"
    report = curate([load_card(card)], out, workers=1)
    assert_balanced(report, out)
    got = {r["id"]: (r["split"], r["labels"]) for r in records(out, image=False)}
    assert got == {
        "mnist/good.npz/train_images#row0": ("train", ["a"]),
        "mnist/good.npz/train_images#row1": ("train", ["b"]),
        "mnist/good.npz/train_images#row2": ("train", ["c"]),
        "mnist/good.npz/train_images#row3": ("train", ["b"]),
        "mnist/good.npz/train_images#row4": ("train", ["a"]),
        "mnist/good.npz/val_images#row0": ("validation", ["b"]),
        "mnist/good.npz/val_images#row1": ("validation", ["a"]),
        "mnist/good.npz/test_images#row0": ("test", ["a"]),
        "mnist/good.npz/test_images#row2": ("test", ["b"]),
    }
    q = quarantine(out)
    lines = {(e["file"], e["field"]): e["problem"] for e in q}
    assert all("\n" not in e["problem"] for e in q)
    # A class the card does not name quarantines its row alone (row 0 of the same item is kept).
    assert lines[("good.npz/test_images", "labels")].startswith("label '9' is not in the card's label space")
    assert [e["index"] for e in q if e["field"] == "labels"] == [1]
    assert lines[("short.npz", "train_labels")] == "3 labels for 4 images"
    assert "expected uint8 (N, H, W) or (N, H, W, 3), got float32" in lines[("floats.npz", "train_images")]
    assert lines[("nolabels.npz", "test_labels")] == "array missing"
    assert lines[("other.npz", "arrays")] == "no train/val/test_images arrays (has x)"
    assert lines[("junk.npz", "arrays")] == "not a readable .npz (zip) file"
    # A bad array quarantines each of its items (runs of rows), the rest of the file is kept.
    assert sum(e["file"] == "short.npz" for e in q) == 2


def test_split_lists_patterns_and_precedence(tmp_path):
    rng = np.random.default_rng(5)
    root = tmp_path / "derm"
    for c in ("nevus", "melanoma"):
        (root / c).mkdir(parents=True)
    for i, c in enumerate(["nevus"] * 3 + ["melanoma"] * 3):
        Image.fromarray((rng.random((24, 24, 3)) * 255).astype(np.uint8)).save(root / c / f"im{i}.png")
    sets = root / "sets"
    sets.mkdir()
    (sets / "train.txt").write_text("im0\nim1\n\n# a comment\nim3\n")
    (sets / "val.txt").write_text("im2\nim3\n")  # im3 is in two lists
    (sets / "test.txt").write_text("melanoma/im4.png\n")  # a path: reduced to its stem
    common = dict(
        adapter="folder", label_space=["nevus", "melanoma"], dedup={"exact": "keep", "near": "keep"}
    )
    files = {"train": "sets/train.txt", "val": "sets/val.txt", "test": "sets/test.txt"}
    strict = write_card(root, name="lists", split={"from": "files", "files": files}, **common)
    out = tmp_path / "lists"
    report = curate([load_card(strict)], out, workers=1)
    assert_balanced(report, out)
    got = {Path(r["file"]).stem: r["split"] for r in records(out, image=False)}
    assert got == {"im0": "train", "im1": "train", "im2": "validation", "im4": "test", "im5": ""}
    (e,) = quarantine(out)
    assert (e["file"], e["field"]) == ("melanoma/im3.png", "split")
    assert (
        e["problem"]
        == "listed in 2 splits: train (sets/train.txt), validation (sets/val.txt) (no `precedence`)"
    )
    # With a precedence the item takes the first split listed there that lists it.
    ranked = write_card(
        root, name="ranked", split={"from": "files", "files": files, "precedence": ["test", "val"]}, **common
    )
    curate([load_card(ranked)], tmp_path / "ranked", workers=1)
    assert {Path(r["file"]).stem: r["split"] for r in records(tmp_path / "ranked", image=False)}[
        "im3"
    ] == "validation"
    # Glob patterns on the file.
    pattern = write_card(
        root,
        name="globs",
        split={"from": "pattern", "patterns": {"nevus/*": "training", "*/im[45].png": "dev"}},
        **common,
    )
    curate([load_card(pattern)], tmp_path / "globs", workers=1)
    got = {Path(r["file"]).stem: r["split"] for r in records(tmp_path / "globs", image=False)}
    assert got == {
        "im0": "train",
        "im1": "train",
        "im2": "train",
        "im3": "",
        "im4": "validation",
        "im5": "validation",
    }
    # A list file that is missing stops the run in one line naming it, before anything is written.
    missing = write_card(
        root, name="missing", split={"from": "files", "files": {**files, "test": "sets/nope.txt"}}, **common
    )
    with pytest.raises(InputError) as err:
        curate([load_card(missing)], tmp_path / "missing", workers=1)
    assert str(err.value).startswith("sets/nope.txt: split: test list file not found") and "\n" not in str(
        err.value
    )
    assert not (tmp_path / "missing" / "data").exists()
    # A label outside a declared label space is quarantined, not silently kept.
    narrow = write_card(root, name="narrow", adapter="folder", label_space=["nevus"])
    curate([load_card(narrow)], tmp_path / "narrow", workers=1)
    assert {e["field"] for e in quarantine(tmp_path / "narrow")} == {"labels"}
    assert len(quarantine(tmp_path / "narrow")) == 3


def test_synthetic_images_curate_by_their_card(tmp_path):
    """The card medvl synth writes beside its images curates them like any source."""
    from medvl.synth.benchmark import write_quickstart_dataset

    data = tmp_path / "data"
    paths = write_quickstart_dataset(data, n_train=30, n_bench=12, seed=3, size=64)
    card = load_card(paths["card"])
    out = tmp_path / "curated"
    report = curate([card], out, workers=1)
    assert_balanced(report, out)
    assert report["counts"]["quarantined"] == 0 and not report["counts"]["dropped"]
    synth = {r["image"]: r for r in read_rows([paths["records"], paths["bench_records"]])}
    recs = {r["file"]: r for r in records(out, image=False)}
    assert set(recs) == set(synth)
    for f, r in recs.items():
        s = synth[f]
        assert r["split"] == ("train" if s["id"].startswith("train_") else "test")
        grade = [] if s["grade"] is None else [f"grade {s['grade']}"]
        finding = [] if s["finding"] == "no finding" else [s["finding"]]
        assert r["labels"] == [s["anatomy"], *finding, *grade]
        assert r["modality"] == s["modality"] and r["department"] == s["department"]
        boxes = [(b["label"], [b["x_min"], b["y_min"], b["x_max"], b["y_max"]]) for b in r["boxes"]]
        assert boxes == ([] if s["bbox"] is None else [(s["finding"], s["bbox"])])
        assert json.loads(r["annotation"])["exhaustive"] is True
        assert (r["width"], r["height"]) == (s["width"], s["height"])
    assert Counter(r["split"] for r in recs.values()) == {"train": 30, "test": 12}
    assert sum("no finding" not in r["labels"] for r in recs.values()) == len(recs)
