"""What a curated volume record says about its volume, measured on the stored grid: the one source of
the 3D facts that instructions are written from (`medvl generate`) and that the synthetic 3D benchmark's
gold answers are computed from (`medvl.synth.benchmark3d`), so both use the same rules and words.

The stored array is uint8 [C, S, P, L] in LPS: slice 0 is the most inferior, columns run from the
patient's right to the left. Per label, curation stores its voxel count and centroid on that grid
(`volume.measures`); the facts below follow from them:

- **side**: the centroid's column against the volume's middle column (the foreground crop centres the
  body); none within :data:`SIDE_MARGIN` columns of the middle.
- **slice range**: the third of the slices holding the centroid's slice (lower = inferior); none within
  :data:`THIRD_MARGIN` of a boundary.
- **size**: the diameter of the sphere of the label's volume (voxels x voxel volume): small, medium or
  large (:data:`SIZE_BOUNDS_MM`); none within :data:`SIZE_MARGIN_MM` of a boundary.
- **plane**: a volume turned by :func:`reformat` shows coronal or sagittal sections instead of axial ones.

A fact too close to a boundary to be told from the volume is left out rather than guessed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from medvl.prompts import BOX_SCALE

# Clinical tasks (a card's label groups) whose labels are findings: asked present or absent, located and
# sized. Organs (the default group) are what the organ question asks; other anatomy (bone, muscle) is
# named but neither.
ORGAN_TASK = "Organ Recognition"
FINDING_TASKS = ("Disease Diagnosis", "Lesion Grading")
MIN_VOXELS = 4  # a structure counts as present from 4 voxels of the stored grid (0.8 mL at 5 x 6.25^2 mm)
SIDE_MARGIN = 2.0  # columns (12.5 mm at 6.25 mm): the body's centre may lie ~1 column off the middle
THIRD_MARGIN = 0.1  # of a third (~1 slice of 32)
SIZE_BOUNDS_MM = (22.0, 36.0)  # equivalent-sphere diameter: small below 22, medium 22-36, large from 36
SIZE_MARGIN_MM = 2.0
SIDES = ("patient's right", "patient's left")
THIRDS = ("lower third (inferior)", "middle third", "upper third (superior)")
SIZES = ("small (under 22 mm)", "medium (22-36 mm)", "large (36 mm or more)")
PLANES = ("axial", "coronal", "sagittal")
# The perception questions, one wording per kind (English, Chinese): the generator's and the benchmark's.
QUESTIONS: dict[str, tuple[str, str]] = {
    "organ": ("Which of these organs is in this volume?", "以下哪个器官出现在该容积图像中？"),
    "presence": ("Is there a {label} in this volume?", "该容积图像中有{label}吗？"),
    "side": ("On which side of the patient is the {label}?", "{label}位于患者的哪一侧？"),
    "third": (
        "In which part of the volume's slices is the centre of the {label}?",
        "{label}的中心位于容积层面的哪一部分？",
    ),
    "size": ("How large is the {label}?", "{label}有多大？"),
    "plane": ("In which anatomical plane are these sections?", "这些断面属于哪个解剖平面？"),
}
ZH_WORDS = {
    "patient's right": "患者右侧",
    "patient's left": "患者左侧",
    "lower third (inferior)": "下三分之一（下方）",
    "middle third": "中间三分之一",
    "upper third (superior)": "上三分之一（上方）",
    "small (under 22 mm)": "小（小于22 mm）",
    "medium (22-36 mm)": "中等（22-36 mm）",
    "large (36 mm or more)": "大（36 mm及以上）",
    "axial": "轴位",
    "coronal": "冠状位",
    "sagittal": "矢状位",
    "yes": "是",
    "no": "否",
}


def side_of(column: float, columns: int) -> str | None:
    middle = (columns - 1) / 2
    if abs(column - middle) < SIDE_MARGIN:
        return None
    return SIDES[1] if column > middle else SIDES[0]  # LPS: columns run towards the patient's left


def third_of(slice_: float, slices: int) -> str | None:
    pos = 3 * (slice_ + 0.5) / slices  # voxel centres; 0 = the inferior end
    nearest = round(pos)
    if 0 < nearest < 3 and abs(pos - nearest) < THIRD_MARGIN:
        return None
    return THIRDS[min(2, int(pos))]


def equivalent_diameter(voxels: int, spacing: tuple[float, ...]) -> float:
    return float((6 * voxels * float(np.prod(spacing)) / np.pi) ** (1 / 3))


def size_grade(diameter_mm: float) -> str | None:
    if any(abs(diameter_mm - b) < SIZE_MARGIN_MM for b in SIZE_BOUNDS_MM):
        return None
    return SIZES[sum(diameter_mm >= b for b in SIZE_BOUNDS_MM)]


def reformat(array: np.ndarray, plane: str) -> np.ndarray:
    """A stored uint8 [C, S, P, L] (LPS) array turned so that its second axis is the `plane`'s normal,
    each section in the usual display: axial as stored; coronal [C, P, S, L] (sections anterior to
    posterior, rows superior first, columns the patient's right first); sagittal [C, L, S, P] (sections
    right to left, rows superior first, columns anterior first). A turned volume with more sections than
    the array has slices is averaged in adjacent groups down to that many, so that every plane gives
    the same number of slabs (and image tokens) as the axial one."""
    if plane == "axial":
        return array
    if plane == "coronal":
        turned = array.transpose(0, 2, 1, 3)[:, :, ::-1, :]
    elif plane == "sagittal":
        turned = array.transpose(0, 3, 1, 2)[:, :, ::-1, :]
    else:
        raise ValueError(f"unknown plane {plane!r}; one of {', '.join(PLANES)}")
    n, want = turned.shape[1], array.shape[1]
    if n <= want:
        return np.ascontiguousarray(turned)
    edges = [i * n // want for i in range(want + 1)]
    groups = [turned[:, a:b].mean(axis=1) for a, b in zip(edges, edges[1:], strict=False)]
    return np.rint(np.stack(groups, axis=1)).astype(np.uint8)


BOX3D_HINT = f"[x0, y0, z0, x1, y1, z1] (0-{BOX_SCALE})"


def box_3d(box: dict, shape: Sequence[int]) -> list[int]:
    """A stored 3D box (voxels, maxima exclusive) -> [x0, y0, z0, x1, y1, z1] in 0-1000 of the array."""
    _, s, p, lat = shape
    return [
        round(BOX_SCALE * box["x_min"] / lat),
        round(BOX_SCALE * box["y_min"] / p),
        round(BOX_SCALE * box["z_min"] / s),
        round(BOX_SCALE * box["x_max"] / lat),
        round(BOX_SCALE * box["y_max"] / p),
        round(BOX_SCALE * box["z_max"] / s),
    ]


def format_box_3d(box: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(v)) for v in box) + "]"


def turned_shape(shape: Sequence[int], plane: str) -> tuple[int, ...]:
    """The shape :func:`reformat` gives an array of `shape` [C, S, P, L]."""
    c, s, p, lat = shape
    if plane == "coronal":
        return (c, min(p, s), s, lat)
    if plane == "sagittal":
        return (c, min(lat, s), s, p)
    return tuple(shape)


def label_measures(labels: np.ndarray, names: dict[int, str]) -> dict[str, dict]:
    """A [S, P, L] label array -> per named label its voxel count and centroid [slice, row, column]."""
    out: dict[str, dict] = {}
    for value in np.unique(labels[labels != 0]):
        if int(value) not in names:
            continue
        idx = np.nonzero(labels == value)
        out[names[int(value)]] = {
            "voxels": int(len(idx[0])),
            "centroid": [round(float(i.mean()), 3) for i in idx],
        }
    return out


def merge_measures(a: dict | None, b: dict) -> dict:
    """Two labels a card's label map merges into one: counts add, centroids average by voxels."""
    if not a:
        return b
    n = a["voxels"] + b["voxels"]
    c = [(x * a["voxels"] + y * b["voxels"]) / n for x, y in zip(a["centroid"], b["centroid"], strict=True)]
    return {"voxels": n, "centroid": [round(v, 3) for v in c]}


