"""Reading an image a user hands us (a path or bytes) into an RGB PIL image, with limits.

PNG, JPEG (any format PIL reads) and DICOM. A DICOM file is windowed the way a radiologist's viewer
opens it: the file's own window centre/width when it has one, else a default for its modality (a
soft-tissue window for CT, a 1st-99th percentile stretch for everything else), MONOCHROME1 inverted
so that bone is bright, the middle frame of a multi-frame series, colour ultrasound kept in colour.

Given the side the model sees (`size`), a large image is brought down towards it while it is read:
JPEG decodes at 1/2, 1/4 or 1/8 scale (DCT scaling, a proper low-pass) never below 1.5 x `size`,
and any image is then box-averaged by a whole factor never below 2 x `size` (PIL's `reducing_gap`
idea: the processor's antialiased resize still does the last factor). The processor then has far
fewer pixels to resample: 1024 px SLAKE scans read and resized for a 224/336 px tower 2.0-2.2x
faster, pixel values 0.002 from the full read's on average (benchmarks/image_read.py; tested in
tests/test_images.py).
Training, evaluation and serving all read images through here with the model's size, so they see
the same pixels.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Decompression bombs: refuse images above this many pixels before decoding them.
MAX_PIXELS = 64_000_000
# Refuse files above this many bytes before reading them into memory.
MAX_BYTES = 256 * 1024 * 1024
# (centre, width) in Hounsfield units: the soft-tissue window, for CT files that carry none.
CT_DEFAULT_WINDOW = (40.0, 400.0)


def load_image(
    source: str | Path | bytes,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_BYTES,
    formats: tuple[str, ...] | None = None,
    size: int | None = None,
) -> Image.Image:
    """An RGB image from a path or bytes: DICOM (detected by its `DICM` magic) or any format PIL
    reads (only `formats`, e.g. ("PNG", "JPEG"), when given: the server narrows what untrusted
    bytes may exercise). With `size` (the model's input side), a large image comes back reduced,
    its shorter side still >= `size` (see the module's docstring).
    Raises ValueError naming the source and the problem."""
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    n_bytes = len(source) if isinstance(source, bytes) else Path(source).stat().st_size
    if n_bytes > max_bytes:
        raise ValueError(f"{name}: {n_bytes} bytes, above the {max_bytes}-byte limit")
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if is_dicom(data):
        return _reduce(_load_dicom(data, name, max_pixels), size)
    try:
        with Image.open(io.BytesIO(data), formats=formats) as im:
            if im.width * im.height > max_pixels:
                raise ValueError(
                    f"{name}: image is {im.width}x{im.height}, above the {max_pixels}-pixel limit"
                )
            if size and im.format == "JPEG":
                side = size * 3 // 2  # measured: 1/6 of the pixel error of a draft to `size` itself
                im.draft("RGB", (side, side))  # the smallest DCT scale (1/2, 1/4, 1/8) still >= side
            im.load()
            return _reduce(im.convert("RGB"), size)
    except UnidentifiedImageError:
        kinds = ", ".join(formats) if formats else "a format PIL reads"
        raise ValueError(f"{name}: not a readable image (expected DICOM or {kinds})") from None
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{name}: not a readable image ({e})") from e


def _reduce(im: Image.Image, size: int | None) -> Image.Image:
    """Box-average by the largest whole factor that keeps the shorter side >= 2 x `size`: a box
    filter alone blurs and shifts detail when it lands close to the final size (measured: 4x the
    error of a factor-2 gap), so the processor's resize keeps at least a factor of two to do."""
    factor = min(im.size) // (2 * size) if size else 1
    return im.reduce(factor) if factor >= 2 else im


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: 128-byte preamble then `DICM`."""
    return data[128:132] == b"DICM"


def _load_dicom(data: bytes, name: str, max_pixels: int) -> Image.Image:
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception as e:  # pydicom raises many types on malformed input; all mean "not DICOM"
        raise ValueError(f"{name}: not a readable DICOM file ({e})") from e
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows * cols == 0:
        raise ValueError(f"{name}: DICOM file has no image (Rows/Columns missing)")
    # Only one frame is decoded, so the limit is on a frame's pixels.
    if rows * cols > max_pixels:
        raise ValueError(f"{name}: DICOM image is {cols}x{rows}, above the {max_pixels}-pixel limit")
    try:
        # Decode only the middle frame; colour is converted to RGB (YBR_* included) by pydicom.
        arr = pixel_array(io.BytesIO(data), index=frames // 2 if frames > 1 else None)
    except Exception as e:  # missing decoder plugin, truncated pixel data, bad header values
        raise ValueError(f"{name}: cannot decode DICOM pixel data ({type(e).__name__}: {e})") from e
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 3:  # colour (ultrasound, photographs): kept as is, only brought to 8 bits
        top = np.iinfo(arr.dtype).max if arr.dtype.kind in "ui" else 1.0
        return Image.fromarray(_to_uint8(arr.astype(np.float64), 0, top)).convert("RGB")
    values = apply_modality_lut(arr, ds).astype(np.float64)  # rescale slope/intercept -> e.g. HU
    window = _window(ds)
    if window is not None:
        centre, width = window
        lo, hi = centre - width / 2, centre + width / 2
    elif str(ds.get("Modality", "")) == "CT":
        centre, width = CT_DEFAULT_WINDOW
        lo, hi = centre - width / 2, centre + width / 2
    else:
        lo, hi = np.percentile(values, [1, 99])
    gray = _to_uint8(values, lo, hi)
    if photometric == "MONOCHROME1":  # low values are white in MONOCHROME1
        gray = 255 - gray
    return Image.fromarray(gray).convert("RGB")


def _window(ds) -> tuple[float, float] | None:
    """The file's window (centre, width), the first one when it lists several; None if absent."""
    from pydicom.multival import MultiValue

    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is None or width is None:
        return None
    centre = float(centre[0] if isinstance(centre, MultiValue) else centre)
    width = float(width[0] if isinstance(width, MultiValue) else width)
    return (centre, width) if width > 0 else None


def _to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear map of [lo, hi] onto 0-255, clipped."""
    scaled = (values - lo) / max(hi - lo, 1e-6) * 255.0
    return np.clip(scaled, 0, 255).astype(np.uint8)
