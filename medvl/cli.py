"""The one `medvl` command. Each subcommand lives beside its stage (medvl/<stage>/cli.py) and
imports its heavy dependencies inside the function, so that `medvl --help` stays instant.

An error ends the command with one line on stderr (for a bad input: the file, the field and the
problem) and exit status 1; `medvl --debug <command>` (or MEDVL_DEBUG=1) shows the traceback instead."""

from __future__ import annotations

import os
import sys

import typer

from medvl.curate.cli import curate
from medvl.data.mix import mix_command
from medvl.eval.cli import eval_cmd
from medvl.generate.cli import generate
from medvl.model.cli import build, convert_m3d_command
from medvl.quality.cli import quality
from medvl.quickstart import quickstart
from medvl.serve.chat import chat
from medvl.serve.cli import serve, ui
from medvl.synth.cli import synth
from medvl.train.cli import pipeline, pretrain_3d, train

app = typer.Typer(
    help="medvl: labelled medical images in; instruction data, a trained LLaVA-style model, "
    "benchmark tables and a served model out. Pipeline order: curate -> generate -> quality -> "
    "build -> train (stages I-III, or `pipeline`) -> eval -> serve / ui / chat. "
    "Research use only; not for diagnosis.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

_debug = {"on": os.environ.get("MEDVL_DEBUG", "") not in ("", "0")}


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback when a command fails."),
) -> None:
    _debug["on"] = _debug["on"] or debug


app.command("synth", rich_help_panel="1. Data")(synth)
app.command("curate", rich_help_panel="1. Data")(curate)
app.command("generate", rich_help_panel="1. Data")(generate)
app.command("quality", rich_help_panel="1. Data")(quality)
app.command("mix", rich_help_panel="1. Data")(mix_command)
app.command("build", rich_help_panel="2. Model")(build)
app.command("convert-m3d", rich_help_panel="2. Model")(convert_m3d_command)
app.command("pretrain-3d", rich_help_panel="2. Model")(pretrain_3d)
app.command("train", rich_help_panel="2. Model")(train)
app.command("pipeline", rich_help_panel="2. Model")(pipeline)
app.command("eval", rich_help_panel="3. Evaluate and use")(eval_cmd)
app.command("chat", rich_help_panel="3. Evaluate and use")(chat)
app.command("serve", rich_help_panel="3. Evaluate and use")(serve)
app.command("ui", rich_help_panel="3. Evaluate and use")(ui)
app.command("quickstart", rich_help_panel="0. Start here")(quickstart)


def main() -> None:
    """The console entry point: `app` with errors reported in one line."""
    try:
        app()
    except Exception as e:  # SystemExit (typer's own usage errors, exit codes) and Ctrl-C pass through
        if _debug["on"]:
            raise
        # ValueErrors are the project's bad-input errors (InputError, card and benchmark errors) and
        # already say what is wrong; anything else is named by its type.
        message = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        typer.echo(f"medvl: error: {message} (--debug shows the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
