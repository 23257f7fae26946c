"""Is lesion presence in a 3D tower's tokens? Probes on a `medvl quickstart --3d` output folder.

The 3D quickstart's lesion questions sit at their priors (docs/3d.md); this says whether the tower could
have told the LM. Data: the run's curated training volumes (lesion or not from each record's measured
facts, `medvl.volume_facts`; the last 20% held out) and the lesion-presence questions of its synthetic 3D
benchmark (`bench/synth3d.tsv`, held-out phantoms). Two probes, each against the majority-class baseline
(50%: half of the volumes have a lesion):

- `linear`: the run's pretrained tower (`parts/tower3d`, CLIP-style `pretrain-3d`) frozen; a logistic
  regression (L-BFGS, three weight decays) on its patch tokens mean- and max-pooled, as pretraining pools.
- `supervised`: the `tiny-3d` preset's tower from random weights with a linear head on the same pooled
  tokens, trained on lesion presence itself (AdamW 1e-3, batches of 16): an upper bound for what the
  tower's architecture finds in this input in that many steps. `--vision` overrides the preset's vision
  config, e.g. '{"image_size": 32, "tubelet_size": [2, 8, 8]}'.

    python benchmarks/lesion_probe_3d.py runs/quickstart-3d --steps 400
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch


def volume_pixels(paths: list[Path], size: int, frames: int) -> torch.Tensor:
    from medvl.imaging import volume_slabs
    from medvl.model.build import volume_image_processor

    processor = volume_image_processor(size)
    slabs = [[im.convert("RGB") for im in volume_slabs(np.load(p), frames)] for p in paths]
    return processor(slabs, return_tensors="pt")["pixel_values"]


def pooled(tower, pixels: torch.Tensor) -> torch.Tensor:
    h = tower(pixel_values=pixels).last_hidden_state[:, 1:]  # the CLS token dropped, as LLaVA does
    return torch.cat([h.mean(1), h.amax(1)], -1)


def data(run: Path) -> tuple[list[Path], torch.Tensor, list[Path], torch.Tensor]:
    from medvl.records import read_rows
    from medvl.volume_facts import volume_facts

    facts = [volume_facts(r) for r in read_rows(run / "curated" / "data") if r["kind"] == "volume"]
    train = [run / "curated" / f.file for f in facts]
    y = torch.tensor([float("lesion" in f.labels) for f in facts])
    with (run / "bench" / "synth3d.tsv").open(encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh, delimiter="\t") if r["category"] == "lesion presence"]
    bench = [run / "bench" / r["image"] for r in rows]
    yb = torch.tensor([float(r[r["answer"]] == "yes") for r in rows])
    return train, y, bench, yb


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float(((logits > 0).float() == y).float().mean())


def fit_logistic(x: torch.Tensor, y: torch.Tensor, wd: float) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised logistic regression by L-BFGS -> (weights, bias)."""
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + wd * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def linear_probe(run: Path, train, y, bench, yb) -> list[dict]:
    from transformers import AutoModel

    tower = AutoModel.from_pretrained(run / "parts" / "tower3d").eval()
    cfg = tower.config
    with torch.no_grad():
        x = torch.cat(
            [
                pooled(tower, volume_pixels(train[i : i + 32], cfg.image_size, cfg.num_frames))
                for i in range(0, len(train), 32)
            ]
        )
        xb = pooled(tower, volume_pixels(bench, cfg.image_size, cfg.num_frames))
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, xb = (x - mu) / sd, (xb - mu) / sd
    cut = int(0.8 * len(y))
    out = []
    for wd in (1e-3, 1e-2, 1e-1):
        w, b = fit_logistic(x[:cut], y[:cut], wd)
        out.append(
            dict(
                probe=f"linear, weight decay {wd:g}",
                train=accuracy(x[:cut] @ w + b, y[:cut]),
                held_out=accuracy(x[cut:] @ w + b, y[cut:]),
                bench=accuracy(xb @ w + b, yb),
            )
        )
    return out


def supervised_probe(train, y, bench, yb, steps: int, vision: dict, seed: int = 0) -> dict:
    from transformers import AutoConfig, AutoModel

    from medvl.model.build import load_preset

    spec = load_preset("tiny-3d")
    cfg = AutoConfig.for_model(**{**spec.vision_config, **vision})
    torch.manual_seed(seed)
    tower, head = AutoModel.from_config(cfg), torch.nn.Linear(2 * cfg.hidden_size, 1)
    x = volume_pixels(train, cfg.image_size, cfg.num_frames)
    xb = volume_pixels(bench, cfg.image_size, cfg.num_frames)
    cut = int(0.8 * len(y))
    opt = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(cut, (16,), generator=g)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            head(pooled(tower, x[idx])).squeeze(-1), y[idx]
        )
        loss.backward()
        opt.step()
        opt.zero_grad()
    tower.eval()
    with torch.no_grad():
        held = torch.cat([head(pooled(tower, x[i : i + 32])).squeeze(-1) for i in range(cut, len(y), 32)])
        return dict(
            probe=f"supervised {steps} steps, vision {json.dumps(vision) if vision else 'tiny-3d'}",
            train=float("nan"),
            held_out=accuracy(held, y[cut:]),
            bench=accuracy(head(pooled(tower, xb)).squeeze(-1), yb),
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a `medvl quickstart --3d` output folder")
    ap.add_argument("--steps", type=int, default=400, help="steps of the supervised probe")
    ap.add_argument("--vision", type=json.loads, default={}, help="vision config overrides (JSON)")
    args = ap.parse_args()
    train, y, bench, yb = data(args.run)
    rows = [
        *linear_probe(args.run, train, y, bench, yb),
        supervised_probe(train, y, bench, yb, args.steps, args.vision),
    ]
    cut = int(0.8 * len(y))
    print(
        f"{len(y)} curated volumes ({cut} train, {len(y) - cut} held out, {y.mean():.0%} with a lesion); "
        f"{len(yb)} benchmark volumes ({yb.mean():.0%} with a lesion); majority class: 50%"
    )
    print("| probe | train | held out | benchmark |\n|---|---:|---:|---:|")
    for r in rows:
        train = "" if r["train"] != r["train"] else f"{r['train']:.1%}"  # NaN: not measured
        print(f"| {r['probe']} | {train} | {r['held_out']:.1%} | {r['bench']:.1%} |")


if __name__ == "__main__":
    main()
