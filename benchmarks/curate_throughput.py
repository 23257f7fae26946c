"""Curation throughput: records/s per core on SLAKE and on a synthetic 3D set, beside the raw decode +
encode rate of the same images in the same run (the practical ceiling). Target: the pipeline at >= 50%
of the ceiling, per core.

    .venv/bin/python benchmarks/curate_throughput.py --workers 2 --repeats 3

Ceiling, per dataset, on one core: decode the same source images (SLAKE: the JPEGs; 3D: the image
volumes, *not* their label volumes, which the pipeline must also read) and encode exactly the records the
pipeline kept as PNG at the same compression level (3D: the same slices with the same CT window), nothing
else. The pipeline additionally reads labels, masks and box files, derives boxes, resizes, hashes
(SHA-256 + pHash), deduplicates, writes Parquet and the report.

Both sides are timed in one warm process: the modules the pipeline imports lazily (datasets, matplotlib,
imagehash/scipy) are imported before any timing, as PIL and SimpleITK are for the ceiling; start-up of
the worker pool and the end-of-run report stay inside the pipeline's time. Rates are given per
CPU-second (this process plus its ended worker processes: robust to other jobs on a shared machine) and
per wall-clock second per worker. Each repeat measures the pipeline and the ceiling back to back and the
ratio is taken within the repeat; the table gives the median and the range over repeats.

SLAKE is read from $MEDVL_SHARED_DATA/slake (default ../shared/data/slake) and skipped if absent.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import SimpleITK as sitk
from PIL import Image

from medvl.curate.card import load_card
from medvl.curate.images import encode_png
from medvl.curate.pipeline import curate
from medvl.imaging import ct_window, to_display
from medvl.synth.volumes import write_phantoms

REPO = Path(__file__).resolve().parents[1]


def warm_imports() -> None:
    import datasets  # noqa: F401
    import imagehash  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import scipy.fftpack  # noqa: F401
    import scipy.ndimage  # noqa: F401


def kept(out: Path) -> list[dict]:
    return pq.read_table(
        sorted((out / "data").glob("*.parquet")), columns=["file", "index", "meta"]
    ).to_pylist()


def clock() -> tuple[float, float]:
    """(wall s, CPU s of this process and of its children that have ended). CPU time is what "per core"
    means on a shared machine: other jobs' load slows the wall clock of both sides unevenly, not the CPU
    time each side needs. Pool workers have ended when `curate` returns, so their CPU time is counted."""
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), time.process_time() + ch.ru_utime + ch.ru_stime


def since(start: tuple[float, float]) -> tuple[float, float]:
    now = clock()
    return now[0] - start[0], now[1] - start[1]


def ceiling_slake(root: Path, out: Path) -> tuple[int, tuple[float, float]]:
    files = sorted(root.glob("imgs/*/source.jpg"))  # every image the pipeline reads, duplicates included
    t = clock()
    for f in files:
        encode_png(to_display(Image.open(f)))
    return len(files), since(t)


def ceiling_3d(phantoms: Path, out: Path) -> tuple[int, tuple[float, float]]:
    """Decode each image volume and encode exactly the slices the pipeline kept, with the same window."""
    recs = kept(out)
    by_file: dict[str, list[tuple[int, str]]] = {}
    for r in recs:
        by_file.setdefault(r["file"], []).append((r["index"], json.loads(r["meta"])["ct_window"]))
    t = clock()
    for f, slices in by_file.items():
        vol = sitk.GetArrayFromImage(sitk.ReadImage(str(phantoms / f)))
        for k, w in slices:
            encode_png(ct_window(vol[k], w))
    return len(recs), since(t)


def bench(name: str, card_path: Path, workers: int, repeats: int, tmp: Path, ceiling) -> dict:
    """Per repeat: the pipeline on 1 and on `workers` workers, the ceiling right after the 1-worker run.
    Rates are records per CPU-second (`cpu`) and records/s of wall clock per worker (`wall`)."""
    card = load_card(card_path)
    runs = []
    for rep in range(repeats):
        run: dict = {}
        for w in sorted({1, workers}):
            out = tmp / f"{name}-w{w}"
            t = clock()
            report = curate([card], out, workers=w)
            wall, cpu = since(t)
            n = report["counts"]["read"]
            run[f"w{w}"] = {"records": n, "wall_s": wall, "cpu_s": cpu, "wall": n / wall / w, "cpu": n / cpu}
            if w == 1:
                n, (wall, cpu) = ceiling(out)
                run["ceiling"] = {
                    "records": n,
                    "wall_s": wall,
                    "cpu_s": cpu,
                    "wall": n / wall,
                    "cpu": n / cpu,
                }
            shutil.rmtree(out)
        for w in sorted({1, workers}):
            for k in ("wall", "cpu"):
                run[f"w{w}"][f"ratio_{k}"] = run[f"w{w}"][k] / run["ceiling"][k]
        print(name, f"repeat {rep + 1}:", json.dumps(run), flush=True)
        runs.append(run)
    return {"dataset": name, "runs": runs}


def spread(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--phantoms", type=int, default=48)
    ap.add_argument("--shape", default="48,256,256")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    shared = Path(os.environ.get("MEDVL_SHARED_DATA", REPO.parent / "shared" / "data"))
    warm_imports()
    results = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if (shared / "slake").is_dir():
            os.environ["MEDVL_SHARED_DATA"] = str(shared)
            slake = lambda out: ceiling_slake(shared / "slake", out)  # noqa: E731
            results.append(
                bench("slake", REPO / "configs/cards/slake.yaml", args.workers, args.repeats, tmp, slake)
            )
        phantoms = tmp / "phantoms"
        shape = tuple(int(s) for s in args.shape.split(","))
        write_phantoms(phantoms, args.phantoms, shape, seed=0)
        os.environ["MEDVL_SYNTH_3D"] = str(phantoms)
        results.append(
            bench(
                f"synthetic-3d ({args.phantoms} phantoms {'x'.join(map(str, shape))})",
                REPO / "configs/cards/synthetic-3d.yaml",
                args.workers,
                args.repeats,
                tmp,
                lambda out: ceiling_3d(phantoms, out),
            )
        )
    wn = f"w{args.workers}"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\ncores: {os.cpu_count()}; load average: {load}; {args.repeats} repeats: median (min-max)")
    print(
        "| dataset | records | ceiling rec/CPU-s | 1 worker rec/CPU-s | ratio (CPU) | ratio (wall) | "
        f"{wn[1:]} workers rec/CPU-s | ratio (CPU) | {wn[1:]} workers rec/s/core (wall) | ratio (wall) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        runs = r["runs"]
        cells = [
            r["dataset"],
            str(runs[0]["w1"]["records"]),
            spread([x["ceiling"]["cpu"] for x in runs], ".1f"),
            spread([x["w1"]["cpu"] for x in runs], ".1f"),
            spread([x["w1"]["ratio_cpu"] for x in runs], ".0%"),
            spread([x["w1"]["ratio_wall"] for x in runs], ".0%"),
            spread([x[wn]["cpu"] for x in runs], ".1f"),
            spread([x[wn]["ratio_cpu"] for x in runs], ".0%"),
            spread([x[wn]["wall"] for x in runs], ".1f"),
            spread([x[wn]["ratio_wall"] for x in runs], ".0%"),
        ]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
