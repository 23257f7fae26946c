"""Throughput of `medvl serve` with dynamic batching against the same server answering one request
at a time (batch size 1), on the same requests, in the same run.

Each request carries its own PNG image and question and asks for `--max-tokens` greedy tokens; the
clients are threads with the official `openai` client, the server a real uvicorn server on a loopback
port in this process. Prints requests/s and p50/p95 latency at each concurrency for both servers,
and the ratio of their requests/s.

    .venv/bin/python benchmarks/serve_throughput.py                # the tiny preset, random weights
    .venv/bin/python benchmarks/serve_throughput.py --model <folder>
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import io
import itertools
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openai
import uvicorn
from PIL import Image

from medvl.model.build import VLM, build_preset, load
from medvl.model.tokenizer import train_tokenizer
from medvl.serve.api import ServeSettings, create_app


def tiny_model(folder: Path) -> Path:
    organs = ["liver", "lung", "heart", "kidney", "brain", "spleen", "bladder", "colon", "bone", "chest"]
    findings = ["a nodule", "an effusion", "a mass", "no abnormality", "a fracture", "edema", "a cyst"]
    lines = [
        f"The {m} of the {o} shows {f}." for m, o, f in itertools.product(["CT", "MRI"], organs, findings)
    ]
    build_preset("tiny", tokenizer=train_tokenizer(lines, vocab_size=512)).save(folder)
    return folder


def requests(n: int) -> list[list[dict]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(buf, "PNG")
        url = f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"
        text = f"Case {i}: what abnormality does this image show?"
        out.append(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": text},
                    ],
                }
            ]
        )
    return out


@dataclass
class Result:
    rps: float
    p50: float
    p95: float
    tokens: float  # mean completion tokens per request


@contextmanager
def serving(vlm: VLM, max_batch_size: int) -> Iterator[openai.OpenAI]:
    """A real uvicorn server on a loopback port, in a thread; yields a client for it."""
    settings = ServeSettings(model_name="m", max_batch_size=max_batch_size, max_queue=256)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(vlm, settings), host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
    finally:
        server.should_exit = True
        thread.join()


def measure(client: openai.OpenAI, reqs: list, clients: int, max_tokens: int) -> Result:
    def one(messages) -> tuple[float, int]:
        t = time.perf_counter()
        r = client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens)
        return time.perf_counter() - t, r.usage.completion_tokens

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        timed = list(pool.map(one, reqs))
    wall = time.perf_counter() - start
    lat = sorted(t for t, _ in timed)
    return Result(
        rps=len(reqs) / wall,
        p50=statistics.median(lat),
        p95=lat[min(len(lat) - 1, int(0.95 * len(lat)))],
        tokens=statistics.mean(n for _, n in timed),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="model folder (default: build the tiny preset)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-batch-size", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        vlm = load(args.model or tiny_model(Path(tmp) / "tiny"))
    reqs = requests(args.requests)
    batched, alone = {}, {}
    # Both servers stay up and are measured in turn at each concurrency, so that a change in the
    # machine's load affects both sides of a ratio alike.
    with serving(vlm, args.max_batch_size) as batching, serving(vlm, 1) as one_at_a_time:
        for client in (batching, one_at_a_time):  # warm-up
            measure(client, reqs[:2], 1, args.max_tokens)
        for c in args.concurrency:
            batched[c] = measure(batching, reqs, c, args.max_tokens)
            alone[c] = measure(one_at_a_time, reqs, c, args.max_tokens)
    print(
        f"{args.requests} requests, {args.max_tokens} max tokens (mean completion tokens: "
        f"{statistics.mean(r.tokens for r in batched.values()):.1f})\n"
    )
    print("| clients | batched req/s | p50 s | p95 s | one-at-a-time req/s | p50 s | p95 s | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for c in args.concurrency:
        b, a = batched[c], alone[c]
        print(
            f"| {c} | {b.rps:.2f} | {b.p50:.2f} | {b.p95:.2f} | {a.rps:.2f} | {a.p50:.2f} | {a.p95:.2f} | "
            f"{b.rps / a.rps:.2f}x |"
        )


if __name__ == "__main__":
    main()
