"""`medvl eval` as a job on medvl.jobs, VQA and report generation alike: killed with SIGKILL mid-run and
started again it writes the same files as a run never stopped; worker processes and Ray actors give the
same answers; API models are asked at the set concurrency through medvl.llm, and a re-run sends nothing
already answered (a loopback fixture endpoint counts the requests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FixtureEndpoint, committed_items, kill_9_after_commits
from test_eval_model import write_mc_tsv
from test_report_generation import write_reports_jsonl

from medvl.eval.harness import APIModel, evaluate, prediction_path
from medvl.eval.report_task import evaluate_reports

MEDVL = str(Path(sys.executable).parent / "medvl")
QUESTIONS = 40


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """A multiple-choice TSV of 40 questions over 4 categories, 3 or 4 options."""
    path = tmp_path_factory.mktemp("jobs-bench") / "bench.tsv"
    return write_mc_tsv(
        path, QUESTIONS, 3, "Which modality is image {i}?", ["Modality", "Organ", "Lesion", "Grade"]
    )


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
    done = kill_9_after_commits(_cli(tiny_model_dir, bench, killed), killed / "jobs" / "image", 2, env=env)
    assert 2 <= len(done) < KILL_QUESTIONS // 2, done  # stopped mid-run, with chunks committed
    assert not (killed / "predictions.jsonl").exists()

    subprocess.run(_cli(tiny_model_dir, bench, killed), check=True, capture_output=True, timeout=600, env=env)
    for name in ("predictions.jsonl", "scored.jsonl"):
        assert (killed / name).read_bytes() == (whole / name).read_bytes(), name
    assert _report_without_date(killed)["overall"] == _report_without_date(whole)["overall"]
    chunks = committed_items(killed / "jobs" / "image")
    assert chunks == [f"{k:06d}" for k in range(KILL_QUESTIONS // 2)]  # none redone, none missing


def test_worker_processes_give_the_same_answers(tiny_model_dir: Path, bench: Path, tmp_path: Path) -> None:
    opts = dict(limit=8, chunk=2, batch_size=2, max_new_tokens=6, progress=False)
    one = evaluate(str(tiny_model_dir), "mc", bench, tmp_path / "one", **opts)
    two = evaluate(str(tiny_model_dir), "mc", bench, tmp_path / "two", workers=2, **opts)
    assert prediction_path(tmp_path / "one").read_bytes() == prediction_path(tmp_path / "two").read_bytes()
    assert one["overall"] == two["overall"]


# ------------------------------------------------------------------ API models


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


# ------------------------------------------------------------------ report generation: the same job path

REPORT_STUDIES = 12


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> Path:
    """A plain JSONL report set: 8 training and 12 test studies, one synthetic chest X-ray each."""
    return write_reports_jsonl(tmp_path_factory.mktemp("reports"), n_test=REPORT_STUDIES)


def report_files(out: Path) -> dict:
    """What a report run leaves that must not depend on how it was run (report.json but its date)."""
    files = {n: (out / n).read_bytes() for n in ("predictions.jsonl", "baselines.jsonl", "scored.jsonl")}
    return files | {"report.json": _report_without_date(out)}


def test_report_generation_killed_mid_run_then_rerun_gives_identical_files(
    tiny_model_dir: Path, reports: Path, tmp_path: Path
) -> None:
    def cli(out: Path, workers: int) -> list[str]:
        return [MEDVL, "eval", "--model", str(tiny_model_dir), "--bench", "reports-jsonl", "--data",
                str(reports), "--out", str(out), "--chunk-size", "1", "--batch-size", "1",
                "--max-new-tokens", "6", "--workers", str(workers),
                "--report-option", "meteor=false"]  # fmt: skip

    whole = tmp_path / "whole"
    subprocess.run(cli(whole, 1), check=True, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    # Killed in the driver's own loop, which commits each study as it is written: with two pool workers
    # the results arrive in order, so a worker slow to start held back ten finished studies that were
    # then committed in one burst, faster than the kill could land. The resume runs on the pool.
    done = kill_9_after_commits(cli(killed, 1), killed / "jobs" / "image", 2)
    assert 2 <= len(done) < REPORT_STUDIES, done  # stopped mid-run, with chunks committed
    assert not (killed / "predictions.jsonl").exists()
    subprocess.run(cli(killed, 2), check=True, capture_output=True, timeout=600)
    assert report_files(killed) == report_files(whole)
    assert committed_items(killed / "jobs" / "image") == [f"{k:06d}" for k in range(REPORT_STUDIES)]


def test_report_generation_worker_processes_give_the_same_files(
    tiny_model_dir: Path, reports: Path, tmp_path: Path
) -> None:
    opts = dict(limit=5, chunk=2, batch_size=2, max_new_tokens=6, meteor=False, progress=False)
    one = evaluate_reports(str(tiny_model_dir), "reports-jsonl", reports, tmp_path / "one", **opts)
    two = evaluate_reports(str(tiny_model_dir), "reports-jsonl", reports, tmp_path / "two", workers=2, **opts)
    assert report_files(tmp_path / "one") == report_files(tmp_path / "two")
    assert one["n"] == 5 and one["metrics"] == two["metrics"]
    assert "vision tower" in two["run"]["baselines"]["nearest_neighbour"]["embedding"]
    # Without the limit the job goes on: chunks were cut over the whole split (the third one, of
    # studies 4 and 5, is done), so only the studies after them are generated.
    first = (tmp_path / "one" / "predictions.jsonl").read_text().splitlines()
    opts["limit"] = None
    evaluate_reports(str(tiny_model_dir), "reports-jsonl", reports, tmp_path / "one", **opts)
    lines = (tmp_path / "one" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == REPORT_STUDIES and lines[:5] == first
    assert committed_items(tmp_path / "one" / "jobs" / "image") == [f"{k:06d}" for k in range(6)]


def test_report_generation_on_ray_gives_the_local_files(endpoint: FixtureEndpoint, reports: Path, tmp_path):
    model = APIModel(endpoint.url, "fixture", max_concurrency=2)
    opts = dict(chunk=4, meteor=False, progress=False)
    evaluate_reports(model, "reports-jsonl", reports, tmp_path / "local", **opts)
    evaluate_reports(model, "reports-jsonl", reports, tmp_path / "ray", workers=2, engine="ray", **opts)
    assert report_files(tmp_path / "ray") == report_files(tmp_path / "local")
    assert committed_items(tmp_path / "ray" / "jobs" / "image") == [f"{k:06d}" for k in range(3)]
    assert len(endpoint.requests) == 2 * REPORT_STUDIES  # each run (its own cache) asked each study once


def test_cli_evaluates_an_api_model_on_both_tasks(endpoint: FixtureEndpoint, bench, reports, tmp_path):
    from typer.testing import CliRunner

    from medvl.cli import app

    def cli(*args: str) -> object:
        api = ["--api-base", endpoint.url, "--api-model", "fixture", "--api-concurrency", "2"]
        return CliRunner().invoke(app, ["eval", *api, "--chunk-size", "4", *args])

    vqa = cli("--bench", "mc", "--data", str(bench), "--limit", "4", "--out", str(tmp_path / "vqa"))
    assert vqa.exit_code == 0, vqa.output
    assert len(endpoint.requests) == 4 and endpoint.max_in_flight <= 2
    rep = cli("--bench", "reports-jsonl", "--data", str(reports), "--limit", "2",
              "--out", str(tmp_path / "rep"), "--report-option", "meteor=false")  # fmt: skip
    assert rep.exit_code == 0, rep.output
    assert len(endpoint.requests) == 8  # the first chunk of 4 studies
    assert "reports-jsonl: 2 reports generated and scored" in rep.output
    both = cli("--model", "m", "--bench", "reports-jsonl", "--data", "x")
    assert both.exit_code == 2 and "give either --model, or --api-base" in both.output
