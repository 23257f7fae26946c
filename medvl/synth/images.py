"""Procedural, labelled synthetic medical images (numpy + PIL), deterministic by seed.

Every label must be visible at 64x64 because a tiny CLIP is trained on these images and tested by a
multiple-choice benchmark: modalities have distinct global looks (grey radiographs filling the frame,
CT cross-sections on black with a table, MR with a bright scalp ring and grey/white matter, an orange
fundus disc, skin colour, pink/purple H&E); findings differ in shape, brightness or colour; grade is
lesion size (or, for fundus, spot count and spread); location is the image quadrant of the lesion.

Determinism: ``render(plan, seed)`` draws all background randomness from one stream and all lesion
randomness from another, so rendering the same seed with and without the finding changes only the
pixels of the lesion (``tests/test_synth.py`` checks that the bbox covers exactly those pixels).
Locations are image quadrants as displayed ("upper left" = top-left of the picture), not the patient's
sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from medvl.imaging import WINDOW_BY_REGION, ct_window
from medvl.synth.phantom import LESION_LABEL, make_phantom

QUADRANTS: tuple[str, ...] = ("upper left", "upper right", "lower left", "lower right")
NO_FINDING = "no finding"


@dataclass(frozen=True)
class RegionSpec:
    anatomy: str
    department: str  # from medvl.vocab.DEPARTMENTS
    findings: tuple[str, ...]
    quadrants: tuple[str, ...] = QUADRANTS  # where a lesion may be placed


# modality -> body region -> spec; modality and department names come from medvl.vocab.
SPECS: dict[str, dict[str, RegionSpec]] = {
    "X-ray": {
        "chest": RegionSpec("lung", "Pulmonary Medicine", ("nodule", "pleural effusion")),
        "hand": RegionSpec("hand", "Orthopedic Surgery", ("fracture",)),
    },
    "CT": {
        "chest": RegionSpec("lung", "Pulmonary Medicine", ("nodule",)),
        # the slice is at the liver dome: lesions sit in the right lobe or the left lobe (upper right)
        "abdomen": RegionSpec(
            "liver",
            "Gastroenterology and Hepatology",
            ("cyst", "mass"),
            ("upper left", "lower left", "upper right"),
        ),
        "head": RegionSpec("brain", "Neurosurgery", ("hemorrhage",)),
    },
    "MR": {
        "head": RegionSpec("brain", "Neurosurgery", ("tumor",)),
        "knee": RegionSpec("knee joint", "Orthopedic Surgery", ("bone marrow edema",)),
    },
    "Fundus photography": {
        "eye": RegionSpec("retina", "Ophthalmology", ("retinal hemorrhages", "hard exudates")),
    },
    "Dermoscopy": {"skin": RegionSpec("skin", "Dermatology", ("nevus", "melanoma"))},
    "Histopathology": {
        "colon": RegionSpec("colon mucosa", "Laboratory Medicine and Pathology", ("adenocarcinoma",)),
        "lymph node": RegionSpec("lymph node", "Laboratory Medicine and Pathology", ("metastasis",)),
    },
}
# Pleural effusion collects at the lung bases.
FINDING_QUADRANTS: dict[str, tuple[str, ...]] = {"pleural effusion": ("lower left", "lower right")}
# Findings without a grade (benign or all-or-nothing); every other finding has grade 1-3.
UNGRADED: frozenset[str] = frozenset({"fracture", "nevus", "cyst"})

# Vocabularies of the generator, used for multiple-choice distractors.
GEN_MODALITIES: tuple[str, ...] = tuple(SPECS)
BODY_REGIONS: tuple[str, ...] = tuple(dict.fromkeys(r for m in SPECS.values() for r in m))
ANATOMIES: tuple[str, ...] = tuple(dict.fromkeys(s.anatomy for m in SPECS.values() for s in m.values()))
FINDINGS: tuple[str, ...] = tuple(
    dict.fromkeys(f for m in SPECS.values() for s in m.values() for f in s.findings)
) + (NO_FINDING,)
GRADE_WORDS: dict[int, str] = {1: "small", 2: "medium-sized", 3: "large"}

# Lesion radius (fraction of image size) per grade: at 64 px these are ~6, 9 and 13 px across.
GRADE_RADIUS: dict[int, float] = {1: 0.045, 2: 0.07, 3: 0.1}
P_NO_FINDING = 1 / 3


@dataclass(frozen=True)
class Plan:
    """What to draw; the rendered labels (bbox, location) are measured from the drawn lesion."""

    modality: str
    body_region: str
    finding: str = NO_FINDING
    grade: int | None = None
    quadrant: str | None = None


@dataclass
class SynthImage:
    image: np.ndarray  # uint8 [H, W, 3]
    mask: np.ndarray | None  # bool [H, W], the lesion pixels
    modality: str
    body_region: str
    anatomy: str
    department: str
    finding: str
    bbox: list[int] | None  # [x0, y0, x1, y1], pixels, x1/y1 exclusive
    grade: int | None
    location: str | None

    def labels(self) -> dict:
        keys = ("modality", "body_region", "anatomy", "department", "finding", "bbox", "grade", "location")
        return {k: getattr(self, k) for k in keys}


def sample_plan(rng: np.random.Generator, modality: str | None = None) -> Plan:
    """Draw labels: uniform region within the modality, 1/3 no finding, uniform finding/grade/quadrant."""
    modality = modality or str(rng.choice(GEN_MODALITIES))
    regions = SPECS[modality]
    region = list(regions)[int(rng.integers(len(regions)))]
    spec = regions[region]
    if rng.random() < P_NO_FINDING:
        return Plan(modality, region)
    finding = spec.findings[int(rng.integers(len(spec.findings)))]
    grade = None if finding in UNGRADED else int(rng.integers(1, 4))
    quads = FINDING_QUADRANTS.get(finding, spec.quadrants)
    return Plan(modality, region, finding, grade, quads[int(rng.integers(len(quads)))])


def bbox_location(bbox: list[int] | None, width: int, height: int) -> str | None:
    """Image quadrant of the bbox centre."""
    if bbox is None:
        return None
    cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    return f"{'upper' if cy < height / 2 else 'lower'} {'left' if cx < width / 2 else 'right'}"


def render(plan: Plan, seed: int, size: int = 128) -> SynthImage:
    """Draw ``plan`` at ``size`` x ``size``; ``seed`` fixes everything that the plan does not."""
    bg = np.random.default_rng([seed, 1])  # anatomy, noise, colour: independent of the finding
    les = np.random.default_rng([seed, 2])  # lesion shape and placement
    img, soft = _RENDERERS[plan.modality](plan, size, bg, les)
    img = np.clip(img, 0.0, 1.0)
    img = (img * 255.0 + 0.5).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    mask = bbox = None
    if plan.finding != NO_FINDING and soft is not None:
        mask = soft > 0.5
        ys, xs = np.nonzero(mask)
        if len(xs):
            bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        else:  # cannot happen with the placements below; fall back to an honest "no finding"
            mask = None
    spec = SPECS[plan.modality][plan.body_region]
    found = bbox is not None
    return SynthImage(
        image=img,
        mask=mask,
        modality=plan.modality,
        body_region=plan.body_region,
        anatomy=spec.anatomy,
        department=spec.department,
        finding=plan.finding if found else NO_FINDING,
        bbox=bbox,
        grade=plan.grade if found else None,
        location=bbox_location(bbox, size, size),
    )


def synthesize(seed: int, size: int = 128, modality: str | None = None) -> SynthImage:
    """One random labelled image; the same seed always gives the same image."""
    return render(sample_plan(np.random.default_rng([seed, 0]), modality), seed, size)


# ----------------------------------------------------------------------------------------------------
# drawing helpers (coordinates are fractions of the image size; y down)


@lru_cache(maxsize=8)
def _yx(s: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(s, dtype=np.float32) + 0.5) / s
    return c[:, None], c[None, :]


def _ellipse(
    s: int, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, wobble=None
) -> np.ndarray:
    """Soft (about 1 px anti-aliased) ellipse mask in [0, 1]; ``wobble`` = [(k, amp, phase)] bends the rim."""
    yy, xx = _yx(s)
    dx, dy = xx - cx, yy - cy
    if angle:
        c, sn = np.cos(angle), np.sin(angle)
        dx, dy = dx * c + dy * sn, dy * c - dx * sn
    u, v = dx / rx, dy / ry
    r = np.sqrt(u * u + v * v)
    if wobble:
        th = np.arctan2(v, u)
        r = r / (1.0 + sum(a * np.cos(k * th + ph) for k, a, ph in wobble))
    return np.clip((1.0 - r) * min(rx, ry) * s + 0.5, 0.0, 1.0).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, s: int, cells: int) -> np.ndarray:
    """Unit-variance-ish low-frequency noise: a coarse Gaussian grid, bilinearly upsampled."""
    g = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(g, mode="F").resize((s, s), Image.BILINEAR))


def _target(rng: np.random.Generator, quadrant: str, lo: float, hi: float, ylo=None, yhi=None):
    """A lesion centre well inside ``quadrant`` (distance lo..hi from the near image edges)."""
    ylo, yhi = (lo, hi) if ylo is None else (ylo, yhi)
    x, y = rng.uniform(lo, hi), rng.uniform(ylo, yhi)
    vert, horiz = quadrant.split()
    return float(x if horiz == "left" else 1 - x), float(y if vert == "upper" else 1 - y)


def _radius(rng: np.random.Generator, grade: int | None, lo: float = 0.05, hi: float = 0.08) -> float:
    if grade is None:
        return float(rng.uniform(lo, hi))
    return GRADE_RADIUS[grade] * float(rng.uniform(0.9, 1.1))


def _wobble(rng: np.random.Generator, amp: float, ks=(2, 3, 5)) -> list[tuple[int, float, float]]:
    return [(k, float(rng.uniform(0, amp)), float(rng.uniform(0, 2 * np.pi))) for k in ks]


def _blend(img: np.ndarray, alpha: np.ndarray, colour) -> np.ndarray:
    """Alpha-composite a flat colour (scalar for grey, RGB triple for colour) onto ``img``."""
    a = alpha[:, :, None] if img.ndim == 3 else alpha
    return img * (1.0 - a) + np.asarray(colour, dtype=np.float32) * a


def _draw_mask(s: int, draw_fn, blur: float = 0.0) -> np.ndarray:
    """Rasterise shapes with PIL (``draw_fn(ImageDraw, s)``) into a float mask in [0, 1]."""
    im = Image.new("L", (s, s), 0)
    draw_fn(ImageDraw.Draw(im), s)
    if blur:
        im = im.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(im, dtype=np.float32) / 255.0


# ----------------------------------------------------------------------------------------------------
# modality renderers: (plan, size, background rng, lesion rng) -> (float image in [0,1], lesion soft mask)


def _xray(plan: Plan, s: int, bg: np.random.Generator, les: np.random.Generator):
    yy, xx = _yx(s)
    noise = bg.normal(0.0, 0.02, (s, s)).astype(np.float32) + 0.03 * _smooth_noise(bg, s, 8)
    gain, offset = bg.uniform(0.9, 1.1), bg.uniform(-0.05, 0.05)
    soft = None
    if plan.body_region == "chest":
        sx, sy = bg.uniform(-0.03, 0.03, 2)
        img = 0.1 + 0.45 * _ellipse(s, 0.5 + sx, 0.62 + sy, 0.5, 0.6)  # torso fills the frame
        img += 0.12 * _ellipse(s, 0.5 + sx, 0.55, 0.06, 0.6)  # spine / mediastinum
        lungs = []
        for side in (-1, 1):
            lung = _ellipse(s, 0.5 + sx + side * 0.19, 0.5 + sy, 0.15, 0.27, side * bg.uniform(0.0, 0.12))
            lungs.append(lung)
            img -= 0.32 * lung
        lung_all = np.maximum(*lungs)
        # posterior ribs: bands that sag laterally
        phase = (yy - sy - 0.9 * (xx - 0.5 - sx) ** 2) * bg.uniform(7.0, 8.5) + bg.uniform(0, 1)
        img += 0.1 * lung_all * (np.sin(2 * np.pi * phase) > 0.45)
        heart = _ellipse(s, 0.56 + sx, 0.64 + sy, 0.13 * bg.uniform(0.9, 1.1), 0.11, 0.3)
        img += 0.3 * heart * lung_all
        for side in (-1, 1):  # clavicles
            img += 0.12 * _ellipse(s, 0.5 + sx + side * 0.17, 0.2 + sy, 0.14, 0.018, side * -0.25)
        if plan.finding == "nodule":
            cx, cy = _target(les, plan.quadrant, 0.25, 0.35, 0.3, 0.4)
            r = _radius(les, plan.grade)
            soft = _ellipse(s, cx + sx, cy + sy, r, r * les.uniform(0.85, 1.0), wobble=_wobble(les, 0.06))
            img = img + 0.38 * soft
        elif plan.finding == "pleural effusion":
            side = -1 if plan.quadrant.endswith("left") else 1
            lung = lungs[0 if side < 0 else 1]
            level = {1: 0.67, 2: 0.59, 3: 0.5}[plan.grade] + sy + les.uniform(-0.02, 0.02)
            lateral = np.abs(xx - (0.5 + sx)) / 0.34  # meniscus: fluid climbs the lateral wall
            soft = lung * np.clip((yy - level + 0.06 * lateral) * s / 2.0, 0.0, 1.0)
            img = _blend(img, soft, 0.6)
    else:  # hand, postero-anterior view; left or right hand
        flip = bg.random() < 0.5
        sx, sy = bg.uniform(-0.03, 0.03, 2)
        ang = bg.uniform(-0.1, 0.1)
        segments = _hand_segments(bg)
        rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])

        def tf(x: float, y: float) -> tuple[float, float]:
            x, y = rot @ np.array([x - 0.5, y - 0.7]) + np.array([0.5, 0.7])
            return (1 - x if flip else x) + sx, y + sy

        segments = [(*tf(x0, y0), *tf(x1, y1), w) for x0, y0, x1, y1, w in segments]

        def draw(width_scale: float):
            def fn(d: ImageDraw.ImageDraw, n: int) -> None:
                for x0, y0, x1, y1, w in segments:
                    d.line(
                        [(x0 * n, y0 * n), (x1 * n, y1 * n)],
                        fill=255,
                        width=max(1, round(w * width_scale * n)),
                    )
                    r = w * width_scale * n / 2
                    for x, y in ((x0, y0), (x1, y1)):
                        d.ellipse([x * n - r, y * n - r, x * n + r, y * n + r], fill=255)

            return fn

        tissue = _draw_mask(s, draw(2.1), blur=s / 64)
        palm = _ellipse(s, *tf(0.5, 0.62), 0.17, 0.15)
        tissue = np.maximum(tissue, palm)
        bone = _draw_mask(s, draw(1.0), blur=s / 200)
        img = 0.06 + 0.22 * tissue + 0.5 * bone
        if plan.finding == "fracture":
            # a point on a long bone (not the carpus) in the planned quadrant, away from the midlines
            pts = []
            for x0, y0, x1, y1, w in segments[:-6]:
                for t in np.linspace(0.25, 0.75, 5):
                    pts.append((x0 + t * (x1 - x0), y0 + t * (y1 - y0), x1 - x0, y1 - y0, w))
            want = [p for p in pts if _quadrant_of(p[0], p[1], 0.08) == plan.quadrant]
            if not want:
                want = [p for p in pts if _quadrant_of(p[0], p[1], 0.0) == plan.quadrant] or pts
            cx, cy, dx, dy, w = want[int(les.integers(len(want)))]
            n = np.hypot(dx, dy)
            px, py = -dy / n, dx / n  # across the bone
            swell = _ellipse(s, cx, cy, 0.065, 0.065 * les.uniform(0.8, 1.0))
            gap = _draw_mask(
                s,
                lambda d, m: d.line(
                    [((cx - px * w) * m, (cy - py * w) * m), ((cx + px * w) * m, (cy + py * w) * m)],
                    fill=255,
                    width=max(2, round(0.02 * m)),
                ),
            )
            img = img + 0.14 * swell * (1 - bone) - 0.5 * gap * bone * swell
            soft = swell
    return (img * gain + offset + noise), soft


def _quadrant_of(x: float, y: float, margin: float) -> str | None:
    if abs(x - 0.5) < margin or abs(y - 0.5) < margin:
        return None
    return f"{'upper' if y < 0.5 else 'lower'} {'left' if x < 0.5 else 'right'}"


def _hand_segments(rng: np.random.Generator) -> list[tuple[float, float, float, float, float]]:
    """Bones of a right hand, thumb on the image left: (x0, y0, x1, y1, width); the carpus is last."""
    segs = [(0.44, 1.05, 0.45, 0.8, 0.07), (0.57, 1.05, 0.56, 0.8, 0.05)]  # radius, ulna
    # thumb: metacarpal + two phalanges
    pts = [(0.41, 0.71), (0.27, 0.58), (0.19, 0.48), (0.14, 0.41)]
    segs += [(*pts[i], *pts[i + 1], 0.045) for i in range(3)]
    for i, (bx, hx) in enumerate(zip((0.43, 0.48, 0.53, 0.58), (0.33, 0.45, 0.57, 0.68), strict=True)):
        hy = 0.46 + 0.03 * abs(i - 1.2) + rng.uniform(-0.01, 0.01)
        segs.append((bx, 0.72, hx, hy, 0.04))  # metacarpal
        d = np.array([hx - bx, hy - 0.72])
        d /= np.linalg.norm(d)
        x, y = hx, hy
        for length in np.array([0.13, 0.085, 0.06]) * (0.85 if i == 3 else 1.0):
            nx, ny = x + d[0] * length, y + d[1] * length
            segs.append((x, y, nx, ny, 0.035))
            x, y = nx + d[0] * 0.012, ny + d[1] * 0.012
    # carpus: a cluster of short stubby bones
    for cx, cy in ((0.44, 0.76), (0.5, 0.75), (0.56, 0.76), (0.46, 0.8), (0.52, 0.8), (0.58, 0.81)):
        segs.append((cx - 0.01, cy, cx + 0.01, cy, 0.05))
    return segs


def _ct(plan: Plan, s: int, bg: np.random.Generator, les: np.random.Generator):
    region = plan.body_region
    depth = 8
    z = int(bg.integers(3, 5))
    kw: dict = {}
    if plan.finding != NO_FINDING:
        box = {
            "chest": (0.25, 0.36, 0.33, 0.4),
            "abdomen": (0.27, 0.36, 0.36, 0.42),
            "head": (0.3, 0.38, 0.28, 0.38),
        }
        lo, hi, ylo, yhi = box[region]
        if region == "abdomen" and plan.quadrant == "upper right":
            lo, hi = 0.34, 0.4  # the left lobe of the liver
        cx, cy = _target(les, plan.quadrant, lo, hi, ylo, yhi)
        r = _radius(les, plan.grade, 0.05, 0.09)
        kw = dict(lesion_kind=plan.finding, lesion_center=((z + 0.5) / depth, cy, cx), lesion_radius=r)
    ph = make_phantom(region, (depth, s, s), bg, lesion=bool(kw), **kw)
    img = ct_window(ph.hu[z], WINDOW_BY_REGION[region.capitalize()]).astype(np.float32) / 255.0
    soft = (ph.labels[z] == LESION_LABEL).astype(np.float32) if kw else None
    return img, soft


def _mr(plan: Plan, s: int, bg: np.random.Generator, les: np.random.Generator):
    yy, xx = _yx(s)
    n1, n2 = bg.normal(0.0, 0.035, (2, s, s)).astype(np.float32)
    bias = 1.0 + bg.uniform(-0.15, 0.15) * (xx - 0.5) + bg.uniform(-0.15, 0.15) * (yy - 0.5)
    gain = bg.uniform(0.9, 1.1)
    soft = None
    if plan.body_region == "head":  # axial T1 with contrast
        cx, cy = 0.5 + bg.uniform(-0.02, 0.02), 0.5 + bg.uniform(-0.02, 0.02)
        rx, ry = 0.39 * bg.uniform(0.96, 1.04), 0.46 * bg.uniform(0.97, 1.02)
        img = 0.8 * _ellipse(s, cx, cy, rx, ry)  # scalp fat
        img = _blend(img, _ellipse(s, cx, cy, rx - 0.03, ry - 0.03), 0.06)  # skull: no signal
        brain = _ellipse(s, cx, cy, rx - 0.055, ry - 0.055)
        img = _blend(img, brain, 0.42)  # grey matter
        wm = _ellipse(s, cx, cy, rx - 0.11, ry - 0.11, wobble=[(18, 0.06, bg.uniform(0, 6)), (7, 0.04, 0.0)])
        img = _blend(img, wm, 0.66)
        ang = np.arctan2(yy - cy, xx - cx)
        sulci = (np.sin(ang * 30 + bg.uniform(0, 6)) > 0.6) * brain * (1 - wm)
        img = _blend(img, sulci.astype(np.float32) * 0.7, 0.15)
        for side in (-1, 1):  # lateral ventricles (dark CSF)
            img = _blend(img, _ellipse(s, cx + side * 0.045, cy - 0.02, 0.03, 0.11, side * 0.25), 0.12)
        if plan.finding == "tumor":
            tx, ty = _target(les, plan.quadrant, 0.28, 0.37)
            r = _radius(les, plan.grade)
            soft = _ellipse(s, tx, ty, r, r * les.uniform(0.8, 1.0), les.uniform(0, 3), _wobble(les, 0.08))
            img = _blend(img, soft, 0.97)
            if plan.grade == 3:  # necrotic core of a large enhancing tumour
                img = _blend(img, _ellipse(s, tx, ty, r * 0.45, r * 0.4) * soft, 0.55)
    else:  # knee, sagittal T1: bright fatty marrow outlined by dark cortex
        flip = bg.random() < 0.5  # anterior (patella) on the left or the right
        sx = bg.uniform(-0.03, 0.03)
        img = 0.02 + 0.73 * _ellipse(s, 0.5 + sx, 0.5, 0.34, 0.8)  # subcutaneous fat
        img = _blend(img, _ellipse(s, 0.5 + sx, 0.5, 0.28, 0.8), 0.33)  # muscle
        bone = np.zeros((s, s), np.float32)
        for part in (
            _ellipse(s, 0.5 + sx, 0.17, 0.085, 0.3),  # femoral shaft
            _ellipse(s, 0.5 + sx, 0.38, 0.2, 0.115),  # femoral condyles
            _ellipse(s, 0.5 + sx, 0.61, 0.2, 0.08),  # tibial plateau
            _ellipse(s, 0.5 + sx, 0.85, 0.09, 0.3),  # tibial shaft
        ):
            bone = np.maximum(bone, part)
        img = _blend(img, _ellipse(s, 0.5 + sx, 0.5, 0.17, 0.05), 0.45)  # cartilage / joint space
        img = _blend(img, bone, 0.05)  # cortex
        marrow = np.clip(bone * 2.2 - 1.2, 0, 1)  # bone shrunk by ~1-2 px
        img = _blend(img, marrow, 0.85)
        px = 0.5 + sx + (-0.27 if flip else 0.27)
        img = _blend(img, _ellipse(s, px, 0.36, 0.045, 0.085), 0.05)
        img = _blend(img, _ellipse(s, px, 0.36, 0.03, 0.07), 0.8)  # patella
        if plan.finding == "bone marrow edema":
            tx, ty = _target(les, plan.quadrant, 0.35, 0.4, 0.33, 0.4)
            ty = ty if ty < 0.5 else ty + 0.04
            r = _radius(les, plan.grade)
            soft = _ellipse(s, tx + sx, ty, r, r * les.uniform(0.7, 0.9), wobble=_wobble(les, 0.1)) * marrow
            img = _blend(img, soft, 0.22)
    img = img * bias * gain
    return np.sqrt((img + n1) ** 2 + n2**2), soft  # Rician noise, as in magnitude MR images


def _fundus(plan: Plan, s: int, bg: np.random.Generator, les: np.random.Generator):
    yy, xx = _yx(s)
    cx, cy = 0.5 + bg.uniform(-0.02, 0.02), 0.5 + bg.uniform(-0.02, 0.02)
    rad = 0.46 * bg.uniform(0.97, 1.02)
    disc = _ellipse(s, cx, cy, rad, rad)
    base = np.array([0.82, 0.36, 0.13], np.float32) * bg.uniform(0.9, 1.1, 3).astype(np.float32)
    r2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / rad**2
    shade = (1.0 - 0.45 * r2 + 0.06 * _smooth_noise(bg, s, 10))[:, :, None]
    img = base * shade
    side = 1 if bg.random() < 0.5 else -1  # right or left eye: optic disc nasal
    ox, oy = cx + side * 0.22, cy + bg.uniform(-0.03, 0.03)
    mac = np.exp(-(((xx - cx + side * 0.04) ** 2 + (yy - cy) ** 2) / 0.006))
    img = img * (1.0 - 0.35 * mac)[:, :, None]

    def vessels(d: ImageDraw.ImageDraw, n: int) -> None:
        for ang0, bend, length, w in (
            (-0.55, 0.9, 0.55, 0.022),
            (0.55, -0.9, 0.55, 0.022),
            (-1.4, 0.2, 0.3, 0.016),
            (1.4, -0.2, 0.3, 0.016),
            (-2.6, -0.3, 0.3, 0.014),
            (2.6, 0.3, 0.3, 0.014),
        ):
            a = np.pi * (side < 0) - side * ang0  # temporal arcades curve around the macula
            b = -side * bend
            pts, x, y = [], ox, oy
            for _ in range(10):
                pts.append((x * n, y * n))
                a += b * 0.15 + bg.uniform(-0.15, 0.15)
                x, y = x + np.cos(a) * length / 10, y + np.sin(a) * length / 10
            d.line(pts, fill=255, width=max(1, round(w * n)))
            k = int(bg.integers(3, 7))  # one branch per vessel
            bx, by = pts[k][0] / n, pts[k][1] / n
            ba = a + bg.choice([-0.9, 0.9])
            d.line(
                [(bx * n, by * n), ((bx + np.cos(ba) * 0.12) * n, (by + np.sin(ba) * 0.12) * n)],
                fill=255,
                width=1,
            )

    ves = _draw_mask(s, vessels, blur=s / 256)
    img = img * (1.0 - ves[:, :, None] * np.array([0.3, 0.65, 0.7], np.float32))
    od = _ellipse(s, ox, oy, 0.065, 0.07)
    img = _blend(img, od, (1.0, 0.82, 0.52))
    img = _blend(img, _ellipse(s, ox, oy, 0.03, 0.035), (1.0, 0.94, 0.78))  # cup
    soft = None
    if plan.finding != NO_FINDING:
        hem = plan.finding == "retinal hemorrhages"
        count = {1: 3, 2: 7, 3: 12}[plan.grade] + int(les.integers(0, 3))
        spread = {1: 0.045, 2: 0.075, 3: 0.105}[plan.grade]
        tx, ty = _target(les, plan.quadrant, 0.29, 0.35)
        soft = np.zeros((s, s), np.float32)
        for i in range(count):
            rr, th = spread * np.sqrt(les.random()) if i else 0.0, les.uniform(0, 2 * np.pi)
            sr = les.uniform(0.018, 0.03) if hem else les.uniform(0.013, 0.024)
            spot = _ellipse(s, tx + rr * np.cos(th), ty + rr * np.sin(th), sr, sr * les.uniform(0.6, 1.0), th)
            soft = np.maximum(soft, spot)
        img = _blend(img, soft, (0.4, 0.04, 0.03) if hem else (1.0, 0.93, 0.45))
    img = img * disc[:, :, None]
    noise = bg.normal(0.0, 0.015, (s, s, 3)).astype(np.float32)
    return img + noise * disc[:, :, None], (soft * disc if soft is not None else None)


def _dermoscopy(plan: Plan, s: int, bg: np.random.Generator, les: np.random.Generator):
    yy, xx = _yx(s)
    skin = np.array([0.88, 0.67, 0.57], np.float32) + bg.uniform(-0.05, 0.05, 3).astype(np.float32)
    mottle = 0.04 * _smooth_noise(bg, s, 12)
    img = skin * (1.0 + mottle)[:, :, None] + bg.normal(0.0, 0.015, (s, s, 3)).astype(np.float32)
    hairs = []
    for _ in range(int(bg.integers(0, 4))):
        x0, y0, a = bg.uniform(0, 1), bg.uniform(0, 1), bg.uniform(0, np.pi)
        hairs.append(
            [(x0 + t * np.cos(a + 0.5 * t), y0 + t * np.sin(a + 0.5 * t)) for t in np.linspace(-0.4, 0.4, 8)]
        )
    hair = _draw_mask(
        s, lambda d, n: [d.line([(x * n, y * n) for x, y in h], fill=255, width=1) for h in hairs]
    )
    vig_r = bg.uniform(0.62, 0.72) if bg.random() < 0.6 else 2.0  # dermoscope's round field of view
    vignette = _ellipse(s, 0.5, 0.5, vig_r, vig_r)
    soft = None
    if plan.finding != NO_FINDING:
        mel = plan.finding == "melanoma"
        tx, ty = _target(les, plan.quadrant, 0.3, 0.36)
        r = _radius(les, plan.grade, 0.065, 0.11) * 1.5
        wob = _wobble(les, 0.22, (2, 3, 5, 7)) if mel else _wobble(les, 0.03)
        soft = _ellipse(s, tx, ty, r, r * les.uniform(0.75, 1.0), les.uniform(0, 3), wob)
        if mel:  # several colours: dark brown base, black, blue-grey and red areas
            img = _blend(img, soft, (0.36, 0.2, 0.13))
            for colour in ((0.1, 0.07, 0.07), (0.42, 0.47, 0.58), (0.7, 0.25, 0.25)):
                patch = np.clip(_smooth_noise(les, s, 10) - 0.5, 0, 1) * 2.0
                img = _blend(img, np.clip(patch, 0, 1) * soft, colour)
        else:  # nevus: symmetric, one colour, slightly darker centre
            brown = np.array([0.58, 0.37, 0.24], np.float32) * les.uniform(0.85, 1.1)
            img = _blend(img, soft, brown)
            img = _blend(img, _ellipse(s, tx, ty, r * 0.5, r * 0.45) * soft * 0.4, brown * 0.75)
        soft = soft * vignette
    img = _blend(img, hair, (0.2, 0.13, 0.1))
    return img * vignette[:, :, None], soft


def _histopathology(plan: Plan, s: int, bg: np.random.Generator, les: np.random.Generator):
    stain = bg.uniform(0.93, 1.07, 3).astype(np.float32)  # staining variation between slides
    fibres = 0.05 * _smooth_noise(bg, s, 16)[:, :, None]
    nuclei: list[tuple[float, float, float, float]] = []  # x, y, rx, ry

    def dots(items, colour, img, blur=0.4):
        m = _draw_mask(
            s,
            lambda d, n: [
                d.ellipse([(x - a) * n, (y - b) * n, (x + a) * n, (y + b) * n], fill=255)
                for x, y, a, b in items
            ],
            blur=blur * s / 128,
        )
        return _blend(img, m, colour)

    if plan.body_region == "colon":  # glands: white lumens ringed by basal nuclei, in pink stroma
        img = np.array([0.93, 0.64, 0.77], np.float32) * (1.0 + fibres)
        lumens = []
        for gy in np.arange(0.1, 1.0, 0.2):
            for gx in np.arange(0.1, 1.0, 0.2):
                x, y = gx + bg.uniform(-0.04, 0.04), gy + bg.uniform(-0.04, 0.04)
                r = bg.uniform(0.04, 0.055)
                lumens.append((x, y, r))
                for t in np.linspace(0, 2 * np.pi, 14, endpoint=False) + bg.uniform(0, 1):
                    nuclei.append((x + 1.45 * r * np.cos(t), y + 1.45 * r * np.sin(t), 0.01, 0.014))
        epith = _draw_mask(
            s,
            lambda d, n: [
                d.ellipse(
                    [(x - 1.7 * r) * n, (y - 1.7 * r) * n, (x + 1.7 * r) * n, (y + 1.7 * r) * n], fill=255
                )
                for x, y, r in lumens
            ],
        )
        img = _blend(img, epith, (0.86, 0.56, 0.76))
        img = _blend(
            img,
            _draw_mask(
                s,
                lambda d, n: [
                    d.ellipse([(x - r) * n, (y - r) * n, (x + r) * n, (y + r) * n], fill=255)
                    for x, y, r in lumens
                ],
            ),
            (0.97, 0.93, 0.95),
        )
        nuclei += [(x, y, 0.007, 0.01) for x, y in bg.uniform(0, 1, (50, 2))]
        img = dots(nuclei, (0.3, 0.15, 0.45), img)
    else:  # lymph node: densely packed small dark lymphocytes
        img = np.array([0.82, 0.6, 0.8], np.float32) * (1.0 + fibres)
        g = np.arange(0.015, 1.0, 0.033)
        pts = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2) + bg.uniform(-0.012, 0.012, (len(g) ** 2, 2))
        img = dots([(x, y, 0.011, 0.011) for x, y in pts], (0.27, 0.12, 0.42), img)
    soft = None
    if plan.finding != NO_FINDING:
        tx, ty = _target(les, plan.quadrant, 0.28, 0.36)
        r = _radius(les, plan.grade) * 1.4
        soft = _ellipse(s, tx, ty, r, r * les.uniform(0.8, 1.0), les.uniform(0, 3), _wobble(les, 0.12))
        n = int(2.2 * (2 * r / 0.04) ** 2) + 4  # crowded cells
        cells = [
            (x, y, a, a * les.uniform(0.7, 1.0))
            for (x, y), a in zip(
                les.uniform(-1, 1, (n, 2)) * 1.2 * r + (tx, ty), les.uniform(0.015, 0.026, n), strict=True
            )
        ]
        if plan.finding == "adenocarcinoma":  # crowded, large, dark, pleomorphic nuclei; no lumens
            tumour = dots(
                cells, (0.22, 0.08, 0.36), np.broadcast_to(np.array([0.74, 0.48, 0.7], np.float32), img.shape)
            )
        else:  # metastasis: sheets of large pale tumour cells with pink cytoplasm among lymphocytes
            tumour = dots(
                cells, (0.62, 0.44, 0.74), np.broadcast_to(np.array([0.96, 0.8, 0.87], np.float32), img.shape)
            )
        img = img * (1.0 - soft[:, :, None]) + tumour * soft[:, :, None]
    noise = bg.normal(0.0, 0.012, (s, s, 3)).astype(np.float32)
    return img * stain + noise, soft


_RENDERERS = {
    "X-ray": _xray,
    "CT": _ct,
    "MR": _mr,
    "Fundus photography": _fundus,
    "Dermoscopy": _dermoscopy,
    "Histopathology": _histopathology,
}
