"""`medvl eval` end to end with the tiny random-weights model: a synthetic multiple-choice TSV,
resuming, the image-dependence check, the CLI, the real SLAKE test split, and an OpenAI-compatible
endpoint served on loopback and asked through the official `openai` client."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from medvl.cli import app
from medvl.errors import InputError
from medvl.eval.benchmarks import load_benchmark
from medvl.eval.harness import APIModel, evaluate, prediction_path, rescore
from medvl.vocab import OMNIMEDVQA_QUESTION_TYPES

SHARED = Path(os.environ.get("MEDVL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SLAKE = SHARED / "slake"
FAST = dict(batch_size=8, max_new_tokens=6, progress=False)


@pytest.fixture(scope="session")
def eval_tiny_model(tmp_path_factory) -> Path:
    """The tiny preset with random weights and a tokenizer trained on short medical sentences."""
    from medvl.model.build import build_preset
    from medvl.model.tokenizer import train_tokenizer

    rng = random.Random(0)
    organs = ["liver", "lung", "kidney", "heart", "brain", "spleen", "spinal cord", "bladder"]
    modalities = ["CT", "MR", "X-ray", "ultrasound", "PET"]
    lines = [
        f"{rng.choice(['The', 'This', 'A'])} {rng.choice(modalities)} image shows the {rng.choice(organs)}. "
        f"Answer: {rng.choice('ABCD')}. {rng.choice(['Yes', 'No'])}, {rng.choice(organs)}."
        for _ in range(400)
    ]
    folder = tmp_path_factory.mktemp("eval_tiny") / "m"
    build_preset("tiny", tokenizer=train_tokenizer(lines, vocab_size=512)).save(folder)
    return folder


def write_mc_tsv(path: Path, n: int, seed: int, question: str, categories: list[str]) -> Path:
    """A multiple-choice benchmark in VLMEvalKit's TSV layout: n questions (`question`, in which `{i}`
    is the question's index), each with a 24 x 24 one-colour PNG, options CT, MR, X-ray (and PET
    for odd i), the answer cycling through A-C and the category through `categories`."""
    rng = random.Random(seed)
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "image", "question", "A", "B", "C", "D", "answer", "category"])
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (24, 24), tuple(rng.randrange(256) for _ in range(3))).save(buf, format="PNG")
            options = ["CT", "MR", "X-ray", "PET" if i % 2 else ""]
            w.writerow([i, base64.b64encode(buf.getvalue()).decode(), question.format(i=i), *options,
                        "ABC"[i % 3], categories[i % len(categories)]])  # fmt: skip
    return path


@pytest.fixture(scope="session")
def synthetic_mc(tmp_path_factory) -> Path:
    """A quickstart-style benchmark: two questions per OmniMedVQA question type, 3 or 4 options."""
    path = tmp_path_factory.mktemp("bench") / "synthetic.tsv"
    return write_mc_tsv(path, 10, 1, "Which modality is this?", list(OMNIMEDVQA_QUESTION_TYPES[:5]))


def test_mc_report_resume_and_rescore(eval_tiny_model: Path, synthetic_mc: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = evaluate(str(eval_tiny_model), "mc", synthetic_mc, out, limit=4, chunk=3, **FAST)
    assert first["overall"]["n"] == 4
    lines = prediction_path(out).read_text().splitlines()
    assert len(lines) == 4
    # Chunks are cut over the whole benchmark: 4 questions are chunks 0 and 1 (questions 0-5).
    parts = sorted((out / "jobs" / "image" / "parts").glob("*.json"))
    assert [json.loads(p.read_text())["items"] for p in parts] == [["000000"], ["000001"]]
    report = evaluate(str(eval_tiny_model), "mc", synthetic_mc, out, chunk=3, **FAST)
    rows = [json.loads(x) for x in prediction_path(out).read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert len(ids) == 10 and len(set(ids)) == 10
    assert rows[:4] == [json.loads(x) for x in lines]  # finished rows were kept, not redone
    parts = sorted((out / "jobs" / "image" / "parts").glob("*.json"))
    assert [json.loads(p.read_text())["items"] for p in parts][2:] == [["000002"], ["000003"]]
    # Another batching in the same folder would mix differently made answers: refused.
    with pytest.raises(InputError, match="another configuration"):
        evaluate(str(eval_tiny_model), "mc", synthetic_mc, out, chunk=5, **FAST)

    o = report["overall"]
    assert o["n"] == 10 and 0 <= o["unresolved"] + o["refused"] <= 10
    assert o["random_guess"] == pytest.approx((5 / 3 + 5 / 4) / 10)
    cats = report["breakdowns"]["category"]
    assert set(cats) == set(OMNIMEDVQA_QUESTION_TYPES)
    for c in cats.values():
        assert c["n"] == 2 and c["random_guess"] == pytest.approx((1 / 3 + 1 / 4) / 2)
    assert "reference" not in report  # a custom benchmark has no published rows
    # Scores are a function of the prediction file alone.
    again = rescore(prediction_path(out), tmp_path / "rescored")
    assert {k: again[k] for k in ("overall", "breakdowns")} == {
        k: report[k] for k in ("overall", "breakdowns")
    }
    # The prompt the model saw is the documented training prompt.
    item = load_benchmark("mc", synthetic_mc)[1]
    assert item.prompt().splitlines() == [
        "Which modality is this?", "A. CT", "B. MR", "C. X-ray", "D. PET",
        "Answer with the option's letter from the given choices directly.",
    ]  # fmt: skip


def test_image_check_and_cli(eval_tiny_model: Path, synthetic_mc: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    args = ["eval", "--model", str(eval_tiny_model), "--bench", "mc", "--data", str(synthetic_mc),
            "--out", str(out), "--limit", "6", "--max-new-tokens", "6", "--image-check"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "mc: 6 questions scored" in result.output and "Not for diagnosis" in result.output
    report = json.loads((out / "report.json").read_text())
    dep = report["image_dependence"]
    for variant in ("blank", "shuffled"):
        v = dep["variants"][variant]
        assert v["n"] == 6 and v["accuracy_with_images"] == report["overall"]["accuracy"]
        assert v["drop"] == pytest.approx(v["accuracy_with_images"] - v["accuracy"])
        assert len((out / f"predictions.{variant}.jsonl").read_text().splitlines()) == 6
        lo, hi = v["drop_ci95"]
        assert lo <= v["drop"] <= hi and v["interval_includes_0"] == (lo <= 0)
    assert dep["image_independent"] == all(v["interval_includes_0"] for v in dep["variants"].values())
    md = (out / "report.md").read_text()
    assert "## Image dependence" in md and "## By category" in md
    # Bad input: a clear message naming the file, and a non-zero exit.
    bad = CliRunner().invoke(app, ["eval", "--model", str(eval_tiny_model), "--bench", "slake",
                                   "--data", str(tmp_path / "nowhere")])  # fmt: skip
    assert bad.exit_code == 1 and "nowhere" in bad.output and "not found" in bad.output
    compare = CliRunner().invoke(app, ["eval", "--compare", str(out), str(out), "--out", str(tmp_path / "c")])
    assert compare.exit_code == 0, compare.output
    assert (tmp_path / "c" / "compare.png").stat().st_size > 1000
    paired = json.loads((tmp_path / "c" / "compare.json").read_text())["paired"]
    assert next(iter(paired.values()))["overall"]["ci95"] == [0.0, 0.0]  # a run against itself


@pytest.mark.skipif(not (SLAKE / "test.json").exists(), reason="shared SLAKE data not present")
def test_slake_test_split_real_images(eval_tiny_model: Path, tmp_path: Path) -> None:
    items = load_benchmark("slake", SLAKE)
    assert len(items) == 1061
    assert sum(it.kind == "closed" for it in items) == 416 and sum(it.kind == "open" for it in items) == 645
    assert len(load_benchmark("slake", SLAKE, lang="zh")) == 2094 - 1061
    n = 16
    report = evaluate(str(eval_tiny_model), "slake", SLAKE, tmp_path, limit=n, **FAST)
    head = items[:n]
    o = report["overall"]
    assert o["n"] == n
    assert o["closed_n"] == sum(it.kind == "closed" for it in head) > 0
    assert o["open_n"] == sum(it.kind == "open" for it in head) > 0
    assert set(report["breakdowns"]) == {"answer type", "content type"}
    assert report["breakdowns"]["answer type"]["CLOSED"]["n"] == o["closed_n"]
    assert sum(g["n"] for g in report["breakdowns"]["content type"].values()) == n
    assert report["reference"]["rows"]["GMAI-VL"] == [72.9]
    assert report["reference"]["this_run"]["SLAKE"] == pytest.approx(100 * o["closed_accuracy"], abs=0.01)
    again = rescore(prediction_path(tmp_path), tmp_path / "again")
    assert again["overall"] == o and again["breakdowns"] == report["breakdowns"]


# ------------------------------------------------------------------ an OpenAI-compatible endpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def served(eval_tiny_model: Path):
    """`medvl serve`'s app on loopback, in a thread, with an API key."""
    import uvicorn

    from medvl.model.build import load
    from medvl.serve.api import ServeSettings, create_app

    key = "test-key"
    app_ = create_app(load(eval_tiny_model), ServeSettings(model_name="tiny", api_key=key))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app_, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "server did not start"
    yield f"http://127.0.0.1:{port}/v1", key
    server.should_exit = True
    thread.join(timeout=10)


