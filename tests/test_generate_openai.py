"""The `openai` generation backend against real servers on loopback: `medvl serve` with the tiny model
(transport, concurrency, retries on its 429) and a scripted OpenAI-style fixture server that writes
correct samples from the fact sheet it is sent or, on demand, the faults a real LLM makes (malformed
JSON, wrong labels, wrong laterality, refusals, the wrong language, time-outs), so that every check is
seen to fire and every rejection carries its reason. Also: the repair attempt, the cache (an identical
re-run sends nothing), the dry run (sends nothing), batch files (a round trip gives the online samples),
and the region outline drawn on a copy of the image only."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import pickle
import re
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import chat_completion, chat_error
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from test_generate import record, write_curated
from test_llm import StatusCounter
from test_serve import KEY, SETTINGS, _corpus, serving
from typer.testing import CliRunner

from medvl.generate import openai_backend
from medvl.generate.backend import seeded
from medvl.generate.batch import load_results, write_requests
from medvl.generate.openai_backend import PRICES, OpenAIBackend, load_prompts
from medvl.llm import LLMError
from medvl.samples import FORMATS, FactSheet, fact_sheet, validate, zh

# ---------------------------------------------------------------- records


def facts_and_image(i: int = 0) -> tuple[FactSheet, Image.Image]:
    """test_generate's hand-built CT record: the liver on the patient's right (mask region), a liver
    cancer box on the patient's left, spleen and bladder verified absent."""
    rec = record(i)
    return fact_sheet(rec), Image.open(io.BytesIO(rec["image"]["bytes"]))


def jobs(n_records: int = 2, langs: tuple[str, ...] = ("en", "zh"), seed: int = 0) -> list[tuple]:
    """(facts, format, language, generator, image) for every format, seeded as the pipeline seeds."""
    out = []
    for i in range(n_records):
        facts, image = facts_and_image(i)
        out += [(facts, f, lang, seeded(seed, facts.record_id, f), image) for f in FORMATS for lang in langs]
    return out


# ---------------------------------------------------------------- the fixture writer

SIDE_ZH = {"left": "左", "right": "右"}


