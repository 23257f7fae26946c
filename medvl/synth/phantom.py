"""3D CT phantoms in Hounsfield units with label volumes (displayed through medvl.imaging's CT windows).

A phantom is a stack of axial slices ``[D, H, W]`` built from ellipsoids and elliptic cylinders, so it
is fast (each shape only touches its bounding box) and its label volume is exactly consistent with its
HU volume. The CT image generator slices it; the curation stage uses it as a synthetic 3D dataset.

Orientation follows the radiological convention: row 0 is anterior, column 0 is the patient's right.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Global label ids, shared by every region so that curated 3D data has one label vocabulary.
LABELS: dict[int, str] = {
    1: "lung",
    2: "heart",
    3: "aorta",
    4: "liver",
    5: "spleen",
    6: "kidney",
    7: "bone",
    8: "brain",
    9: "ventricle",
    10: "lesion",
}
LESION_LABEL = 10

# Typical attenuation of each tissue (HU); the phantom draws each structure within a few HU of these.
HU: dict[str, int] = {
    "air": -1000,
    "lung": -820,
    "fat": -100,
    "water": 0,
    "csf": 5,
    "white matter": 28,
    "grey matter": 38,
    "soft tissue": 40,
    "muscle": 45,
    "spleen": 50,
    "liver": 60,
    "blood (contrast)": 160,
    "hemorrhage": 70,
    "cancellous bone": 350,
    "cortical bone": 1000,
}

# Lesion kind per region: name shown to users, HU (hypo- or hyperdense relative to the host organ).
LESION_KINDS: dict[str, dict[str, int]] = {
    "chest": {"nodule": 35},
    "abdomen": {"cyst": 5, "mass": 125},
    "head": {"hemorrhage": 72},
}

# Field of view (mm) across the in-plane axes and slice thickness (mm).
_FOV_MM = {"chest": 400.0, "abdomen": 400.0, "head": 240.0}
_SLICE_MM = 5.0


@dataclass
class Phantom:
    """A labelled HU volume. ``labels`` uses :data:`LABELS` ids (0 = background / unlabelled tissue)."""

    region: str
    hu: np.ndarray  # int16 [D, H, W]
    labels: np.ndarray  # uint8 [D, H, W]
    label_names: dict[int, str]  # ids present in ``labels``
    spacing: tuple[float, float, float]  # (z, y, x) in mm
    lesion: str | None = None  # lesion kind, e.g. "nodule", or None
    lesion_center: tuple[float, float, float] | None = None  # voxel coordinates (z, y, x)
    lesion_radius_mm: float | None = None


class _Painter:
    """Paints shapes given in normalised coordinates (z, y, x in [0, 1]) into the HU and label volumes."""

    def __init__(self, shape: tuple[int, int, int]):
        self.shape = shape
        self.hu = np.full(shape, HU["air"], dtype=np.float32)
        self.labels = np.zeros(shape, dtype=np.uint8)

    def _box(self, center: tuple[float, float, float], radii: tuple[float, float, float]):
        """Slices of the bounding box of an ellipsoid, and its boolean mask inside that box."""
        grids = []
        slices = []
        for c, r, n in zip(center, radii, self.shape, strict=True):
            lo, hi = max(0, int(np.floor((c - r) * n))), min(n, int(np.ceil((c + r) * n)) + 1)
            slices.append(slice(lo, hi))
            grids.append(((np.arange(lo, hi, dtype=np.float32) + 0.5) / n - c) / max(r, 1e-6))
        gz, gy, gx = grids
        mask = gz[:, None, None] ** 2 + gy[None, :, None] ** 2 + gx[None, None, :] ** 2 <= 1.0
        return tuple(slices), mask

    def ellipsoid(self, center, radii, hu: float, label: int = 0) -> None:
        """Paint over whatever is there; label 0 marks unlabelled tissue (fat, muscle, gas, table)."""
        sl, m = self._box(center, radii)
        self.hu[sl][m] = hu
        self.labels[sl][m] = label

    def cylinder(self, cy: float, cx: float, ry: float, rx: float, hu: float, label: int = 0) -> None:
        """Elliptic cylinder along z (every slice)."""
        self.ellipsoid((0.5, cy, cx), (1e6, ry, rx), hu, label)


def make_phantom(
    region: str,
    shape: tuple[int, int, int] = (32, 128, 128),
    rng: np.random.Generator | None = None,
    lesion: bool = True,
    *,
    lesion_kind: str | None = None,
    lesion_center: tuple[float, float, float] | None = None,
    lesion_radius: float | None = None,
    noise_hu: float | None = None,
) -> Phantom:
    """Build a random phantom of ``region`` ("chest", "abdomen" or "head").

    ``lesion_center`` (normalised z, y, x) and ``lesion_radius`` (fraction of the in-plane field of view)
    pin the lesion; otherwise it is drawn at random inside the host organ. All random draws for anatomy
    and noise happen before any lesion draw, so the same rng state with ``lesion=False`` gives the
    identical volume minus the lesion (the image tests rely on this).
    """
    if region not in _FOV_MM:
        raise ValueError(f"unknown phantom region {region!r}; expected one of {', '.join(_FOV_MM)}")
    rng = rng if rng is not None else np.random.default_rng()
    d, h, w = shape
    p = _Painter(shape)

    def j(scale: float = 0.02) -> float:  # small positional / size jitter
        return float(rng.uniform(-scale, scale))

    def hj(value: float, scale: float = 5.0) -> float:  # tissue attenuation jitter
        return value + float(rng.uniform(-scale, scale))

    if region == "head":
        cy, cx = 0.5 + j(0.02), 0.5 + j(0.02)
        ry, rx = 0.42 + j(0.015), 0.35 + j(0.015)
        p.cylinder(cy, cx, ry + 0.025, rx + 0.025, hj(HU["soft tissue"]))  # scalp
        p.cylinder(cy, cx, ry, rx, hj(HU["cortical bone"], 60), 7)  # skull
        p.ellipsoid((0.5, cy, cx), (2.5, ry - 0.03, rx - 0.03), hj(HU["grey matter"], 3), 8)
        p.ellipsoid((0.5, cy, cx), (1.8, ry - 0.09, rx - 0.09), hj(HU["white matter"], 3), 8)
        vy = cy - 0.02 + j(0.01)
        for side in (-1, 1):
            p.ellipsoid((0.5, vy, cx + side * 0.045), (0.9, 0.11 + j(0.015), 0.03), hj(HU["csf"], 2), 9)
        host_label, host_box = 8, (cy, cx, ry - 0.06, rx - 0.06)
    else:
        cy, cx = 0.52 + j(0.02), 0.5 + j(0.02)
        ry, rx = 0.31 + j(0.015), 0.42 + j(0.015)
        p.cylinder(0.5 + ry + 0.07, 0.5, 0.06, 0.6, hj(-200))  # curved table top under the patient
        p.cylinder(0.5 + ry + 0.08, 0.5, 0.06, 0.6, HU["air"])
        p.cylinder(cy, cx, ry, rx, hj(HU["fat"], 10))  # subcutaneous fat
        p.cylinder(cy, cx, ry - 0.025, rx - 0.03, hj(HU["muscle"]))
        p.cylinder(cy, cx, ry - 0.055, rx - 0.06, hj(HU["fat"], 10))  # mediastinal / visceral fat
        if region == "chest":
            lr = (0.23 + j(0.015), 0.15 + j(0.01))
            for side in (-1, 1):
                p.ellipsoid((0.5, cy - 0.02, cx + side * 0.2), (0.9, *lr), hj(HU["lung"], 30), 1)
            p.ellipsoid((0.5, cy + 0.05, cx + 0.04), (0.7, 0.11 + j(0.01), 0.12 + j(0.01)), hj(45), 2)
            p.ellipsoid((0.5, cy + 0.1, cx - 0.02), (2.0, 0.025, 0.025), hj(HU["blood (contrast)"], 15), 3)
            p.cylinder(cy - ry + 0.04, cx, 0.015, 0.035, hj(600, 50), 7)  # sternum
            # ribs: small bony cross-sections along the chest wall, sparing the front and the back
            for t in np.linspace(0.0, 2 * np.pi, 16, endpoint=False):
                if abs(np.cos(t)) > 0.3:
                    y, x = cy + (ry - 0.04) * np.sin(t), cx + (rx - 0.045) * np.cos(t)
                    p.cylinder(float(y), float(x), 0.014, 0.014, hj(700, 60), 7)
            host_label = 1
            host_box = (cy - 0.02, cx, lr[0], 0.2 + lr[1])
        else:
            liver = (0.5, cy - 0.03 + j(0.01), cx - 0.14 + j(0.01))
            p.ellipsoid(liver, (1.2, 0.21, 0.21), hj(HU["liver"], 4), 4)
            p.ellipsoid((0.5, cy - 0.13, cx + 0.05), (1.0, 0.09, 0.17), hj(HU["liver"], 4), 4)  # left lobe
            p.ellipsoid((0.5, cy - 0.06, cx + 0.25), (0.9, 0.1, 0.07), hj(HU["spleen"], 4), 5)
            p.ellipsoid((0.5, cy - 0.02, cx + 0.1), (0.6, 0.07, 0.07), HU["air"])  # stomach gas
            for side in (-1, 1):
                p.ellipsoid((0.5, cy + 0.14, cx + side * 0.15), (0.7, 0.06, 0.045), hj(150, 15), 6)
            p.ellipsoid((0.5, cy + 0.11, cx + 0.03), (2.0, 0.025, 0.025), hj(HU["blood (contrast)"], 15), 3)
            host_label, host_box = 4, None
        # vertebral body: cancellous core with a cortical rim
        p.cylinder(cy + ry - 0.1, cx, 0.055, 0.05, hj(HU["cortical bone"], 80), 7)
        p.cylinder(cy + ry - 0.1, cx, 0.04, 0.035, hj(HU["cancellous bone"], 40), 7)

    # noise: drawn before any lesion so that lesion=False leaves everything else identical
    sigma = noise_hu if noise_hu is not None else (3.0 if region == "head" else 10.0)
    noise = rng.normal(0.0, sigma, size=shape).astype(np.float32)

    fov = _FOV_MM[region]
    spacing = (_SLICE_MM, fov / h, fov / w)
    name = center = radius_mm = None
    if lesion:
        kinds = LESION_KINDS[region]
        name = lesion_kind if lesion_kind is not None else str(rng.choice(sorted(kinds)))
        if lesion_radius is None:
            lesion_radius = float(rng.uniform(0.04, 0.1))
        if lesion_center is None:
            z = float(rng.uniform(0.35, 0.65))
            if host_box is None:  # abdomen: inside the right lobe of the liver
                host_box = (liver[1], liver[2], 0.08, 0.08)
            hy, hx, hry, hrx = host_box
            for _ in range(100):  # rejection-sample a centre inside the host organ
                y, x = hy + rng.uniform(-hry, hry), hx + rng.uniform(-hrx, hrx)
                iy, ix = min(int(y * h), h - 1), min(int(x * w), w - 1)
                if p.labels[int(z * d), iy, ix] == host_label:
                    break
            lesion_center = (z, float(y), float(x))
        rz = lesion_radius * fov / (_SLICE_MM * d)  # same radius in mm along z
        p.ellipsoid(lesion_center, (rz, lesion_radius, lesion_radius), float(kinds[name]), LESION_LABEL)
        center = (lesion_center[0] * d, lesion_center[1] * h, lesion_center[2] * w)
        radius_mm = lesion_radius * fov

    hu = np.clip(np.rint(p.hu + noise), -1024, 3071).astype(np.int16)
    present = {int(i): LABELS[int(i)] for i in np.unique(p.labels) if i}
    return Phantom(region, hu, p.labels, present, spacing, name, center, radius_mm)


# ---------------------------------------------------------------- cases with questions-worth lesions

# Lesion diameters (mm) drawn for each size grade of medvl.volume_facts (small, medium, large), well
# inside the grade after resampling; the organ a lesion grows in: lung, liver, brain.
DRAW_DIAMETER_MM = ((14.0, 18.0), (26.0, 31.0), (40.0, 46.0))
_HOST = {"chest": 1, "abdomen": 4, "head": 8}


def lesion_draw(
    p: Phantom, rng: np.random.Generator, diameters_mm: tuple[tuple[float, float], ...] = DRAW_DIAMETER_MM
) -> dict:
    """Where and how large a lesion goes in the lesion-free phantom `p` (keyword arguments of
    :func:`make_phantom`): a third of the slices, a side and a size grade drawn evenly, so that every
    answer the 3D questions ask about (medvl.volume_facts) occurs in training and benchmark phantoms
    alike; the centre a voxel of the host organ on that side (at least 8% of the width from the middle)
    on the third's middle slice. make_phantom's own draw (large, central, in the right liver lobe) would
    teach a model one answer per question."""
    d, h, w = p.labels.shape
    third, side, grade = int(rng.integers(3)), int(rng.integers(2)), int(rng.integers(3))
    z = (third + 0.5) / 3 + float(rng.uniform(-0.04, 0.04))
    ys, xs = np.nonzero(p.labels[min(d - 1, int(z * d))] == _HOST[p.region])
    if len(xs) == 0:  # a very short volume whose host organ misses that slice: the middle slice
        z = 0.5
        ys, xs = np.nonzero(p.labels[d // 2] == _HOST[p.region])
    offset = xs + 0.5 - w / 2  # LPS: positive towards the patient's left
    pick = np.nonzero((np.abs(offset) >= 0.08 * w) & ((offset > 0) if side else (offset < 0)))[0]
    if len(pick) == 0:  # no host voxel there (the liver barely crosses the midline): anywhere in it
        pick = np.arange(len(xs))
    k = int(rng.choice(pick))
    fov_mm = p.spacing[2] * w  # the radius is a fraction of the in-plane field of view
    radius = float(rng.uniform(*diameters_mm[grade])) / 2 / fov_mm
    kind = str(rng.choice(sorted(LESION_KINDS[p.region])))
    centre = (z, (ys[k] + 0.5) / h, (xs[k] + 0.5) / w)
    return dict(lesion_kind=kind, lesion_center=centre, lesion_radius=radius)


def case_phantom(
    region: str,
    lesion: bool,
    seed: tuple[int, ...],
    shape: tuple[int, int, int] = (32, 128, 128),
    diameters_mm: tuple[tuple[float, float], ...] = DRAW_DIAMETER_MM,
) -> Phantom:
    """One synthetic 3D case, reproducible from `seed`: the anatomy drawn from it, and with `lesion` the
    same anatomy again with a lesion placed by :func:`lesion_draw` (from `(*seed, 1)`, its size grade's
    diameter from `diameters_mm`)."""
    p = make_phantom(region, shape, np.random.default_rng(seed), lesion=False)
    if lesion:
        draw = lesion_draw(p, np.random.default_rng([*seed, 1]), diameters_mm)
        p = make_phantom(region, shape, np.random.default_rng(seed), lesion=True, **draw)
    return p
