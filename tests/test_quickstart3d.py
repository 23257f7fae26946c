"""`medvl quickstart --3d` end to end at its smallest size: CT phantoms -> curated volumes -> generated 3D
instructions -> 3D tower pretraining -> stages I-III on the native route -> the synthetic 3D benchmark
-> report. (Its default size does not pass its checks yet, docs/3d.md, so it is not a CI gate yet.)"""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import REPO, SHARED_DATA
from typer.testing import CliRunner

from medvl.cli import app
from medvl.model.build import load, native_frames
from medvl.quickstart import CONFIG_3D, run_quickstart_3d
from medvl.samples import FORMATS

SPLEEN_CT = SHARED_DATA / "spleen_ct" / "ct_scan" / "sub-spleen2" / "ct" / "sub-spleen2_ct.nii.gz"


def test_the_quickstarts_card_is_the_synthetic_3d_card():
    shipped = yaml.safe_load((CONFIG_3D / "card.yaml").read_text())
    card = yaml.safe_load((REPO / "configs" / "cards" / "synthetic-3d.yaml").read_text())
    # Only where the phantoms lie and that no 2D slices are cut differ.
    for key in ("root",):
        shipped.pop(key), card.pop(key)
    for key in ("slices_per_label", "negatives"):
        shipped["options"].pop(key), card["options"].pop(key)
    assert shipped == card


def test_the_benchmarks_seed_is_refused_for_training_phantoms(tmp_path):
    """Training phantom i of seed s and benchmark case i are the same draw when s is the benchmark's seed."""
    from medvl.synth.benchmark3d import BENCH_SEED

    with pytest.raises(ValueError, match=f"seed {BENCH_SEED}"):
        run_quickstart_3d(tmp_path / "qs", size="small", seed=BENCH_SEED, log=lambda *_: None)
    assert not (tmp_path / "qs").exists()
    res = CliRunner().invoke(app, ["quickstart", "--3d", "--size", "small", "--seed", str(BENCH_SEED)])
    assert res.exit_code == 2 and "benchmark" in res.output


def test_quickstart_3d_small_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "qs3d"
    report = run_quickstart_3d(out, size="small", log=lambda *_: None)
    saved = json.loads((out / "report.json").read_text())
    assert saved["checks"] == report["checks"] and len(report["checks"]) == 3
    md = (out / "report.md").read_text()
    assert "Not for diagnosis" in md and "random guess" in md and "organ" in md
    for stage in ("stage1", "stage2", "stage3"):
        hist = json.loads((out / stage / "history.json").read_text())
        assert len(hist) >= 2 and all(h["loss"] > 0 for h in hist)
    final = load(out / "stage3" / "final")
    assert native_frames(final.model.config.vision_config) == 8  # the native route's ViViT tower
    # Every item accounted for; the trained volumes are the generated ones; no benchmark volume trains.
    cur = json.loads((out / "curated" / "report.json").read_text())
    gen = json.loads((out / "generated" / "report.json").read_text())
    assert gen["read"] == gen["kept"] + gen["rejected"] + gen["quarantined"] + gen["skipped"]
    assert gen["skipped"] == 0 and gen["records"] == cur["counts"]["kept"] > 0
    stage3 = json.loads((out / "mix" / "mix_stage3.json").read_text())
    assert len(stage3) == gen["kept"] and {s["format"] for s in stage3} == set(FORMATS)
    trained = {(out / "mix" / s["volume"]).resolve().name for s in stage3 if "volume" in s}
    for s in stage3:
        assert "volume" in s or s["format"] == "text"
    bench = {p.name for p in (out / "bench" / "volumes").glob("*.npy")}
    assert trained and bench and not trained & bench
    results = report["results"]["after stage III"]
    assert results["overall"]["n"] == sum(g["n"] for g in results["breakdowns"]["category"].values()) > 0
    assert set(results["breakdowns"]["category"]) <= {
        "organ",
        "lesion presence",
        "lesion side",
        "lesion slice range",
        "lesion size",
        "plane",
    }
    # Its model reads the real spleen CT through `medvl chat` (NIfTI, with the spec it was trained with):
    # an answer, labelled research-only. (The smallest model's answer itself means nothing.)
    if SPLEEN_CT.exists():
        question = "Which of these organs is in this volume?\nA. brain\nB. spleen\nC. lung\nD. heart"
        res = CliRunner().invoke(
            app,
            ["chat", "--model", str(out / "stage3" / "final"), "--image", str(SPLEEN_CT), "-q", question]
            + ["--max-new-tokens", "8"],
        )
        assert res.exit_code == 0, res.output
        assert "research" in res.output.lower() and "medvl>" in res.output
