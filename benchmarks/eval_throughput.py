"""Evaluation throughput (questions/s) of an API model served by `medvl serve`, asked by `medvl eval` at
--api-concurrency 1, 4 and 16, against the same model evaluated in process, on the same questions, in
the same run.

The server is a real `medvl serve` process on a loopback port (dynamic batching, batches of up to 16);
the evaluation runs in this process through `medvl.eval.evaluate` (the job runner, prediction files,
scoring and report included), each API run into a fresh folder, so nothing comes from the cache. The
in-process run uses the model loaded once beforehand (load time excluded, as the server's is).
Prints questions/s per run, the ratio to the in-process run, and whether every API run gave the
in-process answers.

    .venv/bin/python benchmarks/eval_throughput.py                 # the tiny preset, random weights
    .venv/bin/python benchmarks/eval_throughput.py --questions 96 --repeats 2
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import tiny_model  # noqa: E402

from medvl.eval.harness import APIModel, as_answerer, evaluate, prediction_path  # noqa: E402

CONCURRENCY = (1, 4, 16)


def write_bench(path: Path, n: int) -> Path:
    """n multiple-choice questions, each with its own 96x96 PNG (the serve benchmark's size)."""
    rng = np.random.default_rng(0)
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "image", "question", "A", "B", "C", "D", "answer", "category"])
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(buf, "PNG")
            image = base64.b64encode(buf.getvalue()).decode()
            w.writerow([i, image, f"Case {i}: which finding is shown?", "a nodule", "an effusion", "a mass",
                        "no abnormality", "ABCD"[i % 4], "Disease Diagnosis"])  # fmt: skip
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int) -> subprocess.Popen:
    medvl = str(Path(sys.executable).parent / "medvl")
    proc = subprocess.Popen(
        [medvl, "serve", "--model", str(model), "--port", str(port), "--model-name", "tiny",
         "--max-batch-size", "16", "--max-queue", "256"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            return proc
        except OSError as e:
            if getattr(e, "code", None) == 401:  # up, asking for a key
                return proc
            if proc.poll() is not None:
                raise RuntimeError("medvl serve exited during start-up") from None
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("medvl serve did not start within 300 s")


def timed(model, bench: Path, out: Path, args: argparse.Namespace) -> tuple[float, list[str]]:
    start = time.perf_counter()
    evaluate(model, "mc", bench, out, batch_size=16, max_new_tokens=args.max_tokens, chunk=64, progress=False)
    seconds = time.perf_counter() - start
    answers = [json.loads(x)["prediction"] for x in prediction_path(out).read_text().splitlines()]
    return args.questions / seconds, answers


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="A medvl model folder (default: the tiny preset).")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=8, help="New tokens per answer.")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = args.model or tiny_model(root / "model")
        bench = write_bench(root / "bench.tsv", args.questions)
        port = free_port()
        server = start_server(model, port)
        try:
            local = as_answerer(str(model))
            rates: dict[str, list[float]] = {}
            same: dict[str, bool] = {}
            for r in range(args.repeats):
                # The in-process run first and last in each repeat brackets any drift of the machine's load.
                runs = [("in process", local)]
                runs += [(f"API c={c}", APIModel(f"http://127.0.0.1:{port}/v1", "tiny", max_concurrency=c))
                         for c in CONCURRENCY]  # fmt: skip
                runs += [("in process", local)]
                reference = None
                for k, (name, m) in enumerate(runs):
                    rate, answers = timed(m, bench, root / f"out-{r}-{k}", args)
                    rates.setdefault(name, []).append(rate)
                    reference = reference or answers
                    same[name] = same.get(name, True) and answers == reference
                    print(f"repeat {r + 1}: {name}: {rate:.2f} questions/s", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
    base = statistics.median(rates["in process"])
    load = os.getloadavg()[0]
    print(f"\n{args.questions} questions, {args.max_tokens} new tokens, load average {load:.1f}")
    print("| run | questions/s | ratio to in-process | same answers as in-process |")
    print("|---|---:|---:|---|")
    for name, values in rates.items():
        rate = statistics.median(values)
        spread = f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""
        print(f"| {name} | {rate:.2f}{spread} | {rate / base:.2f} | {'yes' if same[name] else 'NO'} |")


if __name__ == "__main__":
    main()
