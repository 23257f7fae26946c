from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def quality(
    gen: Annotated[
        list[Path], typer.Argument(help="`medvl generate` output folders (or samples JSONL files).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder; re-running resumes / is a no-op.")],
    config: Annotated[
        Path | None, typer.Option("--config", help="Thresholds YAML (default: the shipped thresholds.yaml).")
    ] = None,
    benchmark: Annotated[
        list[Path] | None,
        typer.Option(
            "--benchmark",
            help="An evaluation split whose images must never reach training data: a VLMEvalKit TSV, a "
            "SLAKE folder (test.json + imgs/) or split JSON, a curated set (its split=test records), or an "
            "image folder. Repeat for several.",
        ),
    ] = None,
    judge_base_url: Annotated[
        str | None, typer.Option("--judge-base-url", help="OpenAI-compatible endpoint of the clinical judge.")
    ] = None,
    judge_model: Annotated[str | None, typer.Option("--judge-model", help="The judge's model name.")] = None,
    judge_api_key_env: Annotated[
        str | None,
        typer.Option("--judge-api-key-env", help="Environment variable holding the judge's API key."),
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="Parallel worker processes (or Ray CPUs).")
    ] = 1,
    engine: Annotated[str, typer.Option("--engine", help="local (processes) or ray.")] = "local",
) -> None:
    """Score generated samples on five dimensions (image validity, annotation fidelity, image-text
    alignment, language quality, clinical validity), drop benchmark images, and write kept.jsonl
    (trainable), rejected.jsonl, per-sample scores (Parquet) and report.md/json (docs/quality.md)."""
    from medvl.jobs import ENGINES

    from .config import load_thresholds
    from .pipeline import Judge
    from .pipeline import quality as run

    if engine not in ENGINES:
        raise typer.BadParameter(f"--engine must be one of {', '.join(ENGINES)}")
    if (judge_base_url is None) != (judge_model is None):
        raise typer.BadParameter("--judge-base-url and --judge-model go together")
    judge = Judge(judge_base_url, judge_model, judge_api_key_env) if judge_base_url and judge_model else None
    report = run(
        gen,
        out,
        load_thresholds(config),
        benchmarks=benchmark or [],
        judge=judge,
        workers=workers,
        engine=engine,
    )
    c = report["counts"]
    typer.echo(
        f"read {c['read']}: kept {c['kept']}, rejected {c['rejected']}, quarantined {c['quarantined']}; "
        f"clinical checks by {', '.join(report['checks_run']['clinical'])}; "
        f"{len(report['benchmark']['dropped'])} benchmark images found and dropped\n"
        f"kept: {out}/kept.jsonl  rejected: {out}/rejected.jsonl  report: {out}/report.md"
    )
