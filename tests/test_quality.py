"""`medvl quality`: each of the five dimensions fires on a crafted bad sample and passes good ones; a
missing score fails; the benchmark guard drops exact and re-encoded copies and lists them; the LLM judge
against a loopback OpenAI-compatible fixture server (malformed replies included); kill -9 and re-run.

Inputs are built by hand in the sample format of medvl.samples (the `medvl generate` output layout:
samples.jsonl + images/<sha256>.png)."""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from medvl.errors import InputError
from medvl.quality.config import load_thresholds
from medvl.quality.pipeline import DIMENSIONS, Judge, decide, quality
from medvl.samples import FactSheet

REPO = Path(__file__).resolve().parent.parent
MC = "Answer with the option's letter from the given choices directly."


# ---------------------------------------------------------------- building a generate folder by hand


def texture(seed: int, size: int = 64) -> np.ndarray:
    """A grey image with structure (a random walk of blobs), different for every seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.zeros((size, size))
    for _ in range(6):
        cy, cx, r = rng.uniform(8, size - 8, 2).tolist() + [rng.uniform(4, 14)]
        img += rng.uniform(60, 160) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


class Gen:
    """A `medvl generate`-style output folder, written sample by sample."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "images").mkdir(parents=True, exist_ok=True)
        self.samples: list[dict] = []

    def image(self, px: np.ndarray) -> tuple[str, str]:
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, format="PNG")
        sha = hashlib.sha256(buf.getvalue()).hexdigest()
        (self.root / "images" / f"{sha}.png").write_bytes(buf.getvalue())
        return f"images/{sha}.png", sha

    def facts(self, record: str, px: np.ndarray | None, **kw) -> tuple[dict, str | None]:
        rel, sha = self.image(px) if px is not None else (None, "")
        f = FactSheet(
            record_id=record,
            source=kw.pop("source", "toy-ct"),
            split="train",
            modality=kw.pop("modality", "CT"),
            body_region="Abdomen",
            department="Gastroenterology and Hepatology",
            task="2D detection",
            clinical_task="Organ Recognition",
            labels=kw.pop("labels", ["Liver"]),
            negatives=kw.pop("negatives", ["Spleen"]),
            label_space=["Kidney", "Liver", "Spleen"],
            boxes=[("Liver", (100, 200, 400, 500))],
            convention=None,
            width=64 if px is None else px.shape[1],
            height=64 if px is None else px.shape[0],
            image_sha256=sha,
        )
        return json.loads(f.to_json()), rel

    def add(
        self,
        sid: str,
        record: str,
        px: np.ndarray | None,
        turns: list[tuple[str, str]],
        fmt: str,
        lang: str = "en",
        facts_kw: dict | None = None,
        **extra,
    ) -> dict:
        facts, rel = self.facts(record, px, **(facts_kw or {}))
        conv = []
        for q, a in turns:
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        s = {
            "id": sid,
            "conversations": conv,
            "format": fmt,
            "lang": lang,
            "provenance": {
                "record_id": record,
                "source": facts["source"],
                "split": "train",
                "format": fmt,
                "lang": lang,
                "prompt_version": "test-v1",
                "backend": "hand",
                "model": "",
                "seed": 0,
            },
            "facts": facts,
            **extra,
        }
        if rel:
            s["image"] = rel
        self.samples.append(s)
        return s

    def write(self) -> Path:
        (self.root / "samples.jsonl").write_text(
            "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in self.samples)
        )
        return self.root


CAPTION_EN = "An axial CT image of the abdomen in which the liver is clearly visible."
CAPTION_ZH = "这是一张腹部的轴位CT图像，图中肝脏清晰可见。"


TEXT_QA = [
    ("What does the liver do?", "The liver filters the blood, stores glycogen and makes bile for digestion."),
    (
        "Where is the gallbladder?",
        "The gallbladder sits under the liver and stores the bile the liver makes.",
    ),
    (
        "What do the kidneys do?",
        "The kidneys filter waste from the blood and balance water and salts in urine.",
    ),
    ("What is the portal vein?", "A vessel that carries blood from the gut into the liver for processing."),
    (
        "What is bile for?",
        "Bile emulsifies dietary fat in the small intestine so that enzymes can digest it.",
    ),
]


