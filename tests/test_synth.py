"""Tests for the embedded synthetic data (medvl.synth): labels, determinism, formats, learnability."""

from __future__ import annotations

import base64
import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medvl.imaging import CT_WINDOWS as WINDOWS
from medvl.imaging import window
from medvl.records import read_rows
from medvl.synth.benchmark import mc_benchmark, write_quickstart_dataset
from medvl.synth.dataset import write_synthetic
from medvl.synth.images import (
    ANATOMIES,
    BODY_REGIONS,
    FINDINGS,
    GEN_MODALITIES,
    NO_FINDING,
    QUADRANTS,
    SPECS,
    UNGRADED,
    Plan,
    bbox_location,
    render,
    synthesize,
)
from medvl.synth.phantom import LABELS, LESION_KINDS, LESION_LABEL, make_phantom
from medvl.vocab import DEPARTMENTS, MODALITIES

# Expected HU range of every labelled structure (noise included).
HU_RANGES = {
    "lung": (-950, -650),
    "heart": (0, 90),
    "aorta": (100, 230),
    "liver": (20, 100),
    "spleen": (10, 90),
    "kidney": (100, 200),
    "bone": (200, 1200),
    "brain": (10, 60),
    "ventricle": (-15, 25),
}


def _all_plans() -> list[Plan]:
    """Every (modality, region, finding, grade) once, quadrants cycling through the allowed ones."""
    plans = []
    for m, regions in SPECS.items():
        for r, spec in regions.items():
            for f in spec.findings:
                quads = ("lower left", "lower right") if f == "pleural effusion" else spec.quadrants
                for g in [None] if f in UNGRADED else [1, 2, 3]:
                    plans.append(Plan(m, r, f, g, quads[len(plans) % len(quads)]))
    return plans


# ---------------------------------------------------------------------------------------------- phantom


@pytest.mark.parametrize("region", ["chest", "abdomen", "head"])
def test_phantom_hu_and_labels(region: str) -> None:
    ph = make_phantom(region, (32, 128, 128), np.random.default_rng(3))
    assert ph.hu.dtype == np.int16 and ph.labels.dtype == np.uint8
    assert ph.hu.shape == ph.labels.shape == (32, 128, 128) and len(ph.spacing) == 3
    assert set(ph.label_names) == set(np.unique(ph.labels)) - {0}
    assert all(LABELS[k] == v for k, v in ph.label_names.items())
    for lab, name in ph.label_names.items():
        vals = ph.hu[ph.labels == lab]
        if name == "lesion":
            lo = hi = LESION_KINDS[region][ph.lesion]
            lo, hi = lo - 40, hi + 40
        else:
            lo, hi = HU_RANGES[name]
        p_lo, p_hi = np.percentile(vals, [0.5, 99.5])  # image noise (sigma 3-10 HU) has long tails
        assert lo <= p_lo and p_hi <= hi, (name, p_lo, p_hi)
    assert (ph.hu.min(), ph.hu.max()) >= (-1024, 0) and ph.hu.max() >= 700  # air and cortical bone present
    assert ph.lesion in LESION_KINDS[region] and LESION_LABEL in ph.label_names
    z, y, x = (int(c) for c in ph.lesion_center)
    assert ph.labels[z, y, x] == LESION_LABEL


def test_phantom_determinism_and_lesion_isolation() -> None:
    a = make_phantom("abdomen", (16, 64, 64), np.random.default_rng(5))
    b = make_phantom("abdomen", (16, 64, 64), np.random.default_rng(5))
    c = make_phantom("abdomen", (16, 64, 64), np.random.default_rng(5), lesion=False)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.labels, b.labels)
    assert c.lesion is None and LESION_LABEL not in c.label_names
    lesion = a.labels == LESION_LABEL
    assert lesion.sum() > 20
    # same seed without the lesion: identical outside the lesion, different inside it
    assert np.array_equal(a.hu[~lesion], c.hu[~lesion]) and np.array_equal(
        a.labels[~lesion], c.labels[~lesion]
    )
    assert np.abs(a.hu[lesion].astype(int) - c.hu[lesion]).mean() > 20
    d = make_phantom("abdomen", (16, 64, 64), np.random.default_rng(6))
    assert not np.array_equal(a.hu, d.hu)


