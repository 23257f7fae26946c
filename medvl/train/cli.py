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
    configs: list[Path] = typer.Argument(..., help="Stage YAMLs in order, e.g. stage1.yaml stage2.yaml stage3.yaml"),
    model: Path = typer.Option(None, help="Starting model for the first stage (default: its config's)."),
    resume: bool = typer.Option(False, help="Skip finished stages, resume the interrupted one."),
) -> None:
    """Chain stages: each starts from the previous stage's final model."""
    from medvl.train.config import load_config
    from medvl.train.loop import train_stage

    run_stages(configs, model, resume, load_config, train_stage)


def run_stages(configs, model, resume, load_config, train_stage) -> list[Path]:
    finals = []
    for cfg_path in configs:
        cfg = load_config(cfg_path, model=model)
        final = cfg.output_dir / "final"
        if resume and (final / "config.json").exists():
            typer.echo(f"[{cfg.stage}] already finished: {final}")
        else:
            final = train_stage(cfg, resume=resume)
        finals.append(final)
        model = final
    return finals
