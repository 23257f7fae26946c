from __future__ import annotations

from pathlib import Path

import typer


def build(
    out: Path = typer.Option(..., help="Folder to write the model to (a plain Hugging Face folder)."),
    preset: str = typer.Option(
        None, help="A preset name (tiny, gmai-vl-7b, siglip-qwen2.5-1.5b) or YAML file."
    ),
    vision: str = typer.Option(None, help="Pretrained vision encoder: hub id or folder."),
    llm: str = typer.Option(None, help="Pretrained causal LM: hub id or folder."),
    corpus: Path = typer.Option(None, help="Text file to train the tokenizer of a random-weights preset."),
    vision_feature_layer: int = typer.Option(
        -2, help="With --vision/--llm: which vision layer feeds the projector."
    ),
    select_strategy: str = typer.Option(
        "default", help="With --vision/--llm: 'default' (drop CLS) or 'full'."
    ),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the Hub (read it first)."),
) -> None:
    """Build a model: from a preset, or from pretrained parts (--vision and --llm)."""
    from medvl.model.build import build_from_parts, build_preset, load_preset
    from medvl.model.tokenizer import train_tokenizer

    if vision or llm:
        if not (vision and llm):
            raise typer.BadParameter("--vision and --llm go together")
        vlm = build_from_parts(
            vision,
            llm,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=select_strategy,
            trust_remote_code=trust_remote_code,
        )
    elif preset:
        spec = load_preset(preset)
        tokenizer = None
        if spec.vision is None:
            if corpus is None:
                raise typer.BadParameter(f"preset {preset!r} trains its tokenizer: pass --corpus <text file>")
            lines = corpus.read_text(encoding="utf-8").splitlines()
            tokenizer = train_tokenizer(lines, spec.tokenizer_vocab_size)
        vlm = build_preset(preset, tokenizer=tokenizer)
    else:
        raise typer.BadParameter("give --preset, or --vision and --llm")
    vlm.save(out)
    n = sum(p.numel() for p in vlm.model.parameters())
    typer.echo(f"wrote {out} ({n / 1e6:.1f}M parameters)")


def chat(
    model: Path = typer.Option(..., help="Model folder."),
    image: Path = typer.Option(None, help="Image file: PNG, JPEG or DICOM."),
    question: str = typer.Option(None, "--question", "-q", help="Ask once and exit; otherwise interactive."),
    max_new_tokens: int = typer.Option(256),
) -> None:
    """Ask a model about an image in the terminal (multi-turn; empty line or Ctrl-D quits)."""
    from rich.console import Console

    from medvl import RESEARCH_ONLY
    from medvl.data.images import load_image
    from medvl.model.build import load
    from medvl.model.generate import Conversation, generate

    console = Console()
    vlm = load(model)
    img = load_image(image, size=vlm.model.config.vision_config.image_size) if image else None
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