def test_window_known_values() -> None:
    hu = np.array([-2000, -160, 40, 240, 3000, -60])
    out = window(hu, 40, 400)
    assert out.dtype == np.uint8
    assert out.tolist() == [0, 0, 128, 255, 255, 64]  # -60 is a quarter of the way: 63.75 -> 64
    c, w = WINDOWS["lung"]
    assert window(np.array([-1000, -600, 0]), c, w).tolist() == [60, 128, 230]
    assert np.all(np.diff(window(np.arange(-1000, 1000, 7), *WINDOWS["brain"]).astype(int)) >= 0)


# ----------------------------------------------------------------------------------------------- images


def test_bbox_covers_exactly_the_lesion_and_location_matches() -> None:
    """Rendering the same seed with and without the finding changes only pixels inside the bbox."""
    for k, plan in enumerate(_all_plans()):
        for seed in (11 + k, 500 + k):
            a = render(plan, seed, 128)
            b = render(Plan(plan.modality, plan.body_region), seed, 128)
            assert b.bbox is None and b.finding == NO_FINDING and b.location is None
            assert a.bbox is not None, plan
            x0, y0, x1, y1 = a.bbox
            assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
            diff = np.abs(a.image.astype(int) - b.image.astype(int)).max(axis=2)
            outside = np.ones_like(diff, dtype=bool)
            outside[max(0, y0 - 2) : y1 + 2, max(0, x0 - 2) : x1 + 2] = False
            assert (diff[outside] > 30).sum() == 0, plan
            assert diff[a.mask].mean() > 20, (plan, diff[a.mask].mean())
            assert a.location == plan.quadrant == bbox_location(a.bbox, 128, 128), (plan, a.bbox)


