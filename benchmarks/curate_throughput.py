"""Curation throughput: records/s per core on SLAKE and on a synthetic 3D set, beside the raw decode +
encode rate of the same images in the same run (the practical ceiling: read the source pixels, write
them as PNG, nothing else). Target: the pipeline at >= 50% of the ceiling, per core.

    .venv/bin/python benchmarks/curate_throughput.py --workers 2

SLAKE is read from $MEDVL_SHARED_DATA/slake (default ../shared/data/slake) and skipped if absent.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import SimpleITK as sitk
from PIL import Image

from medvl.curate.card import load_card
from medvl.curate.images import ct_window, encode_png, to_display
from medvl.curate.pipeline import curate
from medvl.curate.synthetic import write_phantoms

REPO = Path(__file__).resolve().parents[1]


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def ceiling_slake(root: Path) -> tuple[int, float]:
    files = sorted(root.glob("imgs/*/source.jpg"))
    dt, _ = timed(lambda: [encode_png(to_display(Image.open(f))) for f in files])
    return len(files), dt


def ceiling_3d(phantoms: Path, out: Path) -> tuple[int, float]:
    """Decode each volume and encode exactly the slices the pipeline kept, with the same window."""
    t = pq.read_table(sorted((out / "data").glob("*.parquet")), columns=["file", "index", "meta"]).to_pylist()
    by_file: dict[str, list[tuple[int, str]]] = {}
    for r in t:
        by_file.setdefault(r["file"], []).append((r["index"], json.loads(r["meta"])["ct_window"]))

    def run() -> None:
        for f, slices in by_file.items():
            vol = sitk.GetArrayFromImage(sitk.ReadImage(str(phantoms / f)))
            for k, w in slices:
                encode_png(ct_window(vol[k], w))

    dt, _ = timed(run)
    return len(t), dt


def bench(name: str, card_path: Path, workers: int, tmp: Path, ceiling) -> dict:
    card = load_card(card_path)
    res = {"dataset": name}
    for w in sorted({1, workers}):
        out = tmp / f"{name}-w{w}"
        dt, report = timed(lambda out=out, w=w: curate([card], out, workers=w))
        n = report["counts"]["read"]
        res[f"w{w}"] = {
            "records": n,
            "seconds": round(dt, 2),
            "records_per_s": round(n / dt, 1),
            "records_per_s_per_core": round(n / dt / w, 1),
        }
    n, dt = ceiling(tmp / f"{name}-w1")
    res["ceiling"] = {"records": n, "seconds": round(dt, 2), "records_per_s": round(n / dt, 1)}
    res["ratio_per_core"] = {
        f"w{w}": round(res[f"w{w}"]["records_per_s_per_core"] / res["ceiling"]["records_per_s"], 3)
        for w in sorted({1, workers})
    }
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--phantoms", type=int, default=24)
    ap.add_argument("--shape", default="48,256,256")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    shared = Path(os.environ.get("MEDVL_SHARED_DATA", REPO.parent / "shared" / "data"))
    results = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if (shared / "slake").is_dir():
            os.environ["MEDVL_SHARED_DATA"] = str(shared)
            results.append(
                bench(
                    "slake",
                    REPO / "configs/cards/slake.yaml",
                    args.workers,
                    tmp,
                    lambda out: ceiling_slake(shared / "slake"),
                )
            )
        phantoms = tmp / "phantoms"
        write_phantoms(phantoms, args.phantoms, tuple(int(s) for s in args.shape.split(",")), seed=0)
        os.environ["MEDVL_SYNTH_3D"] = str(phantoms)
        results.append(
            bench(
                "synthetic-3d",
                REPO / "configs/cards/synthetic-3d.yaml",
                args.workers,
                tmp,
                lambda out: ceiling_3d(phantoms, out),
            )
        )
    print(f"cores available: {os.cpu_count()}; workers: {args.workers}")
    print(
        "| dataset | records | ceiling rec/s (1 core) | pipeline rec/s, 1 worker | ratio | "
        f"pipeline rec/s, {args.workers} workers | per core | ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        w1, wn = r["w1"], r[f"w{args.workers}"]
        print(
            f"| {r['dataset']} | {w1['records']} | {r['ceiling']['records_per_s']} | {w1['records_per_s']} | "
            f"{r['ratio_per_core']['w1']:.0%} | {wn['records_per_s']} | {wn['records_per_s_per_core']} | "
            f"{r['ratio_per_core'][f'w{args.workers}']:.0%} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
