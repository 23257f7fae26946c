"""Template-backend generation throughput on curated SLAKE: records/s of `medvl generate` (six formats,
30% also in Chinese, every sample validated, images, Parquet parts and samples.jsonl written) with 1
worker (the baseline: what a plain run does) and with N workers, and the template backend alone in one
process (fact sheets, every format in English and the Chinese share, validation; no job, no files) on
the same records, in the same run.

    .venv/bin/python benchmarks/generate_throughput.py --workers 2 --repeats 3

SLAKE is curated from configs/cards/slake.yaml into a temporary folder first (not timed; every split, so
all 642 images) unless --curated names a curated folder. Each repeat times the three back to back; the
table gives the median and the range over repeats, the ratios are taken within each repeat. Rates per
CPU-second (this process and its ended workers: robust to other jobs on a shared machine, the clock of
benchmarks/curate_throughput.py) and per wall-clock second.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from curate_throughput import clock, since  # run from benchmarks/: the same CPU clock as curation

from medvl.generate.backend import seeded
from medvl.generate.pipeline import GenerateStep, generate, load_records
from medvl.generate.template import TemplateBackend
from medvl.samples import FORMATS, fact_sheet, validate

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "validation", "test")
ZH_SHARE = 0.3


def curate_slake(tmp: Path) -> Path:
    from medvl.curate.card import load_card
    from medvl.curate.pipeline import curate

    os.environ.setdefault("MEDVL_SHARED_DATA", str(REPO.parent / "shared" / "data"))
    out = tmp / "slake"
    curate([load_card(REPO / "configs" / "cards" / "slake.yaml")], out, workers=2)
    return out


def backend_only(records: list[dict]) -> tuple[float, float]:
    """(wall, CPU) seconds for fact sheets + the template backend + validation, in this process."""
    backend = TemplateBackend()
    step = GenerateStep(backend, "/nonexistent", FORMATS, ZH_SHARE, 0)
    start = clock()
    for r in records:
        facts = fact_sheet(r)
        for fmt in FORMATS:
            langs = ["en", "zh"] if seeded(0, facts.record_id, fmt, "zh").random() < ZH_SHARE else ["en"]
            for lang in langs:
                for i, raw in enumerate(backend.write(facts, fmt, lang, seeded(0, facts.record_id, fmt))):
                    s = step.finish(raw, facts, fmt, lang, i, "x")
                    assert validate(s, facts) == []
    return since(start)


def job(curated: Path, out: Path, workers: int) -> tuple[tuple[float, float], dict]:
    shutil.rmtree(out, ignore_errors=True)
    start = clock()
    report = generate([curated], out, TemplateBackend(), splits=SPLITS, zh_share=ZH_SHARE, workers=workers)
    assert report is not None and report["rejected"] == 0 and report["quarantined"] == 0
    return since(start), report


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--curated", type=Path, default=None)
    args = ap.parse_args()
    names = ("template backend + validation, in process", "`medvl generate`, 1 worker (baseline)",
             f"`medvl generate`, {args.workers} workers")  # fmt: skip
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    scale, samples = [], []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        curated = args.curated or curate_slake(tmp)
        records = load_records([curated])
        n = len(records)
        backend_only(records[:20])  # warm: the language-ID model, imports
        for rep in range(args.repeats):
            (t1, report), (tn, _) = job(curated, tmp / "g1", 1), job(curated, tmp / "gN", args.workers)
            for name, (w, c) in zip(names, (backend_only(records), t1, tn)):
                wall[name].append(n / w)
                cpu[name].append(n / c)
            scale.append(t1[0] / tn[0])
            samples.append(report["kept"])
            print(
                f"repeat {rep + 1}: " + ", ".join(f"{k}: {wall[k][-1]:.0f}/s wall" for k in names), flush=True
            )
    print(f"\n{n} SLAKE records -> {samples[0]} samples; cores: {os.cpu_count()}; "
          f"load average: {os.getloadavg()[0]:.1f}; {args.repeats} repeats: median (min-max)")  # fmt: skip
    print("| path | records/CPU-s | records/s (wall) |\n|---|---:|---:|")
    for k in names:
        print(f"| {k} | {spread(cpu[k])} | {spread(wall[k])} |")
    print(f"\nwall-clock speed-up, {args.workers} workers over 1: {spread(scale, '{:.2f}')}")


if __name__ == "__main__":
    main()
