"""`medvl chat`: a model in the terminal, the smallest of the serving front ends."""

from __future__ import annotations

from pathlib import Path

import typer


def chat(
    model: Path = typer.Option(..., help="Model folder."),
    image: Path = typer.Option(None, help="Image file: PNG, JPEG or DICOM."),
    question: str = typer.Option(None, "--question", "-q", help="Ask once and exit; otherwise interactive."),
    max_new_tokens: int = typer.Option(256),
) -> None:
    """Ask a model about an image in the terminal (multi-turn; empty line or Ctrl-D quits)."""
    from rich.console import Console
    from transformers import AutoConfig

    from medvl import RESEARCH_ONLY
    from medvl.imaging import read_image
    from medvl.model.build import load, load_preprocessing
    from medvl.model.decode import Conversation, generate

    img = None
    if image is not None:
        # Read before the weights load, so that a bad file fails at once, not after a large model has
        # loaded (a ValueError naming the file, which `medvl` prints as one line); at the model's input
        # size, as eval and serve read images. A folder without a config is `load`'s to report.
        has_config = (model / "config.json").is_file()
        size = AutoConfig.from_pretrained(model).vision_config.image_size if has_config else None
        img = read_image(image, load_preprocessing(model), size=size)
    vlm = load(model)
    console = Console()
    console.print(f"[dim]{RESEARCH_ONLY}[/dim]")
    conv = Conversation([], [img] if img else [])
    first = True
    while True:
        if question is not None:
            text = question
        else:
            try:
                text = console.input("[bold]you>[/bold] ").strip()
            except EOFError:
                break
            if not text:
                break
        content: list[dict] = [{"type": "image"}] if (first and img) else []
        content.append({"type": "text", "text": text})
        conv.messages.append({"role": "user", "content": content})
        first = False
        answer = generate(vlm, [conv], max_new_tokens=max_new_tokens)[0].text
        conv.messages.append({"role": "assistant", "content": answer})
        console.print(f"[bold green]medvl>[/bold green] {answer}")
        if question is not None:
            break