class WriterFixture:
    """TEST FIXTURE, not an implementation of anything: an ASGI app answering `POST
    /v1/chat/completions` in OpenAI's shape, standing in for an LLM (served on loopback by test_serve's
    `serving`). From the fact sheet and task in a request it writes a correct JSON reply, and remembers
    a Chinese version of every string it wrote, which it returns for a translation request. Each
    request takes the next entry of `script` (keys: mode, delay in seconds, status), then `default`;
    the mode makes the reply faulty: "malformed", "schema", "cut", "refusal field", "wrong label",
    "missing label", "laterality", "refusal", "leak", "language", "image token", "box", "length",
    "zh numbers". It records every request body and the most requests it held at once."""

    def __init__(self) -> None:
        self.script: list[dict] = []
        self.default: dict = {}
        self.requests: list[dict] = []
        self.zh: dict[str, str] = {}  # English string -> its Chinese version
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.url = ""
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self.chat)

    async def chat(self, request: Request) -> JSONResponse:
        body = await request.json()
        with self.lock:
            step = self.script.pop(0) if self.script else self.default
            self.requests.append(body)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(step.get("delay", 0))
            if step.get("status", 200) != 200:
                return JSONResponse(chat_error("scripted failure"), status_code=step["status"])
            content, finish, refusal = self.answer(body, step.get("mode", "good"))
            usage = {
                "prompt_tokens": len(json.dumps(body)) // 4,
                "completion_tokens": len(content or "") // 4,
            }
            return JSONResponse(
                chat_completion(body["model"], content, finish_reason=finish, usage=usage, refusal=refusal)
            )
        finally:
            with self.lock:
                self.in_flight -= 1

    def answer(self, body: dict, mode: str) -> tuple[str | None, str, str | None]:
        """(content, finish_reason, refusal) for a request."""
        messages = body["messages"]
        system, user = messages[0]["content"], messages[1]["content"]
        text = user if isinstance(user, str) else next(p["text"] for p in user if p["type"] == "text")
        if mode == "malformed":
            return '{"question": "Describe this image.", "answer": "This is', "stop", None
        if mode == "cut":
            return '{"question": "Describe this image.", "answer": "This is a', "length", None
        if mode == "refusal field":
            return None, "stop", "I can't help with that."
        if system.startswith("You translate"):
            source = json.loads(text.split("Translate:\n", 1)[1])
            out = self._translate(source)
            if mode == "zh numbers":
                out = json.loads(re.sub(r"\[(\d+)", lambda m: f"[{int(m.group(1)) + 1}", json.dumps(out)))
            return json.dumps(out, ensure_ascii=False), "stop", None
        facts = json.loads(text.split("Fact sheet:\n", 1)[1].split("\n\nTask:", 1)[0])
        task = "Task:" + text.split("\n\nTask:", 1)[1]
        return json.dumps(self._write(facts, task, mode), ensure_ascii=False), "stop", None

    def _translate(self, value):
        if isinstance(value, dict):
            return {k: self._translate(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._translate(v) for v in value]
        return self.zh.get(value, value)

    def _pair(self, en: str, zh_text: str) -> str:
        with self.lock:
            self.zh[en] = zh_text
        return en

    def _write(self, facts: dict, task: str, mode: str) -> dict:
        mod, region = facts["modality"], facts["body_region"]
        labels, absent = facts["present"], facts["verified_absent"]
        names = ", ".join(f"the {x}" for x in labels)
        names_zh = "、".join(zh(x) for x in labels)
        loc, loc_zh = [], []
        for r in facts["regions"]:
            side = r["patient_side"]
            if side in ("left", "right"):
                if mode == "laterality":
                    side = {"left": "right", "right": "left"}[side]
                loc.append(f"The {r['finding']} lies on the patient's {side}.")
                loc_zh.append(f"{zh(r['finding'])}位于患者{SIDE_ZH[side]}侧。")
        shows = self._pair(
            f"This {mod} image of the {region} shows {names}. " + " ".join(loc),
            f"这张{zh(region)}{zh(mod)}图像显示{names_zh}。" + "".join(loc_zh),
        )
        if task.startswith("Task: an image caption"):
            out = {"question": self._pair("Describe this image.", "请描述这张图像。"), "answer": shows}
        elif task.startswith("Task: a region caption"):
            box = re.search(r"\[\d+, \d+, \d+, \d+\]", task).group(0)
            label = re.search(r"\(([^)]+)\)", task.split("exactly as written", 1)[1]).group(1)
            asked = "[1, 2, 3, 4]" if mode == "box" else box
            out = {
                "question": self._pair(f"What does the area {asked} show?", f"区域{asked}显示的是什么？"),
                "answer": self._pair(f"This area shows the {label}.", f"该区域显示{zh(label)}。"),
            }
        elif task.startswith("Task: one free-form instruction"):
            out = {
                "question": self._pair("Explain what this image shows.", "请解释这张图像显示的内容。"),
                "answer": shows,
            }
        elif task.startswith("Task: a conversation"):
            n = int(re.search(r"exactly (\d+) question-answer turns", task).group(1))
            turns = [
                (("What does this image show?", "这张图像显示了什么？"), (shows, self.zh[shows])),
                (
                    ("Which part of the body is shown?", "显示的是身体的哪个部位？"),
                    (f"The {region}.", f"{zh(region)}。"),
                ),
                (
                    ("What kind of image is this?", "这是什么类型的图像？"),
                    (f"This is a {mod} image.", f"这是一张{zh(mod)}图像。"),
                ),
                (
                    ("Is anything else notable?", "还有其他值得注意的吗？"),
                    ("Nothing else stands out.", "其他无特别之处。"),
                ),
            ]
            asked = re.search(r'asks whether "([^"]+)" is present', task)
            if asked:
                x = asked.group(1)
                turns = turns[: n - 1] + [
                    ((f"Is there any {x}?", f"有{zh(x)}吗？"), (f"No {x} is seen.", f"未见{zh(x)}。"))
                ]
            out = {"turns": [{"question": self._pair(*q), "answer": self._pair(*a)} for q, a in turns[:n]]}
        elif task.startswith("Task: the stem of a multiple-choice"):
            out = {
                "question": self._pair("Which of these does this image show?", "这张图像显示的是以下哪一项？")
            }
        else:
            topic = re.search(r'topic\s+"([^"]+)"', task).group(1)
            out = {
                "question": self._pair(f"What is the {topic}?", f"什么是{zh(topic)}？"),
                "answer": self._pair(
                    f"The {topic} is a structure assessed on medical images by its position, size and shape.",
                    f"{zh(topic)}是医学影像中按位置、大小和形态评估的结构。",
                ),
            }
        main = "answer" if "answer" in out else None
        if mode == "schema":
            return {"caption": "This is a CT image."}
        if mode == "image token":  # the writer adds one; the backend adds its own
            first = out["turns"][0] if "turns" in out else out
            first["question"] = "<image>\n" + first["question"]
        faults = {
            "wrong label": lambda a: f"{a} It also shows the {absent[0]}.",
            "missing label": lambda a: f"This is a {mod} image of the {region}.",
            "refusal": lambda a: "I'm sorry, I cannot see the image.",
            "leak": lambda a: f"Based on the caption, {a}",
            "language": lambda a: (
                "La imagen muestra el abdomen con órganos de aspecto normal y sin hallazgos."
            ),
            "length": lambda a: "It is normal.",  # within the schema, under the length bound
        }
        if mode in faults:
            if main:
                out[main] = faults[mode](out[main])
            elif "turns" in out:
                out["turns"][0]["answer"] = faults[mode](out["turns"][0]["answer"])
            else:
                out["question"] = faults[mode](out["question"])
        return out


@pytest.fixture
def writer() -> Iterator[WriterFixture]:
    fixture = WriterFixture()
    with serving(fixture.app) as url:
        fixture.url = f"{url}/v1"
        yield fixture


def backend(url: str, cache: Path, **kw) -> OpenAIBackend:
    """A backend whose client backs off briefly enough for tests."""
    kw = {"model": "writer", "backoff": 0.02, "timeout": 10.0, **kw}
    return OpenAIBackend(url, kw.pop("model"), cache_dir=cache, **kw)


def images_sent(body: dict) -> list[Image.Image]:
    parts = [p for m in body["messages"] if isinstance(m["content"], list) for p in m["content"]]
    return [
        Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",", 1)[1])))
        for p in parts
        if p["type"] == "image_url"
    ]


