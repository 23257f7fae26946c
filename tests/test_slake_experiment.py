"""The SLAKE experiment's command in its reduced size (a few steps of each arm, a few questions): a test
that the recipe runs end to end on the real data and keeps SLAKE's test images out of training, not of
its result."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import REPO, SHARED_DATA

SLAKE = SHARED_DATA / "slake"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SLAKE / "test.json").exists(), reason="SLAKE not in ../shared/data"),
]


def load_script():
    spec = importlib.util.spec_from_file_location(
        "slake_experiment", REPO / "benchmarks" / "slake_experiment.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_slake_questions_keep_the_eval_prompt_and_both_languages():
    from medvl.prompts import SHORT_INSTRUCTION

    samples = load_script().slake_questions(SLAKE)
    rows = json.loads((SLAKE / "train.json").read_text(encoding="utf-8"))
    assert len(samples) == len(rows) and {s["lang"] for s in samples} == {"en", "zh"}
    first = samples[0]
    assert first["conversations"][0]["value"] == f"<image>\n{rows[0]['question']}\n{SHORT_INSTRUCTION}"
    assert first["conversations"][1]["value"] == rows[0]["answer"].strip()
    assert (SLAKE / first["image"]).exists()


def test_slake_experiment_ci_size_runs_both_arms_and_reports(tmp_path):
    out = tmp_path / "x"
    summary = load_script().main(["--size", "ci", "--out", str(out), "--test", "--slake", str(SLAKE)])
    # Same number of optimizer steps for both arms, from the same base.
    steps = {arm: json.loads((out / f"arm_{arm}" / "history.json").read_text()) for arm in ("a", "b")}
    assert len(steps["a"]) == len(steps["b"]) == summary["settings"]["arm_steps"]
    # Arm (a) is the train questions alone; arm (b) adds generated samples and keeps every question.
    mixes = {arm: json.loads((out / "mix" / f"mix_arm_{arm}.json").read_text()) for arm in ("a", "b")}
    questions = {s["id"].split("/", 1)[1] for s in mixes["a"]}
    assert all(s["id"].startswith("slake-train/") for s in mixes["a"])
    assert questions <= {s["id"].split("/", 1)[1] for s in mixes["b"]}
    generated = [s for s in mixes["b"] if s["id"].startswith("slake-generated/")]
    assert generated and len(mixes["b"]) == len(mixes["a"]) + len(generated)
    # No generated sample comes from a test-split image (records are named by their image's path).
    test_images = {r["img_name"] for r in json.loads((SLAKE / "test.json").read_text(encoding="utf-8"))}
    assert all(s["provenance"]["split"] == "train" for s in generated)
    assert not {s["provenance"]["record_id"].split("/imgs/", 1)[1] for s in generated} & test_images
    # The report has both arms on the validation split and both test languages, the baselines, the
    # paired comparison and the image-dependence check.
    assert set(summary["results"]) == {"validate-en", "test-en", "test-zh"}
    for key in ("validate-en", "test-en", "test-zh"):
        res = summary["results"][key]
        assert res["a"]["overall"]["n"] == res["b"]["overall"]["n"] > 0
        assert "question_prior" in res["a"]["overall"]["baselines"]
        assert "mcnemar" in next(iter(res["b_vs_a"]["paired"].values()))["overall"]
    assert "image_dependence" in summary["results"]["test-en"]["b"]
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "Leakage guard" in md and "question prior" in md and "McNemar" in md
    assert (out / "report.png").stat().st_size > 10_000
