from __future__ import annotations

import os
from pathlib import Path

import typer

VOLUME_TOKENS_HELP = (
    "Image tokens a scan may take, which set its number of slabs (docs/3d.md). Default: the budget the "
    "model was trained with (its volumes.json; 4096 without one)."
)


def serve(
    model: Path = typer.Option(..., help="Model folder."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(8000),
    model_name: str = typer.Option(None, help="Name clients pass as `model` (default: the folder's name)."),
    api_key: str = typer.Option(
        None, envvar="MEDVL_API_KEY", help="Require 'Authorization: Bearer <key>' (or set MEDVL_API_KEY)."
    ),
    max_batch_size: int = typer.Option(16, help="Most requests decoded together in one batch."),
    max_queue: int = typer.Option(64, help="Requests waiting beyond this are refused with 429."),
    max_tokens: int = typer.Option(1024, help="Most new tokens a request may ask for."),
    max_request_mb: float = typer.Option(32.0, help="Largest request body, in MiB (413 above)."),
    max_image_mb: float = typer.Option(16.0, help="Largest image, in MiB (413 above)."),
    max_image_pixels: int = typer.Option(40_000_000, help="Largest image in pixels (decompression bombs)."),
    max_images: int = typer.Option(4, help="Most images in one request (a scan counts as one)."),
    max_volume_mb: float = typer.Option(
        32.0, help="Largest scan (NIfTI or zipped DICOM series), in MiB, compressed and unpacked (413 above)."
    ),
    volume_tokens: int = typer.Option(None, help=VOLUME_TOKENS_HELP),
    body_timeout: float = typer.Option(
        30.0, min=0.1, help="Seconds to wait for the next piece of a request body (408 after)."
    ),
    allow_url: list[str] = typer.Option(
        [], help="URL prefix images may be fetched from (repeatable; default: none, data: URLs only)."
    ),
    allow_dir: list[Path] = typer.Option(
        [], help="Folder whose files a request may name as file: URLs (repeatable; default: none)."
    ),
) -> None:
    """OpenAI-compatible API server (POST /v1/chat/completions, GET /v1/models) with dynamic batching."""
    import uvicorn

    from medvl import RESEARCH_ONLY
    from medvl.model.build import load
    from medvl.serve.api import ServeSettings, create_app

    settings = ServeSettings(
        model_name=model_name or model.resolve().name,
        api_key=api_key,
        max_request_bytes=int(max_request_mb * 2**20),
        max_image_bytes=int(max_image_mb * 2**20),
        max_image_pixels=max_image_pixels,
        max_images=max_images,
        max_volume_bytes=int(max_volume_mb * 2**20),
        volume_tokens=volume_tokens,
        max_tokens=max_tokens,
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        body_timeout_s=body_timeout,
        allow_url_prefixes=tuple(allow_url),
        allow_dirs=tuple(allow_dir),
    )
    app = create_app(load(model), settings)
    typer.echo(f"serving {settings.model_name!r} at http://{host}:{port}/v1 ({RESEARCH_ONLY})")
    uvicorn.run(app, host=host, port=port, log_level="info")


def ui(
    model: Path = typer.Option(..., help="Model folder."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(7860),
    max_new_tokens: int = typer.Option(256, help="Longest answer, in tokens."),
    max_volume_mb: float = typer.Option(32.0, help="Largest scan, in MiB, compressed and unpacked."),
    volume_tokens: int = typer.Option(None, help=VOLUME_TOKENS_HELP),
) -> None:
    """Web demo (Gradio): upload a PNG, JPEG or DICOM image, or a scan (NIfTI, zipped DICOM series), and
    chat about it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
    from medvl.model.build import load
    from medvl.serve.ui import launch

    app = launch(
        load(model),
        host=host,
        port=port,
        max_new_tokens=max_new_tokens,
        volume_tokens=volume_tokens,
        max_volume_bytes=int(max_volume_mb * 2**20),
    )
    typer.echo(f"web demo at http://{host}:{port}  (Ctrl-C stops it)")
    app.block_thread()
