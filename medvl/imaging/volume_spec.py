"""The volume preprocessing description: one serialisable spec (`VolumeSpec`) that turns a 3D scan into
the array a model sees. Curation stores the spec with every volume record next to the array it made;
training, evaluation and serving call the same `VolumeSpec.apply`, so a volume is served as it was
curated.

`apply`, in order:

1. Reorient to LPS (`to_lps`, the orientation of every 2D slice medvl writes). Array axes are then
   [S, P, L]: slice 0 is the most inferior, row 0 the most anterior, column 0 the patient's right, so
   an axial slice `a[k]` is in the radiological view of the 2D records.
2. Foreground crop (`crop_foreground`): the box around the voxels above a threshold (CT: `foreground_hu`
   HU, which leaves air out; otherwise `foreground_fraction` of the way up the percentile range).
3. Resample to `spacing` over the same extent (first voxel centre kept): linear for the image, nearest
   neighbour for labels.
4. Intensities -> uint8 channels. CT (HU): one channel per window of `windows` (names of
   `medvl.imaging.CT_WINDOWS` or [centre, width]) and one for `hu_range` [low, high], through the same
   `window` function as the 2D slices. Anything else (MR, PET): one channel, the `percentiles` range of
   the reoriented volume (taken, as for the 2D slices, over every (n // 16)-th of its n axial slices)
   mapped onto 0-255.
5. Fixed size: each axis centre-cropped (the surplus split evenly, the odd voxel off the end) or
   padded with 0 (the window's bottom: air for CT, background for MR) to `size`.

`spacing` and `size` are in array order [S, P, L] = (slice, row, column), like the stored array
(channels first: [C, S, P, L]).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medvl.errors import InputError

from .display import percentile_range, reference_planes, scale
from .volume import THREADS, check_same_grid, orientation_code, to_lps
from .windows import CT_WINDOWS, window

Window = str | tuple[float, float]


class VolumeSpec(BaseModel):
    """Scan -> uint8 [C, S, P, L] array (module docstring). Frozen and JSON-serialisable: a curated
    volume record stores `model_dump_json()`, readers rebuild it with `model_validate_json`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    orientation: str = Field("LPS", pattern="^LPS$")  # fixed; stated so a stored spec says it
    spacing: tuple[float, float, float]  # mm, [S, P, L] order
    size: tuple[int, int, int]  # voxels, [S, P, L] order
    windows: tuple[Window, ...] = ()  # CT: a channel each
    hu_range: tuple[float, float] | None = None  # CT: one more channel, [low, high] HU -> 0-255
    percentiles: tuple[float, float] = (0.5, 99.5)  # other modalities: range of the whole volume
    crop_foreground: bool = False
    foreground_hu: float = -500.0  # CT: above it is body (air is about -1000 HU, fat -100)
    foreground_fraction: float = Field(0.1, ge=0, lt=1)  # others: of the percentile range

    @field_validator("spacing")
    @classmethod
    def _spacing(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) <= 0:
            raise ValueError(f"spacing must be positive, got {list(v)}")
        return v

    @field_validator("size")
    @classmethod
    def _size(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if min(v) < 1 or int(np.prod(v)) > 512**3:
            raise ValueError(f"size must be positive and at most 512^3 voxels, got {list(v)}")
        return v

    @field_validator("windows")
    @classmethod
    def _windows(cls, v: tuple[Window, ...]) -> tuple[Window, ...]:
        for w in v:
            if isinstance(w, str) and w not in CT_WINDOWS:
                raise ValueError(f"unknown CT window {w!r}; expected one of {', '.join(CT_WINDOWS)}")
            if not isinstance(w, str) and w[1] <= 0:
                raise ValueError(f"CT window width must be positive, got {w[1]}")
        return v

    @model_validator(mode="after")
    def _ranges(self) -> VolumeSpec:
        if self.hu_range is not None and self.hu_range[0] >= self.hu_range[1]:
            raise ValueError(f"hu_range must be [low, high] with low < high, got {list(self.hu_range)}")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {list(self.percentiles)}")
        return self

    @property
    def hu(self) -> bool:
        """Whether the input is read as Hounsfield units (a CT spec): it names windows or a HU range."""
        return bool(self.windows) or self.hu_range is not None

    def channels(self) -> list[str]:
        """A name per output channel: the window's name, "[centre, width]", "hu [low, high]", or
        "percentile [low, high]"."""
        if not self.hu:
            return [f"percentile {list(self.percentiles)}"]
        names = [w if isinstance(w, str) else str(list(w)) for w in self.windows]
        return names + ([f"hu {list(self.hu_range)}"] if self.hu_range is not None else [])

    def check_modality(self, modality: str, name: str) -> None:
        """A HU spec reads CT only, a percentile spec anything but CT (whose HU would lose their meaning)."""
        if self.hu != (modality == "CT"):
            want = "windows or hu_range (HU)" if modality == "CT" else "no windows or hu_range (not HU)"
            raise InputError(name, "volume", f"a {modality or 'unknown'} volume needs a spec with {want}")

    def apply(self, img, labels=None, name: str = "volume") -> PreparedVolume:
        """A scalar 3D SimpleITK image (as `read_volume` / `read_dicom_series` give it), and optionally a
        label volume on the same grid -> the array a model sees, and the labels on its grid."""
        import SimpleITK as sitk

        source = {
            "size": [int(n) for n in img.GetSize()],
            "spacing_mm": [round(float(s), 6) for s in img.GetSpacing()],
            "orientation": orientation_code(img),
        }
        img = to_lps(img)
        if labels is not None:
            labels = to_lps(labels)
            check_same_grid(img, labels, name)
        values = sitk.GetArrayViewFromImage(img)  # [S, P, L]
        if self.hu:
            rng, threshold = None, self.foreground_hu
        else:
            # The 2D slices' rule (`reference_planes`): every (n // 16)-th slice sets the range.
            rng = percentile_range(values[reference_planes(len(values))], self.percentiles)
            threshold = float(rng[0] + self.foreground_fraction * (rng[1] - rng[0]))
        if self.crop_foreground:
            box = _box(values > threshold)
            if box is not None:  # nothing above the threshold: the whole volume
                (z0, y0, x0), (z1, y1, x1) = box
                img = img[x0:x1, y0:y1, z0:z1]
                labels = None if labels is None else labels[x0:x1, y0:y1, z0:z1]
        fill = float(np.min(values))
        target = tuple(float(s) for s in self.spacing[::-1])  # SimpleITK's (x, y, z) = (L, P, S)
        img = _resample(img, target, sitk.sitkLinear, fill, sitk.sitkFloat32)
        if labels is not None:
            labels = _resample(labels, target, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
        hu = sitk.GetArrayViewFromImage(img)
        if self.hu:
            wins = [CT_WINDOWS[w] if isinstance(w, str) else w for w in self.windows]
            if self.hu_range is not None:
                lo, hi = self.hu_range
                wins.append(((lo + hi) / 2, hi - lo))
            chans = [window(hu, c, w) for c, w in wins]
        else:
            chans = [scale(hu, *rng)]
        shift = [_fit(n, want) for n, want in zip(hu.shape, self.size, strict=True)]
        array = np.stack([_place(c, shift, self.size) for c in chans])
        lab = None if labels is None else _place(sitk.GetArrayFromImage(labels), shift, self.size)
        # The stored array's voxel [0, 0, 0] in LPS mm: the resampled grid's, moved by the crop / pad.
        corner = img.TransformContinuousIndexToPhysicalPoint([float(a - p) for a, p in shift[::-1]])
        return PreparedVolume(array, lab, source, [round(float(o), 4) for o in corner])


@dataclass(frozen=True)
class PreparedVolume:
    array: np.ndarray  # uint8 [C, S, P, L]
    labels: np.ndarray | None  # [S, P, L], on the array's grid
    source: dict  # the input's own size, spacing (its axis order, as nibabel / SimpleITK say) and orientation
    origin_mm: list[float]  # LPS (x, y, z) position of voxel [0, 0, 0]'s centre


def label_boxes(labels: np.ndarray, names: dict[int, str]) -> tuple[list[dict], dict[str, list[int]]]:
    """A [S, P, L] label array -> one box per connected component (26-connected) per named value, in
    voxel indices of the array, maxima exclusive: `label, z_min, y_min, x_min, z_max, y_max, x_max`
    (z: slice, y: row, x: column); and per label the slice range [first, last + 1) holding it."""
    from scipy import ndimage

    boxes, slices = [], {}
    for value in np.unique(labels[labels != 0]):
        if int(value) not in names:
            continue
        label = names[int(value)]
        components, _ = ndimage.label(labels == value, structure=np.ones((3, 3, 3), bool))
        for sz, sy, sx in ndimage.find_objects(components):
            boxes.append(
                dict(
                    label=label,
                    z_min=sz.start,
                    y_min=sy.start,
                    x_min=sx.start,
                    z_max=sz.stop,
                    y_max=sy.stop,
                    x_max=sx.stop,
                )
            )
        zs = np.nonzero((labels == value).any(axis=(1, 2)))[0]
        lo, hi = slices.get(label, (int(zs[0]), int(zs[-1]) + 1))
        slices[label] = [min(lo, int(zs[0])), max(hi, int(zs[-1]) + 1)]
    return boxes, slices


def _box(mask: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    if not mask.any():
        return None
    lo, hi = [], []
    for axis in range(3):
        idx = np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        lo.append(int(idx[0]))
        hi.append(int(idx[-1]) + 1)
    return tuple(lo), tuple(hi)


def _resample(img, spacing_xyz: tuple[float, ...], interpolator, fill: float, pixel_type):
    """`img` on a grid of `spacing_xyz` covering the same extent, first voxel centre kept."""
    import SimpleITK as sitk

    size = [
        max(1, int(round(n * s / t)))
        for n, s, t in zip(img.GetSize(), img.GetSpacing(), spacing_xyz, strict=True)
    ]
    f = sitk.ResampleImageFilter()
    f.SetOutputSpacing(spacing_xyz)
    f.SetSize(size)
    f.SetOutputOrigin(img.GetOrigin())
    f.SetOutputDirection(img.GetDirection())
    f.SetInterpolator(interpolator)
    f.SetDefaultPixelValue(fill)
    f.SetOutputPixelType(pixel_type)
    f.SetNumberOfThreads(THREADS)
    return f.Execute(img)


def _fit(n: int, want: int) -> tuple[int, int]:
    """(first voxel kept, voxels padded before) to bring an axis of n voxels to `want`, centred."""
    return ((n - want) // 2, 0) if n >= want else (0, (want - n) // 2)


def _place(a: np.ndarray, shift: list[tuple[int, int]], size: tuple[int, int, int]) -> np.ndarray:
    out = np.zeros(size, a.dtype)
    src = tuple(
        slice(start, start + min(n, want)) for (start, _), n, want in zip(shift, a.shape, size, strict=True)
    )
    dst = tuple(
        slice(pad, pad + min(n, want)) for (_, pad), n, want in zip(shift, a.shape, size, strict=True)
    )
    out[dst] = a[src]
    return out