def good_samples(g: Gen, seed: int = 0) -> None:
    px = texture(seed)
    rec = f"toy-ct/r{seed}.png"
    g.add(f"cap{seed}", rec, px, [("<image>\nDescribe this image.", CAPTION_EN)], "caption")
    g.add(
        f"cap{seed}-zh",
        rec,
        px,
        [("<image>\n描述这张图像。", CAPTION_ZH)],
        "caption",
        lang="zh",
        pair_id=f"cap{seed}",
    )
    g.add(
        f"mc{seed}",
        rec,
        px,
        [(f"<image>\nWhich organ is shown in this image?\nA. Spleen\nB. Liver\nC. Kidney\n{MC}", "Liver")],
        "perception",
        options=["Spleen", "Liver", "Kidney"],
        answer="B",
    )
    g.add(f"txt{seed}", rec, None, [TEXT_QA[seed % len(TEXT_QA)]], "text")


THRESHOLDS = {"alignment": {"prior_min_support": 3, "prior_min_share": 0.9}}


def config(tmp_path: Path, **sections) -> Path:
    path = tmp_path / "thresholds.yaml"
    path.write_text(yaml.safe_dump({**THRESHOLDS, **sections}))
    return path


def rows(out: Path) -> dict[str, dict]:
    table = pq.read_table(sorted((out / "scores" / "data").glob("*.parquet"))).to_pylist()
    return {r["id"]: r for r in table}


# ---------------------------------------------------------------- the five dimensions


@pytest.fixture
def crafted(tmp_path) -> Path:
    g = Gen(tmp_path / "gen")
    good_samples(g, 0)
    good_samples(g, 1)
    cap = [("<image>\nDescribe this image.", CAPTION_EN)]
    # 1. image validity: a blank image, and another record's copy of record r0's image
    g.add("blank", "toy-ct/blank.png", np.full((64, 64), 90, np.uint8), cap, "caption")
    g.add("dup", "toy-ct/copy-of-r0.png", texture(0), cap, "caption")
    g.add("strip", "toy-ct/strip.png", texture(7, 64)[:8], cap, "caption")
    # 2. annotation fidelity: the spleen (verified absent) asserted present
    g.add(
        "wrong-label",
        "toy-ct/r2.png",
        texture(2),
        [
            (
                "<image>\nDescribe this image.",
                "An axial CT image of the abdomen showing the liver and the spleen.",
            )
        ],
        "caption",
    )
    # 3. alignment: "which modality?" is answered CT by every sample: a prior answers it blind
    for k in range(5):
        g.add(
            f"blind{k}",
            f"toy-ct/m{k}.png",
            texture(10 + k),
            [(f"<image>\nWhat imaging modality is this?\nA. MR\nB. CT\nC. X-ray\n{MC}", "CT")],
            "perception",
            options=["MR", "CT", "X-ray"],
            answer="B",
        )
    # 4. language: a looping answer, an English sample in German, a Chinese one that changes a number
    g.add(
        "loop",
        "toy-ct/r3.png",
        texture(3),
        [("<image>\nDescribe this image.", "The liver is seen here. " * 6)],
        "caption",
    )
    g.add(
        "german",
        "toy-ct/r4.png",
        texture(4),
        [
            (
                "<image>\nBeschreiben Sie dieses Bild bitte genau.",
                "Ein axiales CT-Bild des Bauches, auf dem die Leber deutlich zu sehen ist.",
            )
        ],
        "caption",
    )
    g.add(
        "en5",
        "toy-ct/r5.png",
        texture(5),
        [("<image>\nHow many lesions are in the liver?", "There are 3 small lesions in the liver.")],
        "instruction",
    )
    g.add(
        "zh5",
        "toy-ct/r5.png",
        texture(5),
        [("<image>\n肝脏里有几个病灶？", "肝脏内可见4个小病灶。")],
        "instruction",
        lang="zh",
        pair_id="en5",
    )
    # ... and a text-only sample that nearly repeats a kept one
    g.add(
        "txt-again",
        "toy-ct/r6.png",
        None,
        [
            (
                "What does the liver do?",
                "The liver filters the blood, stores glycogen and makes bile for digestion!",
            )
        ],
        "text",
    )
    # 5. clinical validity (rules): an MRI named for a CT image
    g.add(
        "wrong-modality",
        "toy-ct/r8.png",
        texture(8),
        [
            (
                "<image>\nDescribe this image.",
                "An axial MRI image of the abdomen in which the liver is visible.",
            )
        ],
        "caption",
    )
    return g.write()


