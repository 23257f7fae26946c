"""Reading an image file (a path or bytes) into pixels, with limits. The one entry point of inference
(`read_image`: serve, web UI, chat, evaluation, training's reads of its image files) and the 2D reader
curation builds on (`open_image`).

Given the side the model sees (`size`), a large image is brought down towards it while it is read:
JPEG decodes at 1/2, 1/4 or 1/8 scale (DCT scaling, a proper low-pass) never below 1.5 x `size`, and
any image is then box-averaged by a whole factor never below 2 x `size` (`reduce_for_size`; the
processor's antialiased resize still does the last factor). The processor then has far fewer pixels to
resample: 1024 px SLAKE scans read and resized for a 224/336 px tower 2.0-2.2x faster, pixel values
0.002 from the full read's on average (benchmarks/image_read.py; tests/test_images.py).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from medvl.errors import InputError

from .dicom import read_dicom
from .display import reduce_for_size, to_display
from .files import MAX_BYTES, MAX_PIXELS, check_size, is_dicom, read_bytes
from .preprocessing import DEFAULT_PREPROCESSING, Preprocessing


def open_image(
    source: str | Path | bytes,
    name: str,
    *,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int | None = MAX_BYTES,
    formats: tuple[str, ...] | None = None,
    field: str = "image",
    draft: int | None = None,
) -> Image.Image:
    """Open and fully decode an image PIL reads (only `formats`, e.g. ("PNG", "JPEG"), when given),
    refusing empty, truncated, corrupt or oversized files. `draft`: the model's side; a JPEG is then
    decoded at the smallest DCT scale still >= 1.5 x `draft`. A path stays open for multi-frame seeks."""
    check_size(source, name, max_bytes)
    fp = io.BytesIO(source) if isinstance(source, bytes) else Path(source)
    # Pillow warns from the header above its own limit (89 Mpx); the check below is the limit here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(fp, formats=formats)
        except UnidentifiedImageError:
            kinds = ", ".join(formats) if formats else "a format PIL reads"
            raise InputError(name, field, f"not a readable image (expected DICOM or {kinds})") from None
        except Image.DecompressionBombError:  # above twice Pillow's own limit: refused from the header
            raise InputError(name, field, f"image above the {max_pixels}-pixel limit") from None
        except Exception as e:  # Pillow raises several types for unreadable headers
            raise InputError(name, field, f"not a readable image ({type(e).__name__})") from None
    w, h = im.size
    if w * h > max_pixels:
        raise InputError(name, field, f"image is {w}x{h}, above the {max_pixels}-pixel limit")
    if w == 0 or h == 0:
        raise InputError(name, field, f"zero-sized image {w}x{h}")
    if draft and im.format == "JPEG":
        side = draft * 3 // 2  # measured: 1/6 of the pixel error of a draft to `draft` itself
        im.draft("RGB", (side, side))  # the smallest DCT scale (1/2, 1/4, 1/8) still >= side
    try:
        im.load()
    except Exception as e:  # "image file is truncated", broken streams, bad CRCs
        raise InputError(name, field, f"corrupt or truncated image data ({type(e).__name__}: {e})") from None
    return im


def read_image(
    source: str | Path | bytes,
    preprocessing: Preprocessing = DEFAULT_PREPROCESSING,
    *,
    size: int | None = None,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_BYTES,
    formats: tuple[str, ...] | None = None,
    name: str | None = None,
) -> Image.Image:
    """An RGB image from a path or bytes: DICOM (detected by its `DICM` magic; rendered with
    `preprocessing`, the middle frame of a multi-frame file) or any format PIL reads (only `formats`
    when given: the server narrows what untrusted bytes may exercise). With `size` (the model's input
    side) a large image comes back reduced, its shorter side still >= `size`. Bad input raises
    InputError naming `name` (default: the path, or "<bytes>")."""
    name = name or ("<bytes>" if isinstance(source, bytes) else str(source))
    data = read_bytes(source, name, max_bytes)
    if is_dicom(data):
        dcm = read_dicom(data, name, max_pixels=max_pixels, max_bytes=max_bytes)
        (px,), _ = dcm.render([dcm.frames // 2], preprocessing)
        return reduce_for_size(Image.fromarray(px).convert("RGB"), size)
    im = open_image(data, name, max_pixels=max_pixels, max_bytes=max_bytes, formats=formats, draft=size)
    # 16/32-bit greyscale has no display range of its own: the percentile range, as curation maps it.
    # Every other mode converts to RGB exactly as curation's greyscale/colour split would.
    if im.mode.startswith("I") or im.mode == "F":
        im = Image.fromarray(to_display(im, preprocessing))
    return reduce_for_size(im.convert("RGB"), size)