@dataclass
class LabelFacts:
    label: str
    voxels: int
    centroid: tuple[float, float, float]  # slice, row, column on the stored grid
    side: str | None
    third: str | None
    diameter_mm: float
    size: str | None
    slices: tuple[int, int] | None  # [first, last + 1)


@dataclass
class VolumeFacts:
    """One volume record's facts (:func:`volume_facts`)."""

    record_id: str
    source: str
    split: str
    modality: str
    body_region: str
    department: str
    task: str
    file: str  # the stored array, relative to the curated folder
    shape: tuple[int, ...]  # [C, S, P, L]
    spacing: tuple[float, float, float]
    labels: dict[str, LabelFacts]  # present labels (at least MIN_VOXELS voxels)
    traces: list[str]  # labels with 1 to MIN_VOXELS - 1 voxels: neither present nor absent
    label_space: list[str]
    exhaustive: bool  # the annotation marks every label of the space wherever it occurs
    groups: dict[str, str] = field(default_factory=dict)  # label -> clinical task
    boxes: list[dict] = field(default_factory=list)

    @property
    def findings(self) -> list[str]:
        """Labels of the space that are findings (:data:`FINDING_TASKS`), present or not."""
        return [x for x in self.label_space if self.groups.get(x) in FINDING_TASKS]

    def is_organ(self, label: str) -> bool:
        return self.groups.get(label, ORGAN_TASK) == ORGAN_TASK

    @property
    def absent(self) -> list[str]:
        """Labels of the space verified absent: only where the annotation is exhaustive."""
        seen = {*self.labels, *self.traces}
        return [x for x in self.label_space if x not in seen] if self.exhaustive else []

    def to_json(self) -> str:
        from dataclasses import asdict

        return json.dumps(asdict(self), sort_keys=True)


