from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def _names(value: str, allowed: tuple[str, ...] | None, what: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if allowed is not None and n not in allowed]
    if bad or not names:
        raise typer.BadParameter(
            f"{what}: {', '.join(bad) or 'none given'}; one or more of {', '.join(allowed or ())}"
        )
    return names


def generate(
    curated: Annotated[
        list[Path], typer.Argument(help="Curated output folders (or Parquet files) of `medvl curate`.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder; re-running resumes / is a no-op.")],
    backend: Annotated[str, typer.Option("--backend", help="template (offline) or openai.")] = "template",
    splits: Annotated[
        str,
        typer.Option(
            "--splits",
            help="Comma-separated splits to generate from (records of sources that define no split are "
            "always used).",
        ),
    ] = "train",
    formats: Annotated[
        str, typer.Option("--formats", help="Comma-separated formats (default: all six).")
    ] = "caption,region,instruction,dialogue,perception,text",
    zh_share: Annotated[
        float, typer.Option("--zh-share", min=0.0, max=1.0, help="Share of samples also written in Chinese.")
    ] = 0.3,
    seed: Annotated[int, typer.Option("--seed", help="Seed of every choice the generator makes.")] = 0,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Parallel worker processes.")] = 1,
    engine: Annotated[
        str, typer.Option("--engine", help="local (processes) or ray (ray.data; RAY_ADDRESS for a cluster).")
    ] = "local",
    base_url: Annotated[str, typer.Option("--base-url", help="openai: the endpoint.")] = "",
    model: Annotated[str, typer.Option("--model", help="openai: the model name.")] = "",
    api_key_env: Annotated[
        str, typer.Option("--api-key-env", help="openai: environment variable holding the API key.")
    ] = "OPENAI_API_KEY",
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="openai: requests in flight.")] = 8,
    # ---- openai backend: dry run and batch files (see medvl.generate.openai_backend.prepare)
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="openai: print requests, tokens and estimated cost; send none.")
    ] = False,
    batch_out: Annotated[
        Path | None, typer.Option("--batch-out", help="openai: write the requests as a Batch API input file.")
    ] = None,
    batch_in: Annotated[
        Path | None, typer.Option("--batch-in", help="openai: read a Batch API results file into the cache.")
    ] = None,
) -> None:
    """Instruction data in six formats (English and Chinese) from curated records, validated against
    each record's fact sheet."""
    from rich.progress import Progress

    from medvl.jobs import ENGINES
    from medvl.samples import FORMATS

    from .pipeline import generate as run

    if engine not in ENGINES:
        raise typer.BadParameter(f"--engine must be one of {', '.join(ENGINES)}")
    if backend == "template":
        from .template import TemplateBackend

        writer = TemplateBackend()
    elif backend == "openai":
        if not base_url or not model:
            raise typer.BadParameter("--backend openai needs --base-url and --model")
        from .openai_backend import OpenAIBackend

        writer = OpenAIBackend(
            base_url, model, api_key_env=api_key_env, cache_dir=out / "llm-cache", concurrency=concurrency,
            image_root=out,
        )  # fmt: skip
    else:
        raise typer.BadParameter("--backend must be template or openai")
    # ---- openai backend: what runs before the job (or instead of it)
    prepare = None
    if backend == "openai":
        from functools import partial

        from .openai_backend import prepare as before_job

        prepare = partial(
            before_job, writer, dry_run=dry_run, batch_in=batch_in, batch_out=batch_out, echo=typer.echo
        )
    elif dry_run or batch_in or batch_out:
        raise typer.BadParameter("--dry-run, --batch-in and --batch-out need --backend openai")
    # ---- end of the openai backend's part
    with Progress(transient=True) as bar:
        task = bar.add_task("generating", total=None)
        report = run(
            curated,
            out,
            writer,
            splits=_names(splits, None, "--splits"),
            formats=_names(formats, FORMATS, "--formats"),
            zh_share=zh_share,
            seed=seed,
            workers=workers,
            engine=engine,
            on_progress=lambda n, total: bar.update(task, completed=n, total=total),
            prepare=prepare,
        )
    if report is None:  # an openai dry run or batch file: nothing was generated
        return
    reasons = ", ".join(f"{k} {v}" for k, v in report["reasons"].items()) or "none"
    skipped = ", ".join(f"{k} {v}" for k, v in report["skipped_reasons"].items()) or "none"
    typer.echo(
        f"read {report['read']} = kept {report['kept']} + rejected {report['rejected']} ({reasons}) + "
        f"quarantined {report['quarantined']} + skipped {report['skipped']} ({skipped}); "
        f"records {report['records']}.\n"
        f"samples: {out}/samples.jsonl  rejected: {out}/rejected.jsonl  report: {out}/report.json"
    )
