from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def curate(
    card: Annotated[
        list[Path],
        typer.Option(
            "--card",
            help="Dataset card YAML; repeat to curate several sources "
            "into one output (duplicates are searched across them, earlier cards win).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder; re-running resumes / is a no-op.")],
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="Parallel worker processes (or Ray CPUs).")
    ] = 1,
    engine: Annotated[
        str, typer.Option("--engine", help="local (processes) or ray (ray.data; RAY_ADDRESS for a cluster).")
    ] = "local",
    shard_records: Annotated[
        int, typer.Option("--shard-records", min=1, help="Records per Parquet shard.")
    ] = 1000,
) -> None:
    """Ingest labelled datasets (2D, 3D, video) into traceable records: sharded Parquet, a quarantine
    report and a dataset card."""
    from rich.progress import Progress

    from medvl.jobs import ENGINES

    from .card import CardError, load_card
    from .pipeline import curate as run
    from .report import counts_line

    if engine not in ENGINES:
        raise typer.BadParameter(f"--engine must be one of {', '.join(ENGINES)}")
    try:
        cards = [load_card(c) for c in card]
    except CardError as e:
        typer.echo(f"medvl curate: {e}", err=True)
        raise typer.Exit(code=2) from None
    with Progress(transient=True) as bar:
        task = bar.add_task("curating", total=None)
        report = run(
            cards,
            out,
            workers=workers,
            engine=engine,
            shard_records=shard_records,
            on_progress=lambda n, total: bar.update(task, completed=n, total=total),
        )
    typer.echo(
        counts_line(report["counts"])
        + f"\nrecords: {out}/data/*.parquet  quarantine: {out}/quarantine.jsonl  "
        f"dropped: {out}/dropped.jsonl  card: {out}/dataset_card.md"
    )