def test_api_model_matches_local(served, eval_tiny_model: Path, synthetic_mc: Path, tmp_path: Path) -> None:
    base, key = served
    opts = dict(limit=5, batch_size=1, max_new_tokens=6, progress=False)
    remote = evaluate(APIModel(base, "tiny", key), "mc", synthetic_mc, tmp_path / "api", **opts)
    local = evaluate(str(eval_tiny_model), "mc", synthetic_mc, tmp_path / "local", **opts)
    assert remote["run"]["model"] == f"tiny @ {base}"
    api_rows = prediction_path(tmp_path / "api").read_text().splitlines()
    local_rows = prediction_path(tmp_path / "local").read_text().splitlines()
    # Same greedy model behind HTTP (images as PNG data: URLs) and in process: same answers, same scores.
    assert [json.loads(r)["prediction"] for r in api_rows] == [
        json.loads(r)["prediction"] for r in local_rows
    ]
    assert remote["overall"] == local["overall"]


def test_api_key_is_checked(served, synthetic_mc: Path, tmp_path: Path) -> None:
    from medvl.llm import LLMError

    base, _ = served
    with pytest.raises(LLMError) as caught:
        evaluate(APIModel(base, "tiny", "wrong"), "mc", synthetic_mc, tmp_path, limit=1, progress=False)
    assert caught.value.status == 401 and caught.value.retries == 0 and base in str(caught.value)


