"""Requests/s of `medvl generate --backend openai` against `medvl serve` at concurrency 1, 4 and 16, and
the requests an identical re-run sends.

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
    args = ap.parse_args()

    from test_generate import record, write_curated
    from test_generate_openai import InFlight, prompt_model
    from test_serve import KEY, SETTINGS, serving

    from medvl.generate.openai_backend import OpenAIBackend, prepare
    from medvl.generate.pipeline import generate
    from medvl.model.build import load
    from medvl.serve.api import create_app

    tmp = Path(tempfile.mkdtemp(prefix="medvl-bench-"))
    vlm = load(prompt_model(tmp / "model"))
    curated = write_curated(tmp / "curated", [record(i) for i in range(args.records)])
    app = InFlight(create_app(vlm, SETTINGS))

    def job(url: str, out: Path, concurrency: int) -> tuple[float, int, int]:
        """(seconds, requests sent, samples) of one `medvl generate` run."""
        be = OpenAIBackend(
            f"{url}/v1", "tiny", api_key=KEY, cache_dir=out / "llm-cache", image_root=out,
            concurrency=concurrency, max_tokens=2,
        )  # fmt: skip
        start = time.perf_counter()
        report = generate([curated], out, be, zh_share=0.0, prepare=partial(prepare, be))
        assert report is not None
        return time.perf_counter() - start, be.llm.usage.requests, report["kept"] + report["rejected"]

    rows = []
    with serving(app) as url:
        warm = OpenAIBackend(f"{url}/v1", "tiny", api_key=KEY, cache_dir=tmp / "warm-up")
        warm.llm.complete("tiny", [{"role": "user", "content": "warm up"}], max_tokens=2, cache=False)
        served = sum(app.counts.values())
        for c in args.concurrency:
            app.max_in_flight = 0
            seconds, sent, samples = job(url, tmp / f"c{c}", c)
            rows.append((c, sent, samples, seconds, sent / seconds, app.max_in_flight))
        served = sum(app.counts.values())
        assert served == 1 + sum(r[1] for r in rows)  # the server saw exactly what the clients counted
        rerun_seconds, rerun_sent, _ = job(url, tmp / f"c{args.concurrency[-1]}", args.concurrency[-1])
        assert sum(app.counts.values()) == served + rerun_sent

    base = rows[0][4]
    print(f"{args.records} records x 6 formats (English), answer + repair each, 2-token answers")
    print("concurrency  requests  samples  seconds  requests/s  vs c=1  max in flight at the server")
    for c, sent, samples, seconds, rate, peak in rows:
        figures = f"{sent:>8}  {samples:>7}  {seconds:>7.1f}  {rate:>10.2f}  {rate / base:>5.2f}x  {peak:>4}"
        print(f"{c:>11}  {figures}")
    print(
        f"identical re-run (same output folder and cache): {rerun_sent} requests sent, {rerun_seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
