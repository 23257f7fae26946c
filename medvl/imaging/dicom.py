"""DICOM files -> pixels: the modality LUT (rescale slope/intercept -> e.g. HU), MONOCHROME1, palette
and colour photometric interpretations, multi-frame files, pixel spacing.

pydicom's warnings are silenced while a file is read and decoded: they may quote header values, which
can identify a patient, and error messages here name the problem, never a header value.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medvl.errors import InputError

from .display import make_display, resize_spacing, scale
from .files import MAX_BYTES, MAX_PIXELS, read_bytes
from .preprocessing import Preprocessing
from .windows import body_part_region

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass
class DicomFile:
    """One DICOM file, header read and checked; frames are decoded when asked for."""

    ds: Any = field(repr=False)  # the pydicom Dataset, pixels included; never printed: it holds PHI
    name: str
    frames: int
    rows: int
    cols: int
    colour: bool  # RGB/YBR or palette colour: kept in colour
    modality: str  # the Modality tag ("" when absent)
    body_part: str | None  # BodyPartExamined as a BODY_REGIONS spelling where one matches
    spacing: tuple[float, float]  # (row, column) in mm; (1, 1) when the file does not say
    photometric: str
    max_decoded: int  # pixels all the frames decoded from the file may hold together
    _cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def plane(self, k: int) -> np.ndarray:
        """Frame k: greyscale as float32 modality values (HU for CT), colour as (H, W, 3) uint8."""
        if k in self._cache:
            return self._cache[k]
        if (len(self._cache) + 1) * self.rows * self.cols > self.max_decoded:
            raise InputError(
                self.name,
                "NumberOfFrames",
                f"showing it takes more than {len(self._cache)} frames of {self.cols}x{self.rows}, "
                f"above the {self.max_decoded}-pixel limit",
            )
        from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr = pixel_array(self.ds, index=k if self.frames > 1 else None)
                if self.photometric == "PALETTE COLOR":
                    arr = apply_color_lut(arr, self.ds)
                elif not self.colour:
                    arr = apply_modality_lut(arr, self.ds).astype(np.float32)
        except Exception as e:  # a missing codec, truncated pixel data, inconsistent header values
            ts = (
                self.ds.file_meta.get("TransferSyntaxUID", "?")
                if self.ds.get("file_meta") is not None
                else "?"
            )
            raise InputError(
                self.name, "PixelData", f"cannot decode ({type(e).__name__}; transfer syntax {ts})"
            ) from None
        want = (self.rows, self.cols, 3) if self.colour else (self.rows, self.cols)
        if arr.shape != want:
            raise InputError(self.name, "PixelData", f"unexpected pixel array shape {arr.shape}")
        if self.colour:
            arr = arr if arr.dtype == np.uint8 else scale(arr, 0, self._colour_top(arr))
        elif not np.isfinite(arr).all():
            raise InputError(self.name, "PixelData", "holds non-finite values (NaN or infinity)")
        self._cache[k] = arr
        return arr

    def _colour_top(self, arr: np.ndarray) -> float:
        """The largest value of a colour sample: palette LUT entries span their dtype, native colour its
        BitsStored."""
        if self.photometric == "PALETTE COLOR":
            return float(np.iinfo(arr.dtype).max)
        return float(2 ** int(self.ds.get("BitsStored", 8) or 8) - 1)

    def render(
        self,
        indices: Sequence[int],
        prep: Preprocessing,
        modality: str | None = None,
    ) -> tuple[list[np.ndarray], dict]:
        """Frames `indices` as display pixels, (H, W) or (H, W, 3) uint8, resampled to square pixels and
        at most `prep.max_side`; and what to record about the display (the CT window). `modality`
        overrides the file's (a dataset card's)."""
        info: dict = {}
        if self.colour:
            planes = [self.plane(k) for k in indices]
        else:
            frames = _Frames(self)
            display, info = make_display(
                prep,
                modality or self.modality,
                self.body_part,
                frames,
                invert=self.photometric == "MONOCHROME1",
            )
            planes = [display(frames[k]) for k in indices]
        return [resize_spacing(p, self.spacing, prep.max_side)[0] for p in planes], info


class _Frames(Sequence):
    """A file's frames, decoded on access (the percentile reference reads only some of them)."""

    def __init__(self, dcm: DicomFile) -> None:
        self.dcm = dcm

    def __len__(self) -> int:
        return self.dcm.frames

    def __getitem__(self, k: int) -> np.ndarray:
        return self.dcm.plane(k)


def read_dicom(
    source: str | Path | bytes,
    name: str,
    *,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int | None = MAX_BYTES,
) -> DicomFile:
    """Read and check a DICOM file's header (pixel data kept, not decoded). Refused: not DICOM,
    no pixel data, no image size, frames above `max_pixels`. A multi-frame file's percentile range
    reads up to 31 of its frames (`reference_planes`); the frames decoded from one file together must
    stay within 4 x `max_pixels` (memory: about 10 bytes a pixel while the range is taken), so a small
    compressed file cannot make a server decode gigabytes."""
    import pydicom

    data = read_bytes(source, name, max_bytes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as e:  # pydicom raises many types on malformed input; all mean "not DICOM"
        raise InputError(name, "file", f"not a readable DICOM file ({type(e).__name__})") from None
    if not any(k in ds for k in PIXEL_KEYWORDS):
        raise InputError(name, "PixelData", f"no image (SOP class {ds.get('SOPClassUID', '?')!s})")
    try:
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
    except (TypeError, ValueError):
        raise InputError(name, "Rows/Columns", "image size is not a number") from None
    if rows * cols == 0:
        raise InputError(name, "Rows/Columns", "no image (Rows/Columns missing or zero)")
    if rows * cols > max_pixels:
        raise InputError(name, "Rows/Columns", f"image is {cols}x{rows}, above the {max_pixels}-pixel limit")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    return DicomFile(
        ds,
        name,
        frames,
        rows,
        cols,
        colour=samples > 1 or photometric == "PALETTE COLOR",
        modality=str(ds.get("Modality", "") or ""),
        body_part=body_part_region(ds.get("BodyPartExamined")),
        spacing=_spacing(ds),
        photometric=photometric,
        max_decoded=4 * max_pixels,
    )


def _spacing(ds) -> tuple[float, float]:
    """(row, column) spacing in mm from PixelSpacing (or ImagerPixelSpacing for projection images);
    (1, 1) when absent, malformed or zero (some files carry 0.0)."""
    try:
        sy, sx = (float(s) for s in (ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing") or [1.0, 1.0]))
    except (TypeError, ValueError):
        return 1.0, 1.0
    return (sy, sx) if min(sy, sx) > 0 else (1.0, 1.0)
