"""The one `medvl` command. Each subcommand lives beside its stage (medvl/<stage>/cli.py) and
imports its heavy dependencies inside the function, so that `medvl --help` stays instant."""

from __future__ import annotations

import typer

from medvl.curate.cli import curate
from medvl.eval.cli import eval_cmd
from medvl.generate.cli import generate
from medvl.model.cli import build, chat
from medvl.quality.cli import quality
from medvl.quickstart import quickstart
from medvl.serve.cli import serve, ui
from medvl.synth.cli import synth
from medvl.train.cli import pipeline, train

app = typer.Typer(
    help="medvl: labelled medical images in; instruction data, a trained LLaVA-style model, "
    "benchmark tables and a served model out. Pipeline order: curate -> generate -> quality -> "
    "build -> train (stages I-III, or `pipeline`) -> eval -> serve / ui / chat. "
    "Research use only; not for diagnosis.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

app.command("synth", rich_help_panel="1. Data")(synth)
app.command("curate", rich_help_panel="1. Data")(curate)
app.command("generate", rich_help_panel="1. Data")(generate)
app.command("quality", rich_help_panel="1. Data")(quality)
app.command("build", rich_help_panel="2. Model")(build)
app.command("train", rich_help_panel="2. Model")(train)
app.command("pipeline", rich_help_panel="2. Model")(pipeline)
app.command("eval", rich_help_panel="3. Evaluate and use")(eval_cmd)
app.command("chat", rich_help_panel="3. Evaluate and use")(chat)
app.command("serve", rich_help_panel="3. Evaluate and use")(serve)
app.command("ui", rich_help_panel="3. Evaluate and use")(ui)
app.command("quickstart", rich_help_panel="0. Start here")(quickstart)

if __name__ == "__main__":
    app()
