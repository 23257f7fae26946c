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
- `--paired N` (no run folder needed): the supervised probe on counterfactual pairs instead, the easiest
  form of the task: N phantoms drawn twice by `case_phantom`, with and without their lesion (the same
  anatomy, so the lesion is all that tells the two apart), regions in turn, and 60 held-out pairs drawn
  the same way from another seed (accuracy exactly 50% while the tower gives a pair's two volumes one
  answer). `--windows` swaps the card's three CT windows (abdomen,lung,brain: the brain window, 80 HU
  wide, shows abdominal and head lesions at up to 50-170 of 255 grey levels where the bone window
  shows 3-11); `--large-only` draws every lesion at the large grade (40-46 mm); `--every` logs the held-out
  accuracy along the way. `--square K` is the control that shows the probe can learn a local finding:
  the pairs without any lesion, one of each with a bright K x K pixel square (+1.5 after normalisation,
  every channel) at a random place on one slab.

    python benchmarks/lesion_probe_3d.py runs/quickstart-3d --steps 400
    python benchmarks/lesion_probe_3d.py --paired 240 --steps 3000 --windows abdomen,lung,brain --every 500
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch


def array_pixels(arrays: list[np.ndarray], size: int, frames: int) -> torch.Tensor:
    """Stored uint8 [C, S, P, L] volumes -> the native tower's pixels, as the model's processor makes them."""
    from medvl.imaging import volume_slabs
    from medvl.model.build import volume_image_processor

    slabs = [[im.convert("RGB") for im in volume_slabs(a, frames)] for a in arrays]
    return volume_image_processor(size)(slabs, return_tensors="pt")["pixel_values"]


def volume_pixels(paths: list[Path], size: int, frames: int) -> torch.Tensor:
    return array_pixels([np.load(p) for p in paths], size, frames)


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


def tower_and_head(vision: dict, seed: int):
    from transformers import AutoConfig, AutoModel

    from medvl.model.build import load_preset

    cfg = AutoConfig.for_model(**{**load_preset("tiny-3d").vision_config, **vision})
    torch.manual_seed(seed)
    return AutoModel.from_config(cfg), torch.nn.Linear(2 * cfg.hidden_size, 1)


def train_probe(tower, head, x, y, steps: int, seed: int, every: int = 0, check=None) -> None:
    """AdamW 1e-3 on batches of 16 drawn from (x, y); `check()` logged every `every` steps."""
    opt = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(y), (16,), generator=g)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            head(pooled(tower, x[idx])).squeeze(-1), y[idx]
        )
        loss.backward()
        opt.step()
        opt.zero_grad()
        if every and check is not None and (step + 1) % every == 0:
            print(f"  step {step + 1}: loss {loss.item():.3f}, held out {check():.1%}", flush=True)


def supervised_probe(train, y, bench, yb, steps: int, vision: dict, seed: int = 0) -> dict:
    tower, head = tower_and_head(vision, seed)
    cfg = tower.config
    x = volume_pixels(train, cfg.image_size, cfg.num_frames)
    xb = volume_pixels(bench, cfg.image_size, cfg.num_frames)
    cut = int(0.8 * len(y))
    train_probe(tower, head, x[:cut], y[:cut], steps, seed)
    tower.eval()
    with torch.no_grad():
        held = torch.cat([head(pooled(tower, x[i : i + 32])).squeeze(-1) for i in range(cut, len(y), 32)])
        return dict(
            probe=f"supervised {steps} steps, vision {json.dumps(vision) if vision else 'tiny-3d'}",
            train=float("nan"),
            held_out=accuracy(held, y[cut:]),
            bench=accuracy(head(pooled(tower, xb)).squeeze(-1), yb),
        )


def paired_pixels(
    n: int, seed: int, windows: tuple[str, ...] | None, large_only: bool, cfg, square: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` counterfactual pairs (module docstring) as the tower's pixels, and their labels."""
    from medvl.synth.benchmark3d import REGIONS, SPEC, check_training_seed, prepare
    from medvl.synth.phantom import DRAW_DIAMETER_MM, case_phantom

    check_training_seed(seed)
    spec = SPEC.model_copy(update={"windows": windows}) if windows else SPEC
    sizes = (DRAW_DIAMETER_MM[-1],) * len(DRAW_DIAMETER_MM) if large_only else DRAW_DIAMETER_MM
    arrays = [
        prepare(
            case_phantom(REGIONS[i % len(REGIONS)], lesion and not square, (seed, i), diameters_mm=sizes),
            spec,
        )[0]
        for i in range(n)
        for lesion in (True, False)
    ]
    x = array_pixels(arrays, cfg.image_size, cfg.num_frames)
    if square:
        g = torch.Generator().manual_seed(seed)
        side = cfg.image_size
        for i in range(0, 2 * n, 2):  # the first of each pair
            t = int(torch.randint(cfg.num_frames, (1,), generator=g))
            r, c = torch.randint(side // 4, 3 * side // 4 - square, (2,), generator=g).tolist()
            x[i, t, :, r : r + square, c : c + square] += 1.5
    return x, torch.tensor([1.0, 0.0] * n)


def paired_probe(args) -> None:
    tower, head = tower_and_head(args.vision, 0)
    cfg = tower.config
    windows = tuple(args.windows.split(",")) if args.windows else None
    x, y = paired_pixels(args.paired, 1, windows, args.large_only, cfg, args.square)
    xh, yh = paired_pixels(60, 2, windows, args.large_only, cfg, args.square)

    def held_out() -> float:
        with torch.no_grad():
            return accuracy(head(pooled(tower, xh)).squeeze(-1), yh)

    finding = "lesions, " + ("large" if args.large_only else "all grades")
    if args.square:
        finding = f"a {args.square} x {args.square} square instead of a lesion"
    windows_said = ",".join(windows) if windows else "the card's"
    vision_said = json.dumps(args.vision) if args.vision else "tiny-3d"
    print(
        f"{args.paired} counterfactual pairs to train on, 60 held out; {finding}; "
        f"windows {windows_said}; vision {vision_said}"
    )
    train_probe(tower, head, x, y, args.steps, 0, args.every, held_out)
    print(f"supervised, {args.steps} steps: held out {held_out():.1%} (blind to the finding: 50.0%)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, nargs="?", help="a `medvl quickstart --3d` output folder")
    ap.add_argument("--steps", type=int, default=400, help="steps of the supervised probe")
    ap.add_argument("--vision", type=json.loads, default={}, help="vision config overrides (JSON)")
    ap.add_argument("--paired", type=int, default=0, help="counterfactual pairs instead of a run folder")
    ap.add_argument("--windows", default="", help="with --paired: three CT windows, comma-separated")
    ap.add_argument("--large-only", action="store_true", help="with --paired: every lesion large")
    ap.add_argument("--every", type=int, default=0, help="with --paired: log every this many steps")
    ap.add_argument("--square", type=int, default=0, help="with --paired: the K x K square control")
    args = ap.parse_args()
    if args.paired:
        paired_probe(args)
        return
    if args.run is None:
        ap.error("a run folder, or --paired N")
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
