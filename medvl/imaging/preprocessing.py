"""The preprocessing description: everything that decides how a medical file becomes uint8 pixels.

Curation builds one from each dataset card and stores it with every record; every checkpoint carries
one (`preprocessing.json` next to its weights); serving, chat and evaluation read DICOM files with the
checkpoint's. The same file through the same description gives the same pixels, byte for byte, so a
model is served the pixels it was trained on.

What is fixed rather than described: colour images keep their colours (brought to 8 bits by their
bit depth), MONOCHROME1 is inverted so that high values are bright, a volume is read in LPS orientation
and resampled in-plane to square pixels (the finer spacing, bilinear) before `max_side` applies.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medvl.vocab import BODY_REGIONS

from .windows import CT_WINDOWS, FALLBACK_WINDOW, WINDOW_BY_REGION


class Preprocessing(BaseModel):
    """File -> uint8 pixels. The defaults are the curation defaults (a card that sets none of these
    gets exactly this), so a model built without a card is served as curated data is rendered."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # CT: "auto" picks the window by body region (WINDOW_BY_REGION, FALLBACK_WINDOW when the region is
    # unknown), or a name of CT_WINDOWS, or (centre, width) in HU. Not the file's own window centre/width:
    # those vary by vendor and by what was last looked at on the console, so the same anatomy would reach
    # the model in different contrasts; a window by anatomy is what the curated training data uses.
    ct_window: str | tuple[float, float] = "auto"
    # The region when a file names none (DICOM BodyPartExamined, a volume's folder): a card's `body_region`.
    default_region: str | None = None
    # Source spellings of body regions -> BODY_REGIONS (a card's `body_region_map`), for "auto".
    region_map: dict[str, str] = {}
    # MR, PET, X-ray and every other greyscale without an absolute scale: this percentile range of the
    # values maps onto 0-255. 0.5-99.5 keeps a few hot voxels (vessels, artefacts) from darkening the
    # rest. Scope "volume": one range for the whole file (all frames of a DICOM, the whole NIfTI), so
    # slices of one scan keep their relative brightness and the frame served is the frame curated;
    # "frame": a range per 2D plane.
    percentiles: tuple[float, float] = (0.5, 99.5)
    percentile_scope: Literal["volume", "frame"] = "volume"
    # Long side after square-pixel resampling of DICOM and volume slices (a card's `max_side`); plain
    # PNG/JPEG images are not resized by this (the model's processor does that).
    max_side: int = Field(1024, ge=16)

    @field_validator("ct_window")
    @classmethod
    def _window(cls, v: str | tuple[float, float]) -> str | tuple[float, float]:
        if isinstance(v, str) and v != "auto" and v not in CT_WINDOWS:
            raise ValueError(
                f"unknown CT window {v!r}; expected auto, {', '.join(CT_WINDOWS)} or [centre, width]"
            )
        if not isinstance(v, str) and v[1] <= 0:
            raise ValueError(f"CT window width must be positive, got {v[1]}")
        return v

    @field_validator("default_region")
    @classmethod
    def _region(cls, v: str | None) -> str | None:
        return v if v is None else _check_region(v)

    @field_validator("region_map")
    @classmethod
    def _regions(cls, v: dict[str, str]) -> dict[str, str]:
        return {k: _check_region(r) for k, r in v.items()}

    @model_validator(mode="after")
    def _percentiles(self) -> Preprocessing:
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {list(self.percentiles)}")
        return self

    def region(self, file_region: str | None) -> str | None:
        """The body region a file is windowed for: its own (or the default), mapped onto BODY_REGIONS."""
        r = file_region or self.default_region
        return self.region_map.get(r, r) if r else None

    def window_for(self, file_region: str | None) -> tuple[str | tuple[float, float], tuple[float, float]]:
        """(what to record: a window name or the given pair, (centre, width) in HU)."""
        if not isinstance(self.ct_window, str):
            return self.ct_window, self.ct_window
        name = self.ct_window
        if name == "auto":
            name = WINDOW_BY_REGION.get(self.region(file_region) or "", FALLBACK_WINDOW)
        return name, CT_WINDOWS[name]


def _check_region(v: str) -> str:
    if v not in BODY_REGIONS:
        raise ValueError(f"unknown body region {v!r}; expected one of {', '.join(BODY_REGIONS)}")
    return v


DEFAULT_PREPROCESSING = Preprocessing()
