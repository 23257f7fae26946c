from __future__ import annotations

from pathlib import Path

import typer


def train(
    config: Path = typer.Option(..., "--config", "-c", help="Stage YAML (see configs/gmai-vl/)."),
    model: Path = typer.Option(None, help="Override the config's starting model folder."),
    output_dir: Path = typer.Option(None, help="Override the config's output folder."),
    resume: bool = typer.Option(False, help="Continue from the newest complete checkpoint in output_dir."),
    max_steps: int = typer.Option(None, help="Override the number of optimizer steps."),
) -> None:
    """Train one stage from a YAML config (launch with `accelerate launch -m medvl.cli train ...`
    for DDP/FSDP/DeepSpeed)."""
    from medvl.train.config import load_config
    from medvl.train.loop import train_stage

    cfg = load_config(config, model=model, output_dir=output_dir, max_steps=max_steps)
    final = train_stage(cfg, resume=resume)
    typer.echo(f"[{cfg.stage}] final model: {final}")


def pipeline(
    configs: list[Path] = typer.Argument(..., help="Stage YAMLs in order (stage1 stage2 stage3)"),
    model: Path = typer.Option(None, help="Starting model for the first stage (default: its config's)."),
    resume: bool = typer.Option(False, help="Skip finished stages, resume the interrupted one."),
) -> None:
    """Chain stages: each starts from the previous stage's final model."""
    from medvl.train.config import load_config
    from medvl.train.loop import run_stages

    # Validate every stage's config before the first one starts.
    cfgs = [load_config(p) for p in configs]
    run_stages(cfgs, model, resume)


def pretrain_3d(
    source: Path = typer.Argument(
        ...,
        help="A curated folder (its volume records, captioned from their labels) or a JSONL file of "
        '{"volume": <.npy or scan path, relative to the file>, "text": <report>} pairs.',
    ),
    out: Path = typer.Option(..., help="Folder for the pretrained 3D tower (weights, config, processor)."),
    preset: str = typer.Option(
        "tiny-3d",
        help="Preset whose vision tower is pretrained: a 3D tower (native route) or a 2D one (slices).",
    ),
    slabs: int = typer.Option(
        8, help="Slabs per volume for a 2D tower (the slices route's K); a 3D tower's own."
    ),
    steps: int = typer.Option(300, help="Optimizer steps."),
    batch_size: int = typer.Option(16, help="Pairs per step (the in-batch negatives)."),
    lr: float = typer.Option(1e-3, help="Peak learning rate (cosine)."),
    splits: list[str] = typer.Option(
        ["train"], "--split", help="Curated splits to use (records of none: always)."
    ),
    seed: int = typer.Option(0),
) -> None:
    """CLIP-style pretraining of a vision tower on volume-text pairs, before stage I aligns it: a 3D tower
    (native route) or a 2D tower over a volume's slabs (slices route), docs/3d.md; assemble with
    `medvl build --vision <out> --llm ...`."""
    from medvl.model.build import load_preset
    from medvl.records import read_rows
    from medvl.train.pretrain import pretrain_volume_text, volume_text_pairs

    if source.is_dir():
        pairs = [p for p in volume_text_pairs(source) if p["split"] in (*splits, "")]
        root = source
    else:
        pairs, root = read_rows(source), source.parent
        for i, p in enumerate(pairs):
            if not isinstance(p.get("volume"), str) or not isinstance(p.get("text"), str):
                raise ValueError(f"{source}: line {i + 1}: needs string fields 'volume' and 'text'")
    typer.echo(f"{len(pairs)} volume-text pairs")
    pretrain_volume_text(
        load_preset(preset),
        pairs,
        root,
        out,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        slabs=slabs,
        log=typer.echo,
    )
    typer.echo(f"wrote {out}")