def test_each_dimension_fires_on_its_bad_sample_and_passes_good_ones(tmp_path, crafted):
    out = tmp_path / "q"
    report = quality([crafted], out, load_thresholds(config(tmp_path)))
    r = rows(out)
    for good in ("cap0", "cap0-zh", "mc0", "txt0", "cap1", "cap1-zh", "mc1", "txt1", "en5"):
        assert r[good]["kept"], (good, r[good]["failures"])
        assert all(r[good][f"{d}_score"] is not None for d in DIMENSIONS)
    expect = {
        "blank": "image: blank",
        "dup": "image: duplicate",
        "strip": "image: aspect ratio",
        "wrong-label": "fidelity: asserted absent",
        "blind0": "alignment: blind-answerable",
        "blind4": "alignment: blind-answerable",
        "loop": "language: repetition",
        "german": "language: language id",
        "zh5": "language: translation",
        "txt-again": "language: near duplicate",
        "wrong-modality": "clinical: score 0",
    }
    for sid, reason in expect.items():
        assert not r[sid]["kept"] and reason in r[sid]["failures"], (sid, r[sid]["failures"])
    assert r["dup"]["duplicate_of"] == "toy-ct/r0.png"
    assert r["blind0"]["blind_prior"] == 1.0 and r["blind0"]["blind_support"] == 4
    # "which organ?" was asked twice only: the prior has too little support to answer it
    assert r["mc0"]["blind_support"] == 1 and "alignment: blind-answerable" not in r["mc0"]["failures"]
    assert r["zh5"]["translation"] < 1 and "numbers" in r["zh5"]["language_reason"]
    assert r["cap0-zh"]["translation"] == 1.0
    assert {x["clinical_by"] for x in r.values()} == {"rules"}
    # counts add up, and the files hold what the scores say
    c = report["counts"]
    assert c["read"] == len(r) == c["kept"] + c["rejected"] and c["quarantined"] == 0
    kept = [json.loads(x) for x in (out / "kept.jsonl").read_text().splitlines()]
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert len(kept) == c["kept"] and len(rejected) == c["rejected"]
    assert sum(report["rejected_by_first_reason"].values()) == c["rejected"]
    assert sum(g["read"] for g in report["by_group"]) == c["read"]
    # kept images resolve from kept.jsonl's folder (the default image root of `medvl train`)
    for s in kept:
        if "image" in s:
            assert (out / s["image"]).is_file()
    assert {x["id"] for x in rejected} == {k for k, v in r.items() if not v["kept"]}
    assert all(x["quality"]["failures"] for x in rejected)
    for col in ("fidelity_score", "clinical_score", "repetition"):
        assert (out / "plots" / f"{col}.png").stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "rules: " in md and "question-only prior" in md and "image: blank" in md


def test_blind_answerable_can_be_flagged_instead_of_rejected(tmp_path, crafted):
    out = tmp_path / "q"
    quality(
        [crafted],
        out,
        load_thresholds(config(tmp_path, alignment={**THRESHOLDS["alignment"], "blind_answerable": "flag"})),
    )
    r = rows(out)["blind1"]
    assert r["kept"] and r["flags"] == ["alignment: blind-answerable"]


def test_a_missing_score_is_a_failure(tmp_path):
    row = {f"{d}_score": 1.0 for d in DIMENSIONS} | {"failures": []}
    assert decide(row)["kept"]
    for d in DIMENSIONS:
        decided = decide({**row, f"{d}_score": None})
        assert not decided["kept"] and decided["failures"] == [f"{d}: missing score"]
    # end to end: a sample without its fact sheet cannot be checked for fidelity or clinical validity
    g = Gen(tmp_path / "gen")
    good_samples(g)
    del g.samples[0]["facts"]
    out = tmp_path / "q"
    quality([g.write()], out, load_thresholds(config(tmp_path)))
    r = rows(out)["cap0"]
    assert not r["kept"]
    assert {"fidelity: missing score", "clinical: missing score"} <= set(r["failures"])


