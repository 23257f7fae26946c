"""The two 3D routes on the same volumes: tokens per volume and training throughput.

- `slices` (2.5D, the default): the `tiny` preset's 2D CLIP tower sees a volume as K slabs, 16 image
  tokens each; K from the stage's `volume_tokens` budget (4 / 8 / 32 slabs here: 32 is every slice of the
  synthetic-3d spec's 32-slice volumes, what the default budget of 4,096 gives this tower).
- `native`: the `tiny-3d` preset's ViViT tower sees the volume as one input of 8 slabs, 2 x 16 x 16
  tubelets: 64 image tokens.

Data: synthetic CT phantoms curated by configs/cards/synthetic-3d.yaml (32 x 64 x 64 voxels, three
windows), one question each ("Which structures does this CT show?", answered from its labels). Each
configuration trains with medvl's own loop (`StageRecipe`, soft packing, global batch 8) from the same
random initialisation, and its history's per-step seconds are summed after the first (warm-up) step.
Ratios are against the slices route at 32 slabs, the default a user gets. A throughput figure, not an
accuracy one: which route answers better is for a trained model on the 3D benchmark (docs/3d.md).

    python benchmarks/routes_3d.py --volumes 48 --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
QUESTION = "Which structures does this CT show?"


def make_data(root: Path, n: int, seed: int) -> Path:
    from medvl.curate.card import load_card
    from medvl.curate.pipeline import curate
    from medvl.records import read_rows
    from medvl.synth.volumes import write_phantoms

    write_phantoms(root / "phantoms", n, shape=(32, 128, 128), seed=seed)
    os.environ["MEDVL_SYNTH_3D"] = str(root / "phantoms")
    curate([load_card(REPO / "configs" / "cards" / "synthetic-3d.yaml")], root / "curated", workers=2)
    samples = []
    for r in read_rows(root / "curated" / "data"):
        if r.get("kind") != "volume":
            continue
        samples.append(
            {
                "id": r["id"],
                "volume": json.loads(r["volume"])["file"],
                "conversations": [
                    {"from": "human", "value": f"<image>\n{QUESTION}"},
                    {"from": "gpt", "value": ", ".join(sorted(r["labels"])) + "."},
                ],
            }
        )
    path = root / "curated" / "volumes.json"
    path.write_text(json.dumps(samples))
    return path


def run(root: Path, name: str, model: Path, data: Path, steps: int, volume_tokens: int) -> dict:
    from medvl.train.config import load_config
    from medvl.train.loop import StageRecipe

    spec = yaml.safe_load((REPO / "configs" / "cards" / "synthetic-3d.yaml").read_text())["options"]["volume"]
    cfg = {
        "stage": name,
        "model": str(model),
        "output_dir": str(root / name),
        "data": [{"path": str(data)}],
        "freeze": {"llm": False, "projector": False, "vision": False},
        "packing": "soft",
        "lr": 1e-3,
        "global_batch_size": 8,
        "micro_batch_size": 8,
        "max_length": 1024,
        "max_steps": steps,
        "volume_tokens": volume_tokens,
        "volume_specs": [spec],
        "log_every": 1000,
        "peak_flops": 1e11,
        "seed": 0,
    }
    (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    recipe = StageRecipe(load_config(root / f"{name}.yaml"))
    recipe.setup()
    t = time.perf_counter()
    recipe.train()
    wall = time.perf_counter() - t
    hist = recipe.history
    timed = hist[1:]
    seconds = sum(h["seconds"] for h in timed)
    sample = recipe.dataset.samples[0]
    image_id = recipe.base.config.image_token_id
    return {
        "route": name,
        "image_tokens_per_volume": sample.input_ids.count(image_id),
        "tower_inputs_per_volume": sample.n_images,
        "sequence_tokens": len(sample.input_ids),
        "volumes_per_s": len(timed) * 8 / seconds,
        "tokens_per_s": sum(h["tokens"] for h in timed) / seconds,
        "s_per_step": seconds / len(timed),
        "wall_s": round(wall, 1),
        "final_loss": hist[-1]["loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--volumes", type=int, default=48)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    args = ap.parse_args()
    import torch

    from medvl.model.build import build_preset
    from medvl.model.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_data(root, args.volumes, args.seed)
        texts = [t["value"] for s in json.loads(data.read_text()) for t in s["conversations"]]
        tokenizer = train_tokenizer(texts * 20, vocab_size=512)
        for preset in ("tiny", "tiny-3d"):
            build_preset(preset, tokenizer=tokenizer, seed=args.seed).save(root / preset)
        rows = []
        for name, preset, budget in (
            ("slices K=32", "tiny", 32 * 16),
            ("slices K=8", "tiny", 8 * 16),
            ("slices K=4", "tiny", 4 * 16),
            ("native (8 slabs)", "tiny-3d", 4096),
        ):
            torch.manual_seed(args.seed)
            rows.append(run(root, name.split()[0] + str(budget), root / preset, data, args.steps, budget))
            rows[-1]["route"] = name
        base = rows[0]["volumes_per_s"]
        print(
            f"{args.volumes} phantom volumes, {args.steps} steps of 8 (first not timed), "
            f"torch threads {torch.get_num_threads()}"
        )
        print(
            "| route | tower inputs / volume | image tokens / volume | tokens / sample | volumes/s "
            "| x slices K=32 |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for r in rows:
            print(
                f"| {r['route']} | {r['tower_inputs_per_volume']} | {r['image_tokens_per_volume']} | "
                f"{r['sequence_tokens']} | {r['volumes_per_s']:.2f} | {r['volumes_per_s'] / base:.2f} |"
            )
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