def volume_facts(record: dict) -> VolumeFacts:
    """The facts of a curated volume record (`kind == "volume"`). Raises KeyError / ValueError on a
    record without the stored measures (curated before they were stored: curate it again)."""
    vol = json.loads(record["volume"])
    ann = json.loads(record.get("annotation") or "{}")
    shape = tuple(int(x) for x in vol["shape"])
    spacing = tuple(float(x) for x in vol["spacing_mm"])
    if "measures" not in vol:
        raise ValueError("no per-label measures (curated by an older medvl: curate the source again)")
    slices = vol.get("slices") or {}
    labels = {}
    for label, m in sorted(vol["measures"].items()):
        if m["voxels"] < MIN_VOXELS:
            continue
        z, _, x = m["centroid"]
        d = equivalent_diameter(m["voxels"], spacing)
        rng = slices.get(label)
        labels[label] = LabelFacts(
            label=label,
            voxels=int(m["voxels"]),
            centroid=tuple(m["centroid"]),
            side=side_of(x, shape[3]),
            third=third_of(z, shape[1]),
            diameter_mm=round(d, 2),
            size=size_grade(d),
            slices=tuple(rng) if rng else None,
        )
    return VolumeFacts(
        record_id=str(record["id"]),
        source=str(record.get("source") or ""),
        split=str(record.get("split") or ""),
        modality=str(record.get("modality") or ""),
        body_region=str(record.get("body_region") or ""),
        department=str(record.get("department") or ""),
        task=str(record.get("original_task") or ""),
        file=vol["file"],
        shape=shape,
        spacing=spacing,
        labels=labels,
        traces=sorted(k for k, m in vol["measures"].items() if 0 < m["voxels"] < MIN_VOXELS),
        label_space=sorted(ann.get("label_space") or []),
        exhaustive=bool(ann.get("exhaustive")),
        groups=dict(ann.get("groups") or {}),
        boxes=list(vol.get("boxes") or []),
    )