def test_thresholds_file_errors_name_the_key(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("image:\n  min_sid: 3\n")
    with pytest.raises(InputError, match=r"t\.yaml: image\.min_sid: unknown key"):
        load_thresholds(bad)
    bad.write_text("language:\n  max_repetition: lots\n")
    with pytest.raises(InputError, match=r"t\.yaml: language\.max_repetition: "):
        load_thresholds(bad)
    # a user's file overrides keys of the shipped one; the others keep the shipped values
    from medvl.quality.config import default_thresholds_path

    shipped = yaml.safe_load(default_thresholds_path().read_text())
    bad.write_text("image:\n  min_std: 9\n")
    t = load_thresholds(bad)
    assert t.image.min_std == 9 and t.image.min_side == shipped["image"]["min_side"]
    assert t.language.model_dump() == shipped["language"]


# ---------------------------------------------------------------- benchmark contamination guard


def test_benchmark_images_never_reach_kept_data(tmp_path):
    g = Gen(tmp_path / "gen")
    for k in range(4):
        good_samples(g, k)
    gen = g.write()
    # the benchmark: r1's image as a base64 PNG in a VLMEvalKit TSV; r2's resized and saved as JPEG
    bench = tmp_path / "bench"
    bench.mkdir()
    buf = io.BytesIO()
    Image.fromarray(texture(1)).save(buf, format="PNG")
    (bench / "bench.tsv").write_text(
        "index\tquestion\tanswer\timage\n0\tq?\tA\t" + base64.b64encode(buf.getvalue()).decode() + "\n"
    )
    folder = bench / "imgs"
    folder.mkdir()
    Image.fromarray(texture(2)).resize((96, 96), Image.BILINEAR).save(folder / "x.jpg", quality=85)
    Image.fromarray(texture(50)).save(folder / "unrelated.png")
    out = tmp_path / "q"
    report = quality([gen], out, load_thresholds(config(tmp_path)), benchmarks=[bench / "bench.tsv", folder])
    r = rows(out)
    for k, contaminated in ((0, False), (1, True), (2, True), (3, False)):
        for sid in (f"cap{k}", f"mc{k}"):
            assert (not r[sid]["kept"] and "image: benchmark image" in r[sid]["failures"]) == contaminated, (
                sid
            )
    assert r["cap1"]["benchmark_match"] == "exact" and r["cap1"]["benchmark"] == r["cap1"]["image_sha256"]
    # the resized JPEG has other pixels (no exact match) but the same pHash neighbourhood
    assert r["cap2"]["benchmark_match"] == "phash" and r["cap2"]["benchmark"] != r["cap2"]["image_sha256"]
    assert r["cap2"]["benchmark_distance"] <= 2
    kept = (out / "kept.jsonl").read_text()
    assert g.samples[4]["image"] not in kept and g.samples[8]["image"] not in kept
    b = report["benchmark"]
    assert b["images_seen"] == 3
    listed = {d["sha256"]: d for d in b["dropped"]}
    assert set(listed) == {r["cap1"]["benchmark"], r["cap2"]["benchmark"]}
    assert listed[r["cap1"]["benchmark"]]["samples"] == 3  # caption, its Chinese pair, multiple choice
    assert "bench.tsv line 2" in listed[r["cap1"]["benchmark"]]["where"]
    index = [json.loads(x) for x in (out / "benchmark_index.jsonl").read_text().splitlines()]
    assert len(index) == 3 and set(listed) <= {x["sha256"] for x in index}
    assert r["cap1"]["benchmark"] in (out / "report.md").read_text()


def test_slake_style_benchmark_and_exact_hash_is_curations(tmp_path):
    from medvl.imaging import content_hash, perceptual_hash
    from medvl.quality.images import benchmark_images, decode

    slake = tmp_path / "slake"
    (slake / "imgs" / "xmlab1").mkdir(parents=True)
    rgb = np.repeat(texture(3)[..., None], 3, axis=2)  # SLAKE stores grey scans as RGB JPEGs
    Image.fromarray(rgb).save(slake / "imgs" / "xmlab1" / "source.jpg")
    (slake / "test.json").write_text(json.dumps([{"img_name": "xmlab1/source.jpg", "question": "q"}] * 2))
    (found,) = list(benchmark_images(slake))
    px = decode(slake / "imgs" / "xmlab1" / "source.jpg", "x")
    assert px.ndim == 2
    assert found.sha256 == content_hash(px) and found.phash == perceptual_hash(px)


# ---------------------------------------------------------------- the LLM judge (fixture server)


class JudgeFixture(http.server.ThreadingHTTPServer):
    """TEST FIXTURE, not an implementation of anything: a loopback OpenAI-style endpoint answering
    `POST /v1/chat/completions`. Judge requests (the judge's system prompt) get a critique and a score
    chosen by a marker in the conversation: "MALFORMED" -> no score line, "WRONGSCORE" -> 0, else 2;
    blind (text-only) requests get "Z", a letter no question has. `delay`: seconds before each answer."""

    daemon_threads = True

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__(("127.0.0.1", 0), _JudgeHandler)
        self.delay = delay
        self.requests: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _JudgeHandler(http.server.BaseHTTPRequestHandler):
    server: JudgeFixture

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        time.sleep(self.server.delay)
        system, user = body["messages"][0]["content"], json.dumps(body["messages"][-1]["content"])
        if "cannot see the image" in system:
            text = "Z"
        elif "MALFORMED" in user:
            text = "The answer looks reasonable to me."
        elif "WRONGSCORE" in user:
            text = "Critique: the reply contradicts the facts.\nScore: 0"
        else:
            text = "Critique: consistent with the facts and medically sound.\nScore: 2"
        payload = json.dumps(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


def serve_fixture(delay: float = 0.0) -> Iterator[JudgeFixture]:
    srv = JudgeFixture(delay)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def judge_server() -> Iterator[JudgeFixture]:
    yield from serve_fixture()


def test_llm_judge_scores_fail_closed_on_malformed_replies(tmp_path, judge_server):
    g = Gen(tmp_path / "gen")
    good_samples(g)
    g.add(
        "judged-wrong",
        "toy-ct/r9.png",
        texture(9),
        [("<image>\nDescribe this image. WRONGSCORE", CAPTION_EN)],
        "caption",
    )
    g.add(
        "malformed",
        "toy-ct/r10.png",
        texture(10),
        [("<image>\nDescribe this image. MALFORMED", CAPTION_EN)],
        "caption",
    )
    out = tmp_path / "q"
    judge = Judge(judge_server.url, "fixture-judge")
    report = quality([g.write()], out, load_thresholds(config(tmp_path)), judge=judge)
    r = rows(out)
    assert r["cap0"]["kept"] and r["cap0"]["clinical_score"] == 2 and r["cap0"]["clinical_by"] == "judge"
    assert "consistent with the facts" in r["cap0"]["judge_critique"]
    assert not r["judged-wrong"]["kept"] and "clinical: score 0" in r["judged-wrong"]["failures"]
    assert r["malformed"]["clinical_score"] is None and not r["malformed"]["kept"]
    assert r["malformed"]["failures"] == ["clinical: missing score"]
    assert r["mc0"]["blind_llm"] == 0  # the text-only model's "Z" is no option: the question needs the image
    assert report["checks_run"]["clinical"] == {"judge": len(r)}
    assert report["checks_run"]["judge"]["model"] == "fixture-judge"
    assert report["checks_run"]["judge"]["prompt_version"] == "quality-judge-v1"
    assert "text-only LLM fixture-judge" in report["checks_run"]["blind"]
    judged = [b for b in judge_server.requests if "cannot see the image" not in b["messages"][0]["content"]]
    assert len(judged) == len(r)
    assert all("Score: N" in b["messages"][0]["content"] for b in judged)
    # a re-run is a no-op: nothing is asked twice
    n = len(judge_server.requests)
    quality([g.write()], out, load_thresholds(config(tmp_path)), judge=judge)
    assert len(judge_server.requests) == n


# ---------------------------------------------------------------- kill -9, then resume


RUN = """
import sys
from pathlib import Path
from medvl.quality.config import load_thresholds
from medvl.quality.pipeline import Judge, quality
gen, out, cfg, url = sys.argv[1:5]
quality([Path(gen)], Path(out), load_thresholds(cfg), judge=Judge(url, "fixture-judge"), part_rows=2)
"""


def test_kill_9_then_rerun_gives_identical_outputs(tmp_path):
    g = Gen(tmp_path / "gen")
    for k in range(5):
        good_samples(g, k)
    gen, cfg = g.write(), config(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for srv in serve_fixture(delay=0.05):
        a = tmp_path / "a"
        proc = subprocess.Popen([sys.executable, "-c", RUN, gen, a, cfg, srv.url], env=env)
        deadline = time.monotonic() + 120
        while not (a / "scores" / "parts" / "part-00001.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, (
                "the run ended before it could be killed"
            )
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (a / "report.json").exists()
        subprocess.run([sys.executable, "-c", RUN, gen, a, cfg, srv.url], env=env, check=True)
        b = tmp_path / "b"
        subprocess.run([sys.executable, "-c", RUN, gen, b, cfg, srv.url], env=env, check=True)
    for name in ("kept.jsonl", "rejected.jsonl", "report.json", "report.md", "benchmark_index.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ra, rb = (pq.read_table(sorted((x / "scores" / "data").glob("*.parquet"))) for x in (a, b))
    assert ra.equals(rb)
    report = json.loads((a / "report.json").read_text())
    c = report["counts"]
    assert c["read"] == len(g.samples) == c["kept"] + c["rejected"] + c["quarantined"]
    summary = json.loads((a / "scores" / "summary.json").read_text())
    assert summary["read"] == summary["kept"] == len(g.samples)  # one score row per sample, kept or not


FACTS = {
    "modality": "CT",
    "labels": ["Liver"],
    "negatives": ["Spleen"],
    "label_space": ["Kidney", "Liver", "Spleen"],
}


@pytest.mark.parametrize(
    "turns, image, score",
    [
        ([("<image>\nIs there a spleen?", "No, the spleen is not seen.")], "x.png", 2),
        ([("<image>\nIs there a spleen?", "Yes.")], "x.png", 0),
        ([("<image>\nIs the liver visible?", "No.")], "x.png", 0),
        (
            [
                ("<image>\nDescribe it.", "A CT slice; the liver is seen."),
                ("Any liver?", "There is no liver."),
            ],
            "x.png",
            0,
        ),
        ([("<image>\nHow much?", "The liver covers 140% of the image.")], "x.png", 0),
        ([("<image>\nWhat is this?", "An ultrasound of the liver.")], "x.png", 0),
        ([("<image>\nWhat is this?", "A CT image, made with X-rays, showing the liver.")], "x.png", 2),
        ([("What is a CT scan?", "A CT scan combines X-ray projections into slices.")], None, 2),
    ],
)
def test_clinical_rules(turns, image, score):
    from medvl.quality.judge import rule_checks

    conv = [{"from": w, "value": v} for q, a in turns for w, v in (("human", q), ("gpt", a))]
    sample = {"conversations": conv, **({"image": image} if image else {})}
    assert rule_checks(sample, FACTS)[0] == score


def test_generate_then_quality_then_mix_then_train(tmp_path, tiny_model_dir):
    """The engine end to end on hand-built curated records: template generation, quality (with the
    records' own test-split image as a benchmark), a stage mixture, two training steps."""
    from test_generate import record, write_curated
    from test_mix import write_mix
    from test_train import stage_yaml

    from medvl.data.mix import mix
    from medvl.generate.pipeline import generate
    from medvl.generate.template import TemplateBackend
    from medvl.train.config import load_config
    from medvl.train.loop import train_stage

    rows = [record(i) for i in range(8)] + [record(99, split="test")]
    rows[7] = record(7, image=rows[8]["image"])  # a training record whose image is the test record's
    src = write_curated(tmp_path / "cur", rows)
    gen = tmp_path / "gen"
    g = generate([src], gen, TemplateBackend(), zh_share=0.5, seed=0)
    out = tmp_path / "q"
    report = quality([gen], out, load_thresholds(), benchmarks=[src / "data"])
    c = report["counts"]
    assert c["read"] == g["kept"] == c["kept"] + c["rejected"] and c["kept"] > 0
    assert report["benchmark"]["images_seen"] == 1
    (dropped,) = report["benchmark"]["dropped"]
    assert dropped["samples"] == sum("image" in s for s in rows_of_record(gen, "hand/ct0007.png"))
    kept = [json.loads(x) for x in (out / "kept.jsonl").read_text().splitlines()]
    assert not any(s["provenance"]["record_id"] == "hand/ct0007.png" and "image" in s for s in kept)
    spec = {"seed": 0, "sources": [{"name": "hand", "path": "q/kept.jsonl", "fraction": 1.0}]}
    m = mix(write_mix(tmp_path, "stage2", spec), tmp_path / "mix", base_dir=tmp_path)
    assert m["total"] == c["kept"] and set(m["by_language"]) == {"en", "zh"}
    cfg = load_config(
        stage_yaml(
            tmp_path, tiny_model_dir, tmp_path / "mix" / "stage2.json", "e2e", max_steps=2, max_length=2048
        )
    )
    train_stage(cfg)
    assert len(json.loads((cfg.output_dir / "history.json").read_text())) == 2


def rows_of_record(gen: Path, record_id: str) -> list[dict]:
    samples = [json.loads(x) for x in (gen / "samples.jsonl").read_text().splitlines()]
    return [s for s in samples if s["provenance"]["record_id"] == record_id]


@pytest.mark.parametrize(
    "text, bad",
    [
        ("The effusion lies on the patient's right. The infiltrate lies on the patient's right.", False),
        ("肝脏位于患者右侧，在图像左下区域。右肾位于患者右侧，在图像左下区域。", False),
        ("The liver is seen. The liver is seen. The liver is seen.", True),
        ("The the the the liver liver liver is is seen seen.", True),
        ("可见肝脏。可见肝脏。可见肝脏。", True),
    ],
)
def test_repetition_tells_loops_from_parallel_sentences(text, bad):
    from medvl.quality.text import repetition

    assert (repetition(text) > load_thresholds().language.max_repetition) == bad


def test_cli_runs_and_bad_input_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from medvl.cli import app

    g = Gen(tmp_path / "gen")
    good_samples(g)
    gen = g.write()
    res = CliRunner().invoke(
        app, ["quality", str(gen), "--out", str(tmp_path / "q"), "--config", str(config(tmp_path))]
    )
    assert res.exit_code == 0, res.output
    assert "read 4: kept 4, rejected 0" in res.output and "clinical checks by rules" in res.output
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "medvl.cli",
            "quality",
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / "q2"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        f"medvl: error: {tmp_path / 'nowhere'}: path: not found (--debug shows the traceback)"
    ]


def test_judge_can_be_shown_the_image(tmp_path, judge_server):
    g = Gen(tmp_path / "gen")
    good_samples(g)
    cfg = config(tmp_path, clinical={"judge_send_image": True})
    quality([g.write()], tmp_path / "q", load_thresholds(cfg), judge=Judge(judge_server.url, "fixture-judge"))
    judged = [b for b in judge_server.requests if "cannot see the image" not in b["messages"][0]["content"]]
    parts = [b["messages"][-1]["content"] for b in judged]
    with_image = [p for p in parts if isinstance(p, list)]
    assert len(with_image) == 3  # caption, its Chinese pair, multiple choice; the text-only sample has none
    url = with_image[0][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("L"))
    assert np.array_equal(shown, texture(0))


def test_language_of_a_multiple_choice_sample_is_read_from_its_question():
    """Option names are medical Latin ("nevus", "metastasis") that py3langid does not read as English;
    the question decides, and a wrong-language question still fails."""
    from medvl.quality.text import language_confidence

    options = "\nA. retina\nB. metastasis\nC. nevus\nD. cyst"
    prompt = "<image>\nWhat lies in the region [281, 555, 430, 695]?" + options
    mc = {
        "lang": "en",
        "options": ["retina", "metastasis", "nevus", "cyst"],
        "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": "cyst"}],
    }
    assert language_confidence(mc)[1] >= 0.8
    assert language_confidence({**mc, "lang": "zh"})[1] < 0.01
    free = {**mc, "options": None}
    assert language_confidence(free)[1] < language_confidence(mc)[1]