# ---------------------------------------------------------------- correct replies


def test_correct_replies_become_valid_samples_in_every_format_and_language(writer, tmp_path):
    be = backend(writer.url, tmp_path / "cache")
    job_list = jobs(1)
    results = be.write_many(job_list)
    by_id = {s["id"]: s for r in results for s in r}
    assert len(by_id) == 12
    for (facts, fmt, lang, _, _), [sample] in zip(job_list, results):
        original = by_id[sample["pair_id"]] if lang == "zh" else None
        assert "error" not in sample, sample.get("error")
        assert validate(sample, facts, original) == [], (fmt, lang, sample)
        assert sample["provenance"]["prompt_version"] == load_prompts().version(fmt, lang)
    # 6 English requests and 6 translations; a Chinese sample re-reads its English answer from the cache
    assert len(writer.requests) == 12 and be.llm.usage.cached == 6
    assert writer.max_in_flight > 1  # write_many keeps several requests in flight
    en, cn = by_id[f"{facts.record_id}#perception-en"], by_id[f"{facts.record_id}#perception-zh"]
    assert (
        en["answer"] in "ABCD" and cn["answer"] == en["answer"] and len(cn["options"]) == len(en["options"])
    )
    assert cn["options"] == [zh(o) for o in en["options"]]
    # the backend travels to worker processes without its client (built again there by setup)
    copy = pickle.loads(pickle.dumps(be))
    assert copy.config() == be.config() and copy._llm is None and copy.llm.cache_dir == be.llm.cache_dir
    text = [b for b in writer.requests if "Task: a text-only" in json.dumps(b)]
    assert text and not images_sent(text[0])  # text-only Q&A is asked without the image


