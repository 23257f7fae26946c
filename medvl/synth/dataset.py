"""Write a synthetic labelled image set to disk: ``images/<id>.png`` plus ``records.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from medvl.synth.images import GEN_MODALITIES, synthesize

RECORD_KEYS = (
    "id",
    "image",
    "modality",
    "body_region",
    "anatomy",
    "department",
    "finding",
    "bbox",
    "grade",
    "location",
    "width",
    "height",
    "seed",
)


def image_seed(seed: int, stream: int, index: int) -> int:
    """Per-image seed, so one image can be regenerated alone with ``images.synthesize(record["seed"])``."""
    return int(np.random.SeedSequence([seed, stream, index]).generate_state(1)[0])


def write_synthetic(
    out_dir: str | Path,
    n: int,
    seed: int,
    size: int = 128,
    *,
    prefix: str = "synth",
    stream: int = 0,
    records_name: str = "records.jsonl",
) -> Path:
    """Generate ``n`` images balanced across modalities (round robin) and return the records path.

    Same arguments give byte-identical files. ``prefix``/``stream`` let several sets (train, benchmark)
    share one ``images/`` folder with distinct ids and independent random streams.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / records_name
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            s = image_seed(seed, stream, i)
            img = synthesize(s, size, GEN_MODALITIES[i % len(GEN_MODALITIES)])
            rid = f"{prefix}_{i:06d}"
            rel = f"images/{rid}.png"
            Image.fromarray(img.image).save(out / rel, format="PNG", compress_level=1)
            rec = {"id": rid, "image": rel, **img.labels(), "width": size, "height": size, "seed": s}
            f.write(json.dumps({k: rec[k] for k in RECORD_KEYS}) + "\n")
    return path
