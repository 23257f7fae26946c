"""Subcommands whose stage has not been built yet say so and exit non-zero; nothing pretends."""

from __future__ import annotations

import typer


def not_yet(stage: str, issue: str) -> None:
    typer.echo(f"medvl {stage}: not yet available (tracked in {issue}).", err=True)
    raise typer.Exit(code=2)