# ---------------------------------------------------------------- every check fires


FAULTS = [
    # (fault, format, the validator's reason, words of the backend's own account)
    ("malformed", "caption", "schema", "not valid JSON"),
    ("schema", "caption", "schema", "does not match the schema"),
    ("cut", "caption", "schema", "cut off at max_tokens"),
    ("refusal field", "caption", "schema", "the model refused"),
    ("wrong label", "caption", "asserted absent", "asserted absent"),
    ("missing label", "caption", "missing label", "missing label"),
    ("laterality", "caption", "laterality", "laterality"),
    ("refusal", "instruction", "leak phrase", "leak phrase"),
    ("leak", "dialogue", "leak phrase", "leak phrase"),
    ("language", "caption", "language", "language"),
    ("image token", "region", "image token", "image token"),
    ("box", "region", "box mismatch", "box mismatch"),
    ("length", "caption", "length", "length"),
]


@pytest.mark.parametrize(("fault", "fmt", "reason", "account"), FAULTS, ids=[f[0] for f in FAULTS])
def test_every_check_fires_after_one_repair_and_the_rejection_says_why(
    writer, tmp_path, fault, fmt, reason, account
):
    writer.default = {"mode": fault}  # the answer and the repair are both faulty
    facts, image = facts_and_image()
    [sample] = backend(writer.url, tmp_path / "cache").write(
        facts, fmt, "en", seeded(0, facts.record_id, fmt), image
    )
    assert reason in validate(sample, facts)
    assert account in sample["error"], sample["error"]
    assert len(writer.requests) == 2  # the answer and one repair, no more
    first, repair = writer.requests
    assert repair["messages"][: len(first["messages"])] == first["messages"]
    assert repair["messages"][-2]["role"] == "assistant"
    assert account in repair["messages"][-1]["content"]  # the reason is sent back


def test_a_chinese_version_that_changes_a_number_is_rejected(writer, tmp_path):
    facts, image = facts_and_image()
    be = backend(writer.url, tmp_path / "cache")
    [english] = be.write(facts, "region", "en", seeded(0, facts.record_id, "region"), image)
    writer.default = {"mode": "zh numbers"}
    [chinese] = be.write(facts, "region", "zh", seeded(0, facts.record_id, "region"), image)
    assert validate(english, facts) == []
    assert "zh mismatch" in validate(chinese, facts, english) and "zh mismatch" in chinese["error"]
    assert len(writer.requests) == 3  # English once (then from the cache), the translation and its repair


def test_a_repair_that_succeeds_keeps_the_sample(writer, tmp_path):
    writer.script = [{"mode": "malformed"}]
    facts, image = facts_and_image()
    [sample] = backend(writer.url, tmp_path / "cache").write(
        facts, "caption", "en", seeded(0, "x", "c"), image
    )
    assert "error" not in sample and validate(sample, facts) == []
    first, repair = writer.requests
    assert repair["messages"][-2]["content"].startswith(
        '{"question": "Describe this image.", "answer": "This is'
    )
    assert "not valid JSON" in repair["messages"][-1]["content"]


