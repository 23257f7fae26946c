"""Curation on real files: SLAKE (shared data), the DICOM/NIfTI samples shipped by pydicom, pydicom-data
and nibabel, synthetic phantoms written as NIfTI, and small bad inputs written here."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from medvl.curate.card import CardError, load_card
from medvl.curate.images import box_iou, mask_boxes
from medvl.curate.pipeline import curate
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
    return [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]


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


def assert_balanced(report: dict) -> None:
    c = report["counts"]
    assert c["read"] == c["kept"] + c["quarantined"] + c["duplicates"]
    for s in report["by_source"].values():
        assert s.get("read", 0) == s.get("kept", 0) + s.get("quarantined", 0) + s.get("duplicates", 0)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from medvl.curate.synthetic import write_phantoms

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


# ---------------------------------------------------------------- SLAKE


@pytest.mark.skipif(not SLAKE.is_dir(), reason="shared SLAKE data not present")
def test_slake_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVL_SHARED_DATA", str(SHARED))
    card = load_card(CARDS / "slake.yaml")
    out = tmp_path / "slake"
    report = curate([card], out, workers=2, shard_records=256)
    assert_balanced(report)
    images = sorted(SLAKE.glob("imgs/*/source.jpg"))
    recs = {r["file"]: r for r in records(out, image=False)}
    dropped = {
        d["id"] for d in map(json.loads, (out / "duplicates.jsonl").read_text().splitlines()) if d["drop"]
    }
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
    assert_balanced(report)
    recs = records(out)
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


@pytest.mark.slow  # starting Ray takes ~20 s here
def test_ray_engine_matches_local(synth_card, tmp_path):
    ray = pytest.importorskip("ray")
    local = curate([synth_card], tmp_path / "local", workers=1)
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
    assert_balanced(report)
    q = {(e["source"], Path(e["file"]).name): e for e in quarantine(out)}
    expect = {
        ("derm", "corrupt.png"): "not a readable image",
        ("derm", "empty.png"): "empty file",
        ("derm", "truncated.jpg"): "truncated",
        ("derm", "bomb.png"): "exceeds max_pixels",
        ("derm", "sliver.png"): "degenerate",
        ("seg", "b.png"): "mask is",
        ("coco", "y.png"): "outside",
    }
    assert set(q) == set(expect)
    for k, words in expect.items():
        assert words in q[k]["problem"] and q[k]["field"]
    dups = [json.loads(line) for line in (out / "duplicates.jsonl").read_text().splitlines()]
    # Items run in sorted order, so melanoma/exact_copy.png is the first of the family and is kept.
    first = "derm/melanoma/exact_copy.png"
    assert {(d["id"], d["kind"], d["of"]) for d in dups} == {
        ("derm/nevus/good.png", "exact", first),
        ("derm/melanoma/near.jpg", "near", first),
        ("derm/nevus/whole.jpg", "near", first),
    }
    kept = {r["id"]: r for r in records(out)}
    assert report["counts"]["duplicates"] == len(dups) and first in kept and "derm/nevus/other.png" in kept
    # Mask -> one box per connected component per label.
    a = kept["seg/images/a.png"]
    assert sorted((b["label"], b["x_min"], b["y_min"], b["x_max"], b["y_max"]) for b in a["boxes"]) == [
        ("cyst", 5, 5, 20, 10),
        ("cyst", 30, 20, 45, 30),
        ("polyp", 2, 30, 4, 35),
    ]


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
    a = dict(x_min=0, y_min=0, x_max=10, y_max=10)
    assert box_iou(a, a) == 1.0 and box_iou(a, dict(x_min=5, y_min=0, x_max=15, y_max=10)) == pytest.approx(
        1 / 3
    )


# ---------------------------------------------------------------- DICOM privacy and shipped samples


def test_dicom_identifiers_never_reach_the_output(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    phi = {
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
    for k, v in phi.items():
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
    blobs = [p.read_bytes() for p in out.rglob("*") if p.is_file()]
    text = json.dumps({k: v for k, v in rec.items() if k != "image"}, default=str)
    for v in phi.values():
        for needle in {v, v.replace("^", " "), v.split("^")[0]}:
            assert needle not in text
            assert not any(needle.encode() in b for b in blobs), needle


def test_shipped_dicom_and_nifti_samples(tmp_path):
    cards = [
        load_card(CARDS / f"{n}.yaml") for n in ("pydicom-samples", "pydicom-data-samples", "nibabel-samples")
    ]
    out = tmp_path / "samples"
    report = curate(cards, out, workers=2)
    assert_balanced(report)
    for name, s in report["by_source"].items():
        assert s["kept"] > 0, name
    q = {e["file"]: e for e in quarantine(out)}
    assert "no image" in q["rtplan.dcm"]["problem"] and q["rtplan.dcm"]["field"] == "PixelData"
    assert "4D" in q["functional.nii"]["problem"]
    kept = records(out)
    assert {"CT", "MR", "Ultrasound"} <= {r["modality"] for r in kept}
    assert all(r["id"].startswith(r["source"] + "/" + r["file"]) for r in kept)
    # The same image shipped in several transfer syntaxes is caught as an exact duplicate.
    assert report["counts"]["duplicates"] > 0


# ---------------------------------------------------------------- video


def test_video_frames_at_rate(tmp_path):
    clips = tmp_path / "clips"
    (clips / "polyp").mkdir(parents=True)
    frames = [Image.fromarray(np.full((32, 48, 3), 20 * i, np.uint8)) for i in range(10)]
    frames[0].save(clips / "polyp" / "a.gif", save_all=True, append_images=frames[1:], duration=200, loop=0)
    (clips / "polyp" / "b").mkdir()
    for i, f in enumerate(frames[:6]):
        f.save(clips / "polyp" / "b" / f"{i:03d}.png")
    (clips / "polyp" / "c.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
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
    assert_balanced(report)
    by_clip: dict[str, list] = {}
    for r in records(out):
        by_clip.setdefault(r["file"], []).append(r["index"])
        assert r["labels"] == ["polyp"] and r["index_kind"] == "frame"
    # GIF: 200 ms a frame; at 2 fps the frame on screen at 0, .5, 1, 1.5 s. Folder: 5 fps, 6 frames.
    expected_gif = sorted({int(t / 0.2 + 1e-9) for t in np.arange(0, 1.8 + 1e-9, 0.5)})
    assert sorted(by_clip["polyp/a.gif"]) == expected_gif
    assert sorted(by_clip["polyp/b"]) == sorted({int(t * 5 + 1e-9) for t in np.arange(0, 1.0 + 1e-9, 0.5)})
    (mp4,) = quarantine(out)
    assert mp4["file"] == "polyp/c.mp4" and "decoder" in mp4["problem"]


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
