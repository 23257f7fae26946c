"""`medvl chat`: a model in the terminal, the smallest of the serving front ends."""

from __future__ import annotations

from pathlib import Path

import typer

from medvl.serve.cli import VOLUME_TOKENS_HELP


def chat(
    model: Path = typer.Option(..., help="Model folder."),
    image: Path = typer.Option(
        None,
        help="Image file (PNG, JPEG or DICOM) or a scan: NIfTI (.nii, .nii.gz), a DICOM series as a folder "
        "or .zip (shown to the model as slabs, docs/3d.md).",
    ),
    question: str = typer.Option(None, "--question", "-q", help="Ask once and exit; otherwise interactive."),
    max_new_tokens: int = typer.Option(256),
    volume_tokens: int = typer.Option(None, help=VOLUME_TOKENS_HELP),
) -> None:
    """Ask a model about an image in the terminal (multi-turn; empty line or Ctrl-D quits)."""
    from rich.console import Console
    from transformers import AutoConfig

    from medvl import RESEARCH_ONLY
    from medvl.imaging import is_scan, read_image
    from medvl.model.build import load, load_preprocessing, load_volumes, native_frames
    from medvl.model.decode import Conversation, generate

    images = []
    if image is not None:
        # Read before the weights load, so that a bad file fails at once, not after a large model has
        # loaded (a ValueError naming the file, which `medvl` prints as one line); at the model's input
        # size, as eval and serve read images. A folder without a config is `load`'s to report.
        config = AutoConfig.from_pretrained(model) if (model / "config.json").is_file() else None
        if is_scan(image):
            if config is None:
                load(model)  # raises its own error
            # the model's spec for the scan's modality, as the server does
            scans = load_volumes(model).with_tokens(volume_tokens)
            frames = native_frames(config)
            slabs = scans.slabs(image, config.image_seq_length, frames=frames)
            # a native-route model reads the scan as one volume; the slices route as K images
            images = [slabs] if frames else slabs
        else:
            size = config.vision_config.image_size if config is not None else None
            images = [read_image(image, load_preprocessing(model), size=size)]
    vlm = load(model)
    console = Console()
    console.print(f"[dim]{RESEARCH_ONLY}[/dim]")
    conv = Conversation([], images)
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
        content: list[dict] = [{"type": "image"}] * len(images) if first else []
        content.append({"type": "text", "text": text})
        conv.messages.append({"role": "user", "content": content})
        first = False
        answer = generate(vlm, [conv], max_new_tokens=max_new_tokens)[0].text
        conv.messages.append({"role": "assistant", "content": answer})
        console.print(f"[bold green]medvl>[/bold green] {answer}")
        if question is not None:
            break