def test_no_answer_in_time_is_a_rejection_with_the_reason_and_is_asked_again_next_run(writer, tmp_path):
    writer.default = {"delay": 3.0}
    facts, image = facts_and_image()
    rng = lambda: seeded(0, facts.record_id, "caption")  # noqa: E731
    slow = backend(writer.url, tmp_path / "cache", timeout=0.5, max_retries=1)
    [sample] = slow.write(facts, "caption", "en", rng(), image)
    assert validate(sample, facts) == ["schema"] and sample["conversations"] == []
    assert "no answer" in sample["error"] and "no answer within 0.5 s" in sample["error"]
    assert len(writer.requests) == 2  # the request and its one retry
    writer.default = {}
    [again] = backend(writer.url, tmp_path / "cache").write(facts, "caption", "en", rng(), image)
    assert validate(again, facts) == [] and len(writer.requests) == 3  # a failure is not cached


def test_a_wrong_key_stops_the_job_instead_of_rejecting_every_sample(writer, tmp_path):
    writer.script = [{"status": 401}]
    facts, image = facts_and_image()
    with pytest.raises(LLMError) as caught:
        backend(writer.url, tmp_path / "cache").write(facts, "caption", "en", seeded(0, "x", "c"), image)
    assert caught.value.status == 401 and len(writer.requests) == 1


# ---------------------------------------------------------------- the cache