def test_grade_is_size() -> None:
    for plan in _all_plans():
        if plan.grade != 1:
            continue
        areas = []
        for g in (1, 2, 3):
            boxes = [
                render(Plan(plan.modality, plan.body_region, plan.finding, g, plan.quadrant), s).bbox
                for s in range(6)
            ]
            areas.append(np.mean([(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]))
        assert areas[0] * 1.3 < areas[1] and areas[1] * 1.3 < areas[2], (plan.finding, areas)
        assert areas[0] >= (0.06 * 128) ** 2  # grade 1 still several pixels across at 64 px


def test_generate_is_deterministic_and_varied() -> None:
    a, b, c = synthesize(3), synthesize(3), synthesize(4)
    assert np.array_equal(a.image, b.image) and a.labels() == b.labels()
    assert not np.array_equal(a.image, c.image)
    # natural variation: two normal chest X-rays are not identical
    x1, x2 = (render(Plan("X-ray", "chest"), s).image for s in (1, 2))
    assert np.abs(x1.astype(int) - x2.astype(int)).mean() > 2


def test_modalities_learnable_at_32px() -> None:
    """Softmax regression on 32x32 thumbnails separates the six modalities on held-out images."""

    def data(seeds):
        xs, ys = [], []
        for s in seeds:
            for k, m in enumerate(GEN_MODALITIES):
                img = Image.fromarray(synthesize(s * 10 + k, 64, m).image).resize((32, 32), Image.BILINEAR)
                xs.append(np.asarray(img, np.float32).ravel() / 255.0)
                ys.append(k)
        return np.stack(xs), np.array(ys)

    xtr, ytr = data(range(40))
    xte, yte = data(range(1000, 1020))
    mu, sd = xtr.mean(0), xtr.std(0) + 0.05
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    w = np.zeros((xtr.shape[1], len(GEN_MODALITIES)))
    onehot = np.eye(len(GEN_MODALITIES))[ytr]
    for _ in range(150):
        logits = xtr @ w
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        w -= 0.01 * (xtr.T @ (p - onehot) / len(xtr) + 1e-3 * w)
    acc = ((xte @ w).argmax(1) == yte).mean()
    assert acc > 0.95, acc


# ---------------------------------------------------------------------------------------------- dataset


def test_write_synthetic_deterministic(tmp_path: Path) -> None:
    def files(d: Path) -> dict[str, bytes]:
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    for d, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_synthetic(tmp_path / d, 12, seed, size=64)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b and len(a) == 13
    assert a.keys() == c.keys() and a["records.jsonl"] != c["records.jsonl"]
    assert sum(a[k] != c[k] for k in a) >= 12


def test_records_vocabulary_and_balance(tmp_path: Path) -> None:
    recs = read_rows(write_synthetic(tmp_path, 120, seed=7, size=96))
    assert Counter(r["modality"] for r in recs) == {m: 20 for m in GEN_MODALITIES}
    assert 0.2 < sum(r["finding"] == NO_FINDING for r in recs) / len(recs) < 0.5
    for r in recs:
        spec = SPECS[r["modality"]][r["body_region"]]
        assert (
            r["modality"] in MODALITIES
            and r["department"] in DEPARTMENTS
            and r["department"] == spec.department
        )
        assert r["body_region"] in BODY_REGIONS and r["anatomy"] in ANATOMIES and r["anatomy"] == spec.anatomy
        assert r["finding"] in FINDINGS and r["finding"] in (*spec.findings, NO_FINDING)
        assert (r["bbox"] is None) == (r["finding"] == NO_FINDING) == (r["location"] is None)
        assert (r["grade"] in (1, 2, 3)) == (r["finding"] not in UNGRADED and r["finding"] != NO_FINDING)
        assert Image.open(tmp_path / r["image"]).size == (96, 96)
        if r["bbox"]:
            x0, y0, x1, y1 = r["bbox"]
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
            assert r["location"] in QUADRANTS and r["location"] == bbox_location(r["bbox"], 96, 96)
        # a record regenerates from its own seed
        assert synthesize(r["seed"], 96, r["modality"]).labels()["bbox"] == r["bbox"]


# -------------------------------------------------------------------------------------------- templates


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("qs")
    return out, write_quickstart_dataset(out, n_train=36, n_bench=18, seed=1, size=64)


def test_quickstart_dataset_layout(quick, tmp_path) -> None:
    """Images, two record tables, the card and the benchmark; no training data (that is generated from
    the curated images); the same arguments give the same bytes."""
    out, paths = quick
    assert {p.relative_to(out).as_posix() for p in paths.values()} == {
        "images",
        "records.jsonl",
        "bench_records.jsonl",
        "synthetic.yaml",
        "bench/synth_mc.tsv",
    }
    train, bench = read_rows(paths["records"]), read_rows(paths["bench_records"])
    assert not {r["id"] for r in train} & {r["id"] for r in bench}
    assert len(list(paths["images"].glob("*.png"))) == 36 + 18
    again = write_quickstart_dataset(tmp_path, n_train=36, n_bench=18, seed=1, size=64)
    for key in ("records", "bench_records", "card", "bench_tsv"):
        assert again[key].read_bytes() == paths[key].read_bytes(), key


def test_benchmark_rows_and_tsv_roundtrip(quick) -> None:
    out, paths = quick
    bench = read_rows(paths["bench_records"])
    rows = mc_benchmark(bench, np.random.default_rng(0))
    by_image = {r["image"]: r for r in bench}
    field = {
        "Modality Recognition": "modality",
        "Anatomy Identification": "anatomy",
        "Disease Diagnosis": "finding",
        "Other Biological Attributes": "location",
    }
    for row in rows:
        opts = [row[k] for k in "ABCD" if row[k]]
        assert len(opts) == len(set(opts)) == (3 if row["category"] == "Lesion Grading" else 4)
        rec = by_image[row["image"]]
        want = f"grade {rec['grade']}" if row["category"] == "Lesion Grading" else rec[field[row["category"]]]
        assert row[row["answer"]] == want
    assert len({r["answer"] for r in rows if r["category"] == "Modality Recognition"}) >= 3  # shuffled

    with paths["bench_tsv"].open(newline="") as f:
        table = list(csv.DictReader(f, delimiter="\t"))
    assert list(table[0]) == ["index", "image", "question", "A", "B", "C", "D", "answer", "category"]
    assert len(table) == len({(r["image"], r["category"]) for r in table})
    for t in table:
        png = base64.b64decode(t["image"])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert t["answer"] in "ABCD" and t[t["answer"]]
    # the first rows belong to the first benchmark record: their image decodes to that file exactly
    assert base64.b64decode(table[0]["image"]) == (out / bench[0]["image"]).read_bytes()


def test_cli_synth(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from medvl.synth.cli import synth

    app = typer.Typer()
    app.command()(synth)
    res = CliRunner().invoke(
        app, ["--out", str(tmp_path), "--n-train", "12", "--n-bench", "6", "--size", "64"]
    )
    assert res.exit_code == 0, res.output
    assert "train images" in res.output and (tmp_path / "bench" / "synth_mc.tsv").is_file()
