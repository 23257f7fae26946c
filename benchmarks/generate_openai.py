"""Requests/s of `medvl generate --backend openai` against `medvl serve` at concurrency 1, 4 and 16, and
the requests an identical re-run sends; the same against the test suite's fixture writer, which answers
after a fixed latency without computing anything (an endpoint with spare capacity, as a remote API or
a GPU server is for one client), to show what concurrency buys when the server is not the bottleneck.

The server is `medvl serve`'s app (the tiny preset, random weights, its tokenizer trained on the
generation prompts so that they fit its context; the test suite's model) on a loopback port in this
process; the job is the real one (`medvl.generate.pipeline.generate` with the openai backend's
concurrent rounds, as the command runs it) over hand-built curated CT records (the test suite's), all six
formats in English. The tiny model writes no JSON, so each sample costs two requests: the answer and the
one repair. Answers are capped at 2 tokens, so the figures measure the client, the server's queue and
batching, and prompt processing (about 600 tokens and a 64-pixel image per request), not long decoding.

    .venv/bin/python benchmarks/generate_openai.py                 # 3 records: 36 requests per level
    .venv/bin/python benchmarks/generate_openai.py --records 6
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=3)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--latency", type=float, default=0.5, help="the fixture writer's seconds per answer")
    args = ap.parse_args()

    from test_generate import record, write_curated
    from test_generate_openai import InFlight, WriterFixture, prompt_model
    from test_serve import KEY, SETTINGS, serving

    from medvl.generate.openai_backend import OpenAIBackend, prepare
    from medvl.generate.pipeline import generate
    from medvl.model.build import load
    from medvl.serve.api import create_app

    tmp = Path(tempfile.mkdtemp(prefix="medvl-bench-"))
    vlm = load(prompt_model(tmp / "model"))
    curated = write_curated(tmp / "curated", [record(i) for i in range(args.records)])

    def job(url: str, model: str, out: Path, concurrency: int) -> tuple[float, int, int]:
        """(seconds, requests sent, samples) of one `medvl generate` run."""
        be = OpenAIBackend(
            f"{url}/v1", model, api_key=KEY, cache_dir=out / "llm-cache", image_root=out,
            concurrency=concurrency, max_tokens=2 if model == "tiny" else None,
        )  # fmt: skip
        start = time.perf_counter()
        report = generate([curated], out, be, zh_share=0.0, prepare=partial(prepare, be))
        assert report is not None
        return time.perf_counter() - start, be.llm.usage.requests, report["kept"] + report["rejected"]

    def levels(url: str, model: str, server, name: str) -> tuple[list[tuple], tuple[float, int]]:
        """One job per concurrency level (each its own output folder and cache), then an identical re-run
        of the last; `server.max_in_flight` is the most requests the server held at once."""
        rows = []
        for c in args.concurrency:
            server.max_in_flight = 0
            seconds, sent, samples = job(url, model, tmp / name / f"c{c}", c)
            rows.append((c, sent, samples, seconds, sent / seconds, server.max_in_flight))
        seconds, sent, _ = job(url, model, tmp / name / f"c{args.concurrency[-1]}", args.concurrency[-1])
        return rows, (seconds, sent)

    app = InFlight(create_app(vlm, SETTINGS))
    with serving(app) as url:
        warm = OpenAIBackend(f"{url}/v1", "tiny", api_key=KEY, cache_dir=tmp / "warm-up")
        warm.llm.complete("tiny", [{"role": "user", "content": "warm up"}], max_tokens=2, cache=False)
        served, rerun = levels(url, "tiny", app, "serve")
        # the server saw exactly the requests the clients counted (the warm-up's one besides)
        assert sum(app.counts.values()) == 1 + sum(r[1] for r in served) + rerun[1]
    report("medvl serve (tiny model, CPU): each sample an answer + a repair, 2-token answers", served, rerun)

    writer = WriterFixture()
    writer.default = {"delay": args.latency}
    with serving(writer.app) as url:
        fixed, rerun = levels(url, "writer", writer, "fixture")
    report(
        f"the test suite's fixture writer answering after {args.latency:g} s: one valid answer a sample",
        fixed,
        rerun,
    )


def report(title: str, rows: list[tuple], rerun: tuple[float, int]) -> None:
    base = rows[0][4]
    print(title)
    print("concurrency  requests  samples  seconds  requests/s  vs c=1  max in flight at the server")
    for c, sent, samples, seconds, rate, peak in rows:
        figures = f"{sent:>8}  {samples:>7}  {seconds:>7.1f}  {rate:>10.2f}  {rate / base:>5.2f}x  {peak:>4}"
        print(f"{c:>11}  {figures}")
    print(f"identical re-run (same output folder and cache): {rerun[1]} requests sent, {rerun[0]:.1f} s\n")


if __name__ == "__main__":
    main()