def test_an_identical_rerun_sends_no_request(writer, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = backend(writer.url, cache).write_many(jobs(2))
    sent = len(writer.requests)
    assert sent == 24
    again = backend(writer.url, cache)
    assert again.write_many(jobs(2)) == first
    assert len(writer.requests) == sent and again.llm.usage.requests == 0

    # every part of the key asks anew: the seed, the model, a sampling parameter, the prompt version
    def new_requests(be: OpenAIBackend, seed: int = 0) -> int:
        before = len(writer.requests)
        be.write_many(jobs(1, ("en",), seed))
        return len(writer.requests) - before

    assert new_requests(backend(writer.url, cache), seed=1) == 6
    assert new_requests(backend(writer.url, cache, model="writer-2")) == 6
    assert new_requests(backend(writer.url, cache, temperature=0.2)) == 6
    assert new_requests(backend(writer.url, cache, max_tokens=100)) == 6
    prompts = load_prompts()
    caption = {
        **prompts.formats["caption"],
        "prompt_version": "2",
        "task": prompts.formats["caption"]["task"] + "Be brief.\n",
    }
    monkeypatch.setattr(
        openai_backend,
        "load_prompts",
        lambda: replace(prompts, formats={**prompts.formats, "caption": caption}),
    )
    assert new_requests(backend(writer.url, cache)) == 1  # only the caption's prompt changed


# ---------------------------------------------------------------- dry run


def test_dry_run_counts_and_prices_without_sending(writer, tmp_path):
    cache = tmp_path / "cache"
    be = backend(writer.url, cache)
    requests = [r for job in jobs(2) for r in be.requests(*job)]
    estimate = be.estimate(requests)
    assert writer.requests == []  # nothing sent
    assert estimate.requests == 12  # the English answers; a Chinese sample waits on its English one
    assert estimate.prompt_tokens > 12 * 300 and estimate.completion_tokens > 0
    assert estimate.cost is None and "unknown" in estimate.summary()  # no price for "writer": not $0
    priced = backend(writer.url, cache, model="gpt-4o")
    e = priced.estimate([r for job in jobs(2) for r in priced.requests(*job)])
    price = PRICES["gpt-4o"]
    assert e.cost == pytest.approx((e.prompt_tokens * price.input + e.completion_tokens * price.output) / 1e6)
    assert e.prompt_tokens == estimate.prompt_tokens and f"${e.cost:.4f}" in e.summary()
    # once answered, nothing is left to send
    be.write_many(jobs(2))
    assert [r for job in jobs(2) for r in be.requests(*job)] == [] and len(writer.requests) == 24


# ---------------------------------------------------------------- batch files


def run_batch(url: str, batch: Path, results: Path, fail: int = 0) -> None:
    """What the Batch API or `vllm run-batch` does with an input file, done against the fixture: each
    line's body POSTed to the endpoint, one results line per input line (the first `fail` as errors)."""
    lines = []
    with httpx.Client(timeout=30) as client:
        for i, line in enumerate(batch.read_text().splitlines()):
            request = json.loads(line)
            assert set(request) == {"custom_id", "method", "url", "body"}
            assert request["method"] == "POST" and request["url"] == "/v1/chat/completions"
            if i < fail:
                row = {"id": f"r{i}", "custom_id": request["custom_id"], "response": None,
                       "error": {"code": "server_error", "message": "the batch worker crashed"}}  # fmt: skip
            else:
                r = client.post(url.removesuffix("/v1") + request["url"], json=request["body"])
                response = {"status_code": r.status_code, "request_id": f"q{i}", "body": r.json()}
                row = {"id": f"r{i}", "custom_id": request["custom_id"], "error": None, "response": response}
            lines.append(json.dumps(row, ensure_ascii=False))
    results.write_text("\n".join(lines) + "\n")


def test_batch_round_trip_gives_the_online_samples(writer, tmp_path):
    online = backend(writer.url, tmp_path / "online").write_many(jobs(2))

    be = backend(writer.url, tmp_path / "batch")
    rounds = []
    for n in range(4):
        requests = [r for job in jobs(2) for r in be.requests(*job)]
        if not requests:
            break
        written = write_requests(tmp_path / f"batch-{n}.jsonl", requests)
        rounds.append(written)
        run_batch(
            writer.url,
            tmp_path / f"batch-{n}.jsonl",
            tmp_path / f"results-{n}.jsonl",
            fail=1 if n == 0 else 0,
        )
        loaded = load_results(tmp_path / f"results-{n}.jsonl", be.llm)
        assert len(loaded.answered) == written - (1 if n == 0 else 0)
        assert list(loaded.failed.values()) == (["the batch worker crashed"] if n == 0 else [])
    # 12 English answers (one line failed); 11 translations + the failed one again; its translation
    assert rounds == [12, 12, 1], rounds
    sent = len(writer.requests)
    assert be.write_many(jobs(2)) == online
    assert len(writer.requests) == sent  # every answer came from the batch results


# ---------------------------------------------------------------- the image


def test_the_region_is_outlined_on_a_copy_and_the_stored_image_is_untouched(writer, tmp_path):
    facts, image = facts_and_image()
    stored = tmp_path / "out" / "images" / f"{facts.image_sha256}.png"
    stored.parent.mkdir(parents=True)
    stored.write_bytes(record()["image"]["bytes"])
    before = hashlib.sha256(stored.read_bytes()).hexdigest()
    be = backend(writer.url, tmp_path / "cache", image_root=tmp_path / "out")  # reads the stored file
    [region] = be.write(facts, "region", "en", seeded(0, facts.record_id, "region"), None)
    [caption] = be.write(facts, "caption", "en", seeded(0, facts.record_id, "caption"), None)
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == before
    original = np.array(image.convert("RGB")).astype(int)
    [with_box] = images_sent(writer.requests[0])
    [plain] = images_sent(writer.requests[1])
    assert np.array_equal(np.array(plain.convert("RGB")), original)  # other formats: the image as stored
    sent = np.array(with_box.convert("RGB")).astype(int)
    changed = np.argwhere((sent != original).any(axis=2))
    assert len(changed) > 0 and (sent[tuple(changed.T)] == [255, 0, 0]).all()  # only red outline pixels
    x0, y0, x1, y1 = (round(v * s / 1000) for v, s in zip(region["box"], (64, 48, 64, 48)))
    ys, xs = changed.T
    assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1  # on the box's edge
    assert (sent[y0 + 3 : y1 - 3, x0 + 3 : x1 - 3] == original[y0 + 3 : y1 - 3, x0 + 3 : x1 - 3]).all()
    assert validate(region, facts) == [] and validate(caption, facts) == []


# ---------------------------------------------------------------- the command


def test_medvl_generate_openai_dry_run_batch_files_and_run(writer, tmp_path):
    from medvl.cli import app

    curated = write_curated(tmp_path / "curated", [record(0), record(1)])
    out = tmp_path / "gen"
    base = ["generate", str(curated), "--out", str(out), "--backend", "openai", "--base-url", writer.url,
            "--model", "writer", "--zh-share", "1"]  # fmt: skip
    runner = CliRunner()
    dry = runner.invoke(app, [*base, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "12 requests + 12 translations after them to writer" in dry.output and "unknown" in dry.output
    assert writer.requests == [] and not out.exists()  # nothing sent, nothing written

    batch = runner.invoke(app, [*base, "--batch-out", str(tmp_path / "b.jsonl")])
    assert batch.exit_code == 0 and len((tmp_path / "b.jsonl").read_text().splitlines()) == 12
    run_batch(writer.url, tmp_path / "b.jsonl", tmp_path / "r.jsonl")
    sent = len(writer.requests)

    # results of another job's requests (here: another seed) are refused rather than paid for again
    wrong = runner.invoke(app, [*base, "--seed", "1", "--batch-in", str(tmp_path / "r.jsonl")])
    assert wrong.exit_code != 0 and "none of its answers is a request of this job" in str(wrong.exception)
    assert len(writer.requests) == sent
    read = runner.invoke(app, [*base, "--batch-in", str(tmp_path / "r.jsonl"), "--dry-run"])
    assert "12 answers read into the cache" in read.output
    assert "12 requests to writer:" in read.output  # now the translations, nothing after them
    writer.script = [{"mode": "malformed"}]  # one translation needs its repair, in the next round
    done = runner.invoke(app, [*base, "--concurrency", "4"])
    assert done.exit_code == 0, done.output
    report = json.loads((out / "report.json").read_text())
    assert report["kept"] == 24 and report["rejected"] == 0, report
    assert len(writer.requests) - sent == 13  # only the translations and the repair, concurrently
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["provenance"]["backend"] for s in samples} == {"openai"}
    rerun = runner.invoke(app, [*base, "--dry-run"])
    assert "0 requests to writer" in rerun.output and len(writer.requests) - sent == 13


# ---------------------------------------------------------------- against `medvl serve`


def prompt_model(folder: Path) -> Path:
    """The tiny preset (random weights) with its tokenizer trained on the generation prompts too, so
    that a prompt (system rules, fact sheet, schema: about 600 of its tokens) fits its context."""
    from medvl.generate.openai_backend import messages, plan
    from medvl.model.build import build_from_configs, load_preset
    from medvl.model.tokenizer import train_tokenizer

    texts = []
    for facts, fmt, _, rng, _ in jobs(1, ("en",)):
        p = plan(facts, fmt, rng)
        for m in messages(facts, p, None) if p else []:
            texts.append(m["content"] if isinstance(m["content"], str) else m["content"][-1]["text"])
    spec = load_preset("tiny")
    spec.llm_config = {**spec.llm_config, "max_position_embeddings": 2048}  # room for the repair turn
    build_from_configs(spec, train_tokenizer(_corpus() + texts, vocab_size=2048)).save(folder)
    return folder


@pytest.fixture(scope="module")
def prompt_vlm(tmp_path_factory):
    from medvl.model.build import load

    return load(prompt_model(tmp_path_factory.mktemp("tiny") / "m"))


class InFlight(StatusCounter):
    """test_llm's status counter, also counting the most requests the server held at once."""

    def __init__(self, app) -> None:
        super().__init__(app)
        self.now = self.max_in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # the lifespan scope lasts as long as the server
            return await super().__call__(scope, receive, send)
        self.now += 1  # one event loop: no lock needed
        self.max_in_flight = max(self.max_in_flight, self.now)
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.now -= 1


def serve_backend(url: str, cache: Path, **kw) -> OpenAIBackend:
    """Two tokens per answer: the tiny model writes no JSON at any length, and each token costs time."""
    return OpenAIBackend(f"{url}/v1", "tiny", api_key=KEY, cache_dir=cache, max_tokens=2, **kw)


@pytest.mark.slow  # a CPU model reading ~600-token prompts: ~2 s a request here
def test_medvl_serve_transport_and_concurrency(prompt_vlm, tmp_path):
    """The tiny model's replies are not JSON: every sample is asked, repaired once and rejected with
    the reason, over the real server, at most `concurrency` requests in flight."""
    from medvl.serve.api import create_app

    app = InFlight(create_app(prompt_vlm, SETTINGS))
    with serving(app) as url:
        be = serve_backend(url, tmp_path / "cache", concurrency=4, backoff=0.05)
        results = be.write_many([j for j in jobs(2, ("en",)) if j[1] in ("caption", "region", "text")])
    samples = [s for r in results for s in r]
    assert len(samples) == 6
    for s in samples:
        assert "error" in s and "cut off at max_tokens=2" in s["error"], s["error"]
    assert app.counts[200] == 12 == be.llm.usage.paid  # an answer and a repair each
    assert be.llm.usage.prompt_tokens > 12 * 500  # the image and the prompt reached the model
    assert be.llm.usage.requests == 12 and 1 < app.max_in_flight <= 4


@pytest.mark.slow  # a CPU model reading ~600-token prompts: ~2 s a request here
def test_medvl_serve_429_is_retried_until_every_request_is_answered(prompt_vlm, tmp_path):
    from medvl.serve.api import create_app

    settings = replace(SETTINGS, max_queue=1, max_batch_size=1)
    app = StatusCounter(create_app(prompt_vlm, settings))
    with serving(app) as url:
        be = serve_backend(url, tmp_path / "cache", concurrency=8, max_retries=60, backoff=0.05)
        results = be.write_many([j for j in jobs(2, ("en",)) if j[1] in ("caption", "text")])
    errors = [s["error"] for r in results for s in r]
    assert len(errors) == 4 and not [e for e in errors if "no answer" in e], errors
    assert app.counts[429] > 0 and be.llm.usage.retries == app.counts[429], app.counts
    assert app.counts[200] == 8 == be.llm.usage.paid


def test_every_perception_kind_makes_a_task_for_the_writer():
    """A perception plan may ask about any kind the template offers, a clinical task's labels
    ("present:<task>") included: each gives the writer a task naming its target and its options."""
    from medvl.generate.openai_backend import option_texts, plan, task_text
    from medvl.generate.template import perception_items
    from medvl.samples import fact_sheet

    organ, disease = "Organ Recognition", "Disease Diagnosis"
    groups = {"Liver": organ, "Spleen": organ, "Bladder": organ, "Liver Cancer": disease, "Cyst": disease}
    f = fact_sheet(
        record(annotation=json.dumps({"exhaustive": True, "label_space": list(groups), "groups": groups}))
    )
    wanted = set(perception_items(f, np.random.default_rng(0)))
    seen: set[str] = set()
    for seed in range(200):
        p = plan(f, "perception", np.random.default_rng(seed))
        assert p is not None
        p.lang = "en"
        text = task_text(p)
        assert all(o in text for o in option_texts(p)) and len(set(p.options)) == len(p.options)
        gold = p.options[ord(p.answer) - ord("A")]
        assert gold not in f.negatives
        if p.kind.startswith("present:"):  # the gold a positive of the task, every other option a negative
            assert gold in f.labels and set(p.options) - {gold} <= set(f.negatives)
        seen.add(p.kind)
    assert seen == wanted and {"present:Organ Recognition", "present:Disease Diagnosis"} <= seen
