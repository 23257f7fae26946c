"""End to end: the quickstart pipeline in its smallest configuration (synthesize, curate, generate,
quality, mix, pretrain parts, assemble from parts, stages I-III, evaluate, report)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, SHARED_DATA
from PIL import Image

from medvl.eval import evaluate, rescore
from medvl.eval.harness import prediction_path
from medvl.model.build import load
from medvl.quickstart import run_quickstart
from medvl.records import read_rows
from medvl.samples import FORMATS
from medvl.vocab import OMNIMEDVQA_QUESTION_TYPES


def pixels(path) -> str:
    return hashlib.sha256(np.asarray(Image.open(path).convert("RGB")).tobytes()).hexdigest()


def test_quickstart_small_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "qs"
    report = run_quickstart(out, size="small", log=lambda *_: None)
    saved = json.loads((out / "report.json").read_text())
    assert saved["checks"] == report["checks"]
    md = (out / "report.md").read_text()
    assert "Not for diagnosis" in md and "random guess" in md
    for q in OMNIMEDVQA_QUESTION_TYPES:
        assert q in md
    assert (out / "loss_curves.png").stat().st_size > 10_000
    # Each stage started from the previous one's output and trained what Table 8 says.
    for stage in ("stage1", "stage2", "stage3"):
        hist = json.loads((out / stage / "history.json").read_text())
        assert len(hist) >= 2 and all(h["loss"] > 0 for h in hist)
    # The parts were saved as ordinary pretrained folders and the model assembled from them.
    for part in ("llm", "vision"):
        assert (out / "parts" / part / "config.json").exists()
    final = load(out / "stage3" / "final")
    assert final.model.config.image_token_id == final.tokenizer.convert_tokens_to_ids("<image>")
    # The data came through the user's commands, each accounting for every item, and no image of the
    # benchmark reached training.
    gen = json.loads((out / "generated" / "report.json").read_text())
    assert gen["read"] == gen["kept"] + gen["rejected"] + gen["quarantined"] and gen["kept"] > 0
    q = json.loads((out / "quality" / "report.json").read_text())["counts"]
    assert q["read"] == q["kept"] + q["rejected"] + q.get("quarantined", 0) and q["read"] == gen["kept"]
    stage3 = json.loads((out / "mix" / "mix_stage3.json").read_text())
    assert len(stage3) == q["kept"] and {s["format"] for s in stage3} == set(FORMATS)
    trained = {pixels(out / "mix" / s["image"]) for s in stage3 if "image" in s}
    bench = {pixels(p) for p in (out / "data" / "images").glob("bench_*.png")}
    assert trained and bench and not trained & bench
    # The benchmark is the engine's multiple-choice items of the test split, and only of it.
    asked = read_rows(out / "bench" / "samples.jsonl")
    assert asked and {s["provenance"]["split"] for s in asked} == {"test"}
    assert {s["format"] for s in asked} == {"perception"} and {s["lang"] for s in asked} == {"en"}

    results = report["results"]["after stage III"]
    n = results["overall"]["n"]
    assert n == sum(g["n"] for g in results["breakdowns"]["category"].values()) == len(asked) > 0

    # The quickstart model on the real SLAKE English test split (the model is 5M parameters and
    # has never seen a real image, so only the plumbing and the scoring are checked here).
    slake = SHARED_DATA / "slake"
    if (slake / "test.json").exists():
        rep = evaluate(out / "stage3" / "final", "slake", slake, out / "eval-slake", progress=False)
        assert rep["overall"]["n"] == 1061
        assert sum(g["n"] for g in rep["breakdowns"]["answer type"].values()) == 1061
        again = rescore(prediction_path(out / "eval-slake"), out / "eval-slake-again")
        assert again["overall"] == rep["overall"]


@pytest.mark.slow
def test_installed_quickstart_passes_its_checks_from_an_empty_folder(tmp_path):
    """CI's quality gate. The package is built as a wheel and installed without the checkout (so the
    stage configs must ship as package data), then `medvl quickstart` runs at its default size from
    an empty folder and must pass all three of its checks: it exits non-zero when one fails."""
    wheel_dir, site, work = tmp_path / "wheel", tmp_path / "site", tmp_path / "empty"
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheel_dir, REPO], check=True)
    (wheel,) = wheel_dir.glob("medvl-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import medvl; print(medvl.__file__)"],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.startswith(str(site)), where.stdout  # the installed copy, not the checkout
    proc = subprocess.run(
        [sys.executable, "-m", "medvl.cli", "quickstart", "--out", "qs"],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
    )
    report = json.loads((work / "qs" / "report.json").read_text())
    print((work / "qs" / "report.md").read_text())  # the figures, in CI's log
    assert proc.returncode == 0 and all(report["checks"].values()), (report["checks"], proc.stderr[-2000:])
