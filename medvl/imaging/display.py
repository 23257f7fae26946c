"""Values -> uint8 display pixels, and the resampling every reader shares.

One rule for greyscale: CT through a window in HU (`windows.py`), everything else (MR, PET, X-ray,
16-bit images) through a percentile range (`Preprocessing.percentiles`) of the whole file or of each
plane (`percentile_scope`). MONOCHROME1 is inverted afterwards, so high values are bright everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .preprocessing import DEFAULT_PREPROCESSING, Preprocessing
from .windows import window


def reference_planes(n: int) -> range:
    """The planes of an n-plane volume whose values set its percentile range: every (n // 16)-th, i.e.
    16 to 31 planes of a long scan, all of a short one. Percentiles of a sample that spans the whole
    volume; reading every plane of a 500-slice scan only to sort its voxels would cost 30x more."""
    return range(0, n, max(1, n // 16))


def percentile_range(values: np.ndarray, percentiles: tuple[float, float]) -> tuple[np.float64, np.float64]:
    """The two percentiles of `values` (taken as float32). Kept as NumPy float64 scalars: the scaling
    below then runs in float64, as it always has, so curated pixels do not move by a grey level."""
    a, b = np.percentile(np.asarray(values, dtype=np.float32), percentiles)
    return a, b


def scale(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """Linear map of [a, b] onto 0-255, clipped, rounded to nearest; all zeros for a flat range."""
    if b <= a:
        return np.zeros(x.shape, np.uint8)
    return (np.clip((x.astype(np.float32) - a) / (b - a), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def normalise_percentile(
    x: np.ndarray, percentiles: tuple[float, float] = DEFAULT_PREPROCESSING.percentiles
) -> np.ndarray:
    """One plane through its own percentile range."""
    return scale(x, *percentile_range(x, percentiles))


@dataclass(frozen=True)
class Display:
    """How the greyscale planes of one file become uint8: the same mapping for all of them."""

    window: tuple[float, float] | None = None  # CT: (centre, width) in HU
    range: tuple[float, float] | None = None  # otherwise: the file's percentile values (scope "volume")
    percentiles: tuple[float, float] = DEFAULT_PREPROCESSING.percentiles  # scope "frame": per plane
    invert: bool = False  # MONOCHROME1: low values are white

    def __call__(self, plane: np.ndarray) -> np.ndarray:
        if self.window is not None:
            px = window(plane, *self.window)
        elif self.range is not None:
            px = scale(plane, *self.range)
        else:
            px = normalise_percentile(plane, self.percentiles)
        return 255 - px if self.invert else px


def make_display(
    prep: Preprocessing,
    modality: str,
    region: str | None,
    planes: Sequence[np.ndarray],
    invert: bool = False,
) -> tuple[Display, dict]:
    """The display of the greyscale `planes` of one file (a [plane, row, col] array or a sequence that
    decodes them on access) of `modality` ("CT" is windowed; DICOM codes and the vocabulary spell it
    alike) showing body `region` (the file's own spelling; `prep` maps it). Also returns what to
    record about it: {"ct_window": name or [centre, width]} for CT, else {}."""
    if modality == "CT":
        shown, (centre, width) = prep.window_for(region)
        return Display(window=(centre, width), invert=invert), {
            "ct_window": shown if isinstance(shown, str) else list(shown)
        }
    if prep.percentile_scope == "volume":
        reference = np.stack([planes[i] for i in reference_planes(len(planes))])
        return Display(range=percentile_range(reference, prep.percentiles), invert=invert), {}
    return Display(percentiles=prep.percentiles, invert=invert), {}


def to_display(im: Image.Image, prep: Preprocessing = DEFAULT_PREPROCESSING) -> np.ndarray:
    """A decoded PIL image -> uint8: greyscale stays (H, W), anything with colour becomes (H, W, 3).
    16/32-bit greyscale has no fixed display range: it goes through the percentile range."""
    if im.mode.startswith("I") or im.mode == "F":
        return normalise_percentile(np.asarray(im, dtype=np.float32), prep.percentiles)
    if im.mode in ("1", "L", "LA") or (im.mode == "P" and _palette_is_grey(im)):
        return np.asarray(im.convert("L"))
    arr = np.asarray(im.convert("RGB"))
    if (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all():
        return np.ascontiguousarray(arr[..., 0])  # SLAKE stores grey X-rays and CTs as RGB JPEGs
    return arr


def _palette_is_grey(im: Image.Image) -> bool:
    pal = np.asarray(im.getpalette() or [], dtype=np.uint8).reshape(-1, 3)
    return bool(len(pal)) and bool((pal[:, 0] == pal[:, 1]).all() and (pal[:, 1] == pal[:, 2]).all())


def resize_spacing(
    img: np.ndarray, spacing_yx: tuple[float, float], max_side: int, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resample to square pixels (the finer of the two spacings), then shrink so the long side is at
    most `max_side`. Labels use nearest neighbour so that label values survive."""
    h, w = img.shape[:2]
    sy, sx = spacing_yx
    s = min(sy, sx)
    nh, nw = h * sy / s, w * sx / s
    factor = min(1.0, max_side / max(nh, nw))
    size = (max(1, round(nw * factor)), max(1, round(nh * factor)))
    if size == (w, h):
        return img, labels
    out = np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR))
    if labels is not None:
        labels = np.asarray(Image.fromarray(labels).resize(size, Image.NEAREST))
    return out, labels


def reduce_for_size(im: Image.Image, size: int | None) -> Image.Image:
    """Box-average by the largest whole factor that keeps the shorter side >= 2 x `size` (the model's
    input side): a box filter alone blurs and shifts detail when it lands close to the final size
    (measured: 4x the error of a factor-2 gap), so the processor's antialiased resize keeps at least a
    factor of two to do. None: unchanged."""
    factor = min(im.size) // (2 * size) if size else 1
    return im.reduce(factor) if factor >= 2 else im
