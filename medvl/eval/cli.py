from __future__ import annotations

from pathlib import Path

import typer

# Every loader in medvl.eval.benchmarks.LOADERS (a test keeps them equal; not imported here, so that
# `medvl --help` stays fast); the 3D ones ask about volumes.
BENCHES = (
    "mc, gmai-mmbench, omnimedvqa, mmmu, vqa-rad, slake, pathvqa, pmc-vqa, synth3d, m3d-vqa, ct-rate-vqa"
)
REPORT_BENCHES = "iu-xray, mimic-cxr, ct-rate, reports-jsonl"


def eval_cmd(
    runs: list[Path] = typer.Argument(None, help="With --compare: two or more run folders of medvl eval."),
    model: Path = typer.Option(None, help="A medvl model folder (or use --api-base/--api-model)."),
    bench: str = typer.Option(None, help=f"Benchmark type: {BENCHES}; report generation: {REPORT_BENCHES}."),
    data: Path = typer.Option(None, help="The benchmark's file or folder (see docs/eval.md for each)."),
    out: Path = typer.Option(Path("eval-out"), help="Folder for predictions and the report."),
    api_base: str = typer.Option(None, help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1."),
    api_model: str = typer.Option(None, help="Model name at --api-base."),
    api_key: str = typer.Option(
        None, envvar="OPENAI_API_KEY", help="Key for --api-base (env OPENAI_API_KEY)."
    ),
    split: str = typer.Option(
        "test", help="SLAKE split file to read (test, validate, train); reports: test, val or train."
    ),
    lang: str = typer.Option("en", help="SLAKE question language: en or zh."),
    batch_size: int = typer.Option(16, min=1),
    max_new_tokens: int = typer.Option(None, min=1, help="Default 32 (VQA), 256 (reports)."),
    limit: int = typer.Option(None, min=1, help="Only the first N questions (a quick look)."),
    image_check: bool = typer.Option(
        False, help="Also run with blank and shuffled images; flag image-blind models."
    ),
    judge_base: str = typer.Option(
        None, help="OpenAI-compatible endpoint of an LLM judge for unresolved answers."
    ),
    judge_model: str = typer.Option(None, help="Judge model name at --judge-base."),
    judge_key: str = typer.Option(None, envvar="MEDVL_JUDGE_API_KEY", help="Key for --judge-base."),
    rescore: Path = typer.Option(None, help="Score this prediction file again instead of running a model."),
    compare: bool = typer.Option(
        False,
        "--compare",
        help="Compare run folders given as arguments (same questions): paired interval and McNemar's test.",
    ),
    train_split: Path = typer.Option(
        None, help="Training split (same format as --data) for the majority and question-only baselines."
    ),
    workers: int = typer.Option(
        1, min=1, help="Worker processes (or Ray actors) answering (or writing reports) in parallel."
    ),
    engine: str = typer.Option("local", help="Where workers run: local (processes) or ray."),
    api_concurrency: int = typer.Option(
        4, min=1, help="Requests in flight per worker to --api-base (retries and a cache in --out)."
    ),
    chunk_size: int = typer.Option(
        64, min=1, help="Questions (studies) per unit of work and commit; a killed run redoes at most one."
    ),
    report_option: list[str] = typer.Option(
        None, help="Report generation setting KEY=VALUE (repeatable; docs/eval.md, Report generation)."
    ),
) -> None:
    """Evaluate a model on medical VQA benchmarks, with VLMEvalKit-style scoring and published
    reference rows; or re-score a prediction file (--rescore); or compare runs (--compare)."""
    from medvl import RESEARCH_ONLY
    from medvl.eval.benchmarks import BenchmarkError
    from medvl.eval.harness import evaluate
    from medvl.eval.harness import rescore as rescore_file
    from medvl.eval.report import compare as compare_reports

    if compare:
        try:
            typer.echo(f"wrote {compare_reports(runs or [], out)}")
        except (FileNotFoundError, ValueError) as e:
            typer.echo(f"medvl eval: {e}", err=True)
            raise typer.Exit(code=1) from e
        return
    if runs:
        raise typer.BadParameter("run folders as arguments go with --compare")
    judge = None
    if judge_base or judge_model:
        if not (judge_base and judge_model):
            raise typer.BadParameter("--judge-base and --judge-model go together")
        from medvl.llm import LLMClient

        judge = (LLMClient(judge_base, api_key=judge_key), judge_model)
    try:
        if bench in REPORT_BENCHES.split(", "):
            from medvl.eval.report_task import report_cli

            runner = None if rescore else _model(model, api_base, api_model, api_key, api_concurrency)
            typer.echo(
                report_cli(
                    runner, bench, data, out, rescore, split, batch_size, max_new_tokens, limit,
                    report_option or [], workers, engine, chunk_size,
                )
            )  # fmt: skip
            return
        if rescore:
            report = rescore_file(rescore, out, bench=bench, judge=judge)
        else:
            if bench is None or data is None:
                raise typer.BadParameter("--bench and --data are required (or --rescore / --compare)")
            report = evaluate(
                _model(model, api_base, api_model, api_key, api_concurrency),
                bench,
                data,
                out,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens or 32,
                limit=limit,
                image_check=image_check,
                split=split,
                lang=lang,
                judge=judge,
                train_split=train_split,
                workers=workers,
                engine=engine,
                chunk=chunk_size,
            )
    except (BenchmarkError, FileNotFoundError, ValueError) as e:
        typer.echo(f"medvl eval: {e}", err=True)
        raise typer.Exit(code=1) from e
    o = report["overall"]
    acc = "–" if o["accuracy"] is None else f"{100 * o['accuracy']:.2f}%"
    if o["accuracy"] is not None:
        lo, hi = o["ci95"]["accuracy"]
        acc += f" [95% CI {100 * lo:.2f}, {100 * hi:.2f}]"
    typer.echo(f"{report['run']['bench']}: {o['n']} questions scored, accuracy {acc}")
    for name, b in o.get("baselines", {}).items():
        typer.echo(f"  baseline {name.replace('_', ' ')}: accuracy {100 * b['accuracy']:.2f}%")
    if "unresolved" in o:
        typer.echo(
            f"  random guess {100 * o['random_guess']:.2f}%, "
            f"unresolved {o['unresolved']}, refused {o['refused']}"
        )
    dep = report.get("image_dependence")
    if dep and dep["image_independent"]:
        typer.echo("  FLAG: no measurable accuracy drop without the real images (report.md)")
    typer.echo(f"report: {out / 'report.md'}\n{RESEARCH_ONLY}")


def _model(model: Path | None, api_base: str | None, api_model: str | None, api_key: str | None,
           api_concurrency: int):  # fmt: skip
    """What to evaluate: a model folder, or the model behind an OpenAI-compatible endpoint."""
    from medvl.eval.harness import APIModel

    if api_base or api_model:
        if not (api_base and api_model) or model:
            raise typer.BadParameter("give either --model, or --api-base with --api-model")
        return APIModel(api_base, api_model, api_key, max_concurrency=api_concurrency)
    if model:
        return model
    raise typer.BadParameter("give --model <folder>, or --api-base and --api-model")
