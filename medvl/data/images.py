"""Reading an image a user hands us (a path or bytes) into an RGB PIL image, with limits."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

# Decompression bombs: refuse images above this many pixels before decoding them.
MAX_PIXELS = 64_000_000


def load_image(source: str | Path | bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """PNG or JPEG (any format PIL reads) from a path or bytes, as RGB.
    Raises ValueError naming the source and the problem."""
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels:
                raise ValueError(f"{name}: image is {im.width}x{im.height}, above the {max_pixels}-pixel limit")
            im.load()
            return im.convert("RGB")
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{name}: not a readable image ({e})") from e
