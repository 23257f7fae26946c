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