def test_llm_judge_through_endpoint(served, tmp_path: Path) -> None:
    """Unresolved answers go to the judge; its verdict is stored, and re-scoring does not ask again."""
    from medvl.llm import LLMClient

    base, key = served
    rows = [
        {"id": "1", "kind": "mc", "question": "q", "options": {"A": "CT", "B": "MR"}, "answer": "A",
         "prediction": "I would say computed tomography"},
        {"id": "2", "kind": "mc", "question": "q", "options": {"A": "CT", "B": "MR"}, "answer": "B",
         "prediction": "B"},
    ]  # fmt: skip
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    judge = LLMClient(base, api_key=key)
    report = rescore(path, judge=(judge, "tiny"))
    stored = [json.loads(x) for x in path.read_text().splitlines()]
    assert "judge" in stored[0] and "judge" not in stored[1]
    assert stored[0]["judge"] in ("A", "B", "Z")  # the tiny model's verdict, whatever it is
    assert report["overall"]["unresolved"] == 0  # the judge resolved (possibly to Z, a refusal)
    assert report["overall"]["accuracy"] == ((stored[0]["judge"] == "A") + 1) / 2
    asked = judge.usage.paid
    assert 1 <= asked <= 3  # one row; asked again (3 times in all) only while a reply resolves nothing
    rescore(path, judge=(judge, "tiny"))
    assert judge.usage.paid == asked  # the stored verdict is not asked for again
