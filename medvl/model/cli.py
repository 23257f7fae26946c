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
    corpus: Path = typer.Option(
        None,
        help="Text file (one text a line), or LLaVA-style JSON/JSONL samples (every turn a text), to train "
        "the tokenizer of a random-weights preset.",
    ),
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
            tokenizer = train_tokenizer(corpus_texts(corpus), spec.tokenizer_vocab_size)
        vlm = build_preset(preset, tokenizer=tokenizer)
    else:
        raise typer.BadParameter("give --preset, or --vision and --llm")
    vlm.save(out)
    n = sum(p.numel() for p in vlm.model.parameters())
    typer.echo(f"wrote {out} ({n / 1e6:.1f}M parameters)")


def corpus_texts(path: Path) -> list[str]:
    """A tokenizer corpus: a text file's lines, or the turns of LLaVA-style samples (.json / .jsonl, e.g.
    `medvl quality`'s kept.jsonl or a `medvl mix` output), the image token left out."""
    if path.suffix not in (".json", ".jsonl"):
        return path.read_text(encoding="utf-8").splitlines()
    from medvl.prompts import IMAGE_TOKEN
    from medvl.records import read_rows

    return [
        turn["value"].replace(IMAGE_TOKEN, "").strip()
        for row in read_rows(path)
        for turn in row.get("conversations") or []
    ]


def convert_m3d_command(
    source: Path = typer.Argument(..., help="M3D checkpoint: a .safetensors file or a folder of them."),
    out: Path = typer.Option(..., help="Folder for the stock ViViT encoder (weights, config, processor)."),
    image_size: tuple[int, int, int] = typer.Option(
        (32, 256, 256), help="Volume size D H W it was trained at."
    ),
    patch_size: tuple[int, int, int] = typer.Option((4, 16, 16), help="Patch size along D H W."),
    in_channels: int = typer.Option(1, help="Input channels."),
    heads: int = typer.Option(12, help="Attention heads (not recorded in the weights)."),
) -> None:
    """M3D's 3D ViT (M3D-CLIP, M3D-LaMed) -> transformers' ViViT: the native 3D route's tower, to
    assemble with `medvl build --vision <out> --llm ...` (docs/3d.md)."""
    from medvl.model.convert import convert_m3d

    model = convert_m3d(
        source, out, image_size=image_size, patch_size=patch_size, in_channels=in_channels, num_heads=heads
    )
    n = sum(p.numel() for p in model.parameters())
    typer.echo(f"wrote {out} (ViViT, {model.config.num_hidden_layers} layers, {n / 1e6:.1f}M parameters)")
