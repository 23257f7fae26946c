"""`medvl eval` as a job on medvl.jobs: killed with SIGKILL mid-run and started again it writes the same
files as a run never stopped; worker processes give the same answers; API models are asked at the
set concurrency through medvl.llm, and a re-run sends nothing already answered (a loopback fixture
endpoint counts the requests)."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from test_llm import FixtureEndpoint

from medvl.eval.harness import APIModel, evaluate, prediction_path

MEDVL = str(Path(sys.executable).parent / "medvl")
QUESTIONS = 40


def _png_b64(rng: random.Random) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), tuple(rng.randrange(256) for _ in range(3))).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """A multiple-choice TSV of 40 questions over 4 categories, 3 or 4 options."""
    rng = random.Random(3)
    path = tmp_path_factory.mktemp("jobs-bench") / "bench.tsv"
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "image", "question", "A", "B", "C", "D", "answer", "category"])
        for i in range(QUESTIONS):
            options = ["CT", "MR", "X-ray", "PET" if i % 2 else ""]
            w.writerow([i, _png_b64(rng), f"Which modality is image {i}?", *options, "ABC"[i % 3],
                        ["Modality", "Organ", "Lesion", "Grade"][i % 4]])  # fmt: skip
    return path


# The killed run: the first 16 questions in chunks of 2 (8 commits), a few tokens each (CPU time is short).
KILL_QUESTIONS = 16


def _cli(model: Path, bench: Path, out: Path) -> list[str]:
    return [MEDVL, "eval", "--model", str(model), "--bench", "mc", "--data", str(bench), "--out", str(out),
            "--limit", str(KILL_QUESTIONS), "--chunk-size", "2", "--batch-size", "2",
            "--max-new-tokens", "6"]  # fmt: skip


def _report_without_date(out: Path) -> dict:
    report = json.loads((out / "report.json").read_text())
    report["run"].pop("date")
    return report


def test_kill_9_mid_run_then_rerun_gives_identical_files(tiny_model_dir: Path, bench: Path, tmp_path: Path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    whole = tmp_path / "whole"
    subprocess.run(_cli(tiny_model_dir, bench, whole), check=True, capture_output=True, timeout=600, env=env)

    killed = tmp_path / "killed"
    parts = killed / "jobs" / "image" / "parts"
    proc = subprocess.Popen(_cli(tiny_model_dir, bench, killed), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while len(list(parts.glob("*.json"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    committed = len(list(parts.glob("*.json")))
    assert proc.returncode == -signal.SIGKILL
    assert 2 <= committed < KILL_QUESTIONS // 2, committed  # stopped mid-run, with chunks committed
    assert not (killed / "predictions.jsonl").exists()

    subprocess.run(_cli(tiny_model_dir, bench, killed), check=True, capture_output=True, timeout=600, env=env)
    for name in ("predictions.jsonl", "scored.jsonl"):
        assert (killed / name).read_bytes() == (whole / name).read_bytes(), name
    assert _report_without_date(killed)["overall"] == _report_without_date(whole)["overall"]
    logs = [json.loads(p.read_text()) for p in sorted(parts.glob("*.json"))]
    chunks = [i for log in logs for i in log["items"]]
    assert chunks == [f"{k:06d}" for k in range(KILL_QUESTIONS // 2)]  # none redone, none missing


def test_worker_processes_give_the_same_answers(tiny_model_dir: Path, bench: Path, tmp_path: Path) -> None:
    opts = dict(limit=8, chunk=2, batch_size=2, max_new_tokens=6, progress=False)
    one = evaluate(str(tiny_model_dir), "mc", bench, tmp_path / "one", **opts)
    two = evaluate(str(tiny_model_dir), "mc", bench, tmp_path / "two", workers=2, **opts)
    assert prediction_path(tmp_path / "one").read_bytes() == prediction_path(tmp_path / "two").read_bytes()
    assert one["overall"] == two["overall"]


# ------------------------------------------------------------------ API models


@pytest.fixture
def endpoint() -> Iterator[FixtureEndpoint]:
    srv = FixtureEndpoint()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def test_api_concurrency_and_a_rerun_sends_nothing(endpoint: FixtureEndpoint, bench: Path, tmp_path: Path):
    endpoint.default = {"delay": 0.2}  # answers take a while, so requests pile up to the limit
    model = APIModel(endpoint.url, "fixture", "key", max_concurrency=4)
    out = tmp_path / "api"
    report = evaluate(model, "mc", bench, out, limit=10, chunk=16, progress=False)
    assert report["overall"]["n"] == 10
    # The chunk holding the first 10 questions is 16 questions: all were asked, 4 at a time.
    assert len(endpoint.requests) == 16 and endpoint.max_in_flight == 4
    rows = [json.loads(x) for x in prediction_path(out).read_text().splitlines()]
    assert rows[0]["prediction"].startswith("echo: Which modality is image 0?")
    assert len(list((out / "llm-cache").rglob("*.json"))) == 16
    # Continuing to the whole benchmark asks only the 24 questions not yet answered.
    evaluate(model, "mc", bench, out, chunk=16, progress=False)
    assert len(endpoint.requests) == 40
    # Everything lost but the cache (as after a kill before any commit): nothing is sent again,
    # whatever the number of worker processes.
    for p in [*(out / "jobs").rglob("*"), prediction_path(out)][::-1]:
        p.rmdir() if p.is_dir() else p.unlink()
    again = evaluate(model, "mc", bench, out, chunk=16, workers=2, progress=False)
    assert len(endpoint.requests) == 40
    assert [json.loads(x) for x in prediction_path(out).read_text().splitlines()][:10] == rows
    assert again["overall"]["n"] == QUESTIONS


def test_api_failure_stops_the_run_keeping_what_was_committed(endpoint: FixtureEndpoint, bench, tmp_path):
    endpoint.script = [{}] * 4 + [{"status": 400}]  # the 5th request is refused (not retried)
    model = APIModel(endpoint.url, "fixture", max_concurrency=1)
    out = tmp_path / "api"
    with pytest.raises(Exception, match="HTTP 400"):
        evaluate(model, "mc", bench, out, chunk=2, progress=False)
    assert len(list((out / "jobs" / "image" / "parts").glob("*.json"))) == 2  # two chunks of two
    evaluate(model, "mc", bench, out, chunk=2, progress=False)
    assert len(endpoint.requests) == QUESTIONS + 1  # the refused one asked again, nothing else twice


def test_ray_engine_gives_the_local_answers(endpoint: FixtureEndpoint, bench: Path, tmp_path: Path) -> None:
    model = APIModel(endpoint.url, "fixture", max_concurrency=2)
    local = evaluate(model, "mc", bench, tmp_path / "local", chunk=8, progress=False)
    on_ray = evaluate(model, "mc", bench, tmp_path / "ray", chunk=8, workers=2, engine="ray", progress=False)
    assert prediction_path(tmp_path / "ray").read_bytes() == prediction_path(tmp_path / "local").read_bytes()
    assert on_ray["overall"] == local["overall"]
    parts = sorted((tmp_path / "ray" / "jobs" / "image" / "parts").glob("*.json"))
    assert len(parts) == QUESTIONS // 8
