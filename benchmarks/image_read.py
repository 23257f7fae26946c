"""Reading training images: medvl.imaging's `read_image(path, size=...)` (JPEG decoded at a reduced
DCT scale, large images box-reduced to no less than twice the model's side) against what LLaVA-style
datasets do (`Image.open(path).convert("RGB")`, then the image processor resizes the full image),
both followed by the same image processor, in the same run, on real SLAKE scans (mostly 1024 px
JPEG). Reports images/s for both, the ratio, and how far medvl's pixel values are from the full
read's (normalised units; the processor's output spans about 4).

    python benchmarks/image_read.py --slake ../shared/data/slake --images 300
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from medvl.imaging import read_image
from medvl.model.build import square_image_processor


def baseline_read(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def timed(read, paths: list[Path], processor, repeats: int) -> tuple[float, np.ndarray]:
    best = float("inf")
    for _ in range(repeats):  # best of: the machine's other load only ever slows a run down
        t = time.perf_counter()
        pixels = processor([read(p) for p in paths], return_tensors="np")["pixel_values"]
        best = min(best, time.perf_counter() - t)
    return len(paths) / best, pixels


def main() -> None:
    shared = Path(os.environ.get("MEDVL_SHARED_DATA", Path(__file__).resolve().parents[1] / "../shared/data"))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slake", type=Path, default=shared / "slake")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 336, 448])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    paths = sorted((args.slake / "imgs").glob("*/source.jpg"))[: args.images]
    if not paths:
        raise SystemExit(f"{args.slake}/imgs: no SLAKE images (pass --slake)")
    sides = [min(Image.open(p).size) for p in paths]
    rows = []
    for size in args.sizes:
        processor = square_image_processor(size)
        base, ref = timed(baseline_read, paths, processor, args.repeats)
        ours, px = timed(lambda p, s=size: read_image(p, size=s), paths, processor, args.repeats)
        diff = np.abs(px - ref)
        rows.append(
            {
                "size": size,
                "baseline_images_per_s": round(base, 1),
                "medvl_images_per_s": round(ours, 1),
                "speedup": round(ours / base, 2),
                "mean_abs_pixel_diff": float(diff.mean()),
                "max_abs_pixel_diff": float(diff.max()),
            }
        )
    result = {"images": len(paths), "median_source_side": int(np.median(sides)), "rows": rows}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
