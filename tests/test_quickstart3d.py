"""`medvl quickstart --3d` end to end: CT phantoms -> curated volumes -> generated 3D instructions -> 3D
tower pretraining -> stages I-III on the native route -> the synthetic 3D benchmark -> report; and CI's
gate: the installed package's default-size run passes its three checks, then answers about the real
spleen CT through `medvl chat`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, SHARED_DATA

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


@pytest.mark.slow
def test_installed_quickstart_3d_passes_its_checks_and_reads_the_real_spleen_ct(tmp_path):
    """CI's 3D quality gate. The wheel is installed without the checkout, `medvl quickstart --3d` runs at
    its default size from an empty folder and must pass all three checks (it exits non-zero when one
    fails). Then its model is asked about the real spleen CT (shared data; skipped when absent) through
    `medvl chat`, which reads the NIfTI file with the model's saved spec: an answer, research-only."""
    wheel_dir, site, work = tmp_path / "wheel", tmp_path / "site", tmp_path / "empty"
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheel_dir, REPO], check=True)
    (wheel,) = wheel_dir.glob("medvl-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run(
        [sys.executable, "-m", "medvl.cli", "quickstart", "--3d", "--out", "qs3d"],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
    )
    report = json.loads((work / "qs3d" / "report.json").read_text())
    print((work / "qs3d" / "report.md").read_text())  # the figures, in CI's log
    assert proc.returncode == 0 and all(report["checks"].values()), (report["checks"], proc.stderr[-2000:])
    if not SPLEEN_CT.exists():
        pytest.skip("shared spleen CT absent: the chat part is not run")
    question = (
        "Which of these organs is in this volume?\nA. brain\nB. spleen\nC. lung\nD. heart\n"
        "Answer with the option's letter from the given choices directly."
    )
    chat = subprocess.run(
        [sys.executable, "-m", "medvl.cli", "chat", "--model", "qs3d/stage3/final", "--image", str(SPLEEN_CT)]
        + ["-q", question, "--max-new-tokens", "16"],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
    )
    print("spleen CT, medvl chat:", chat.stdout[-500:])
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert "research" in chat.stdout.lower() and chat.stdout.strip()
