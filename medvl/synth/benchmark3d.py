"""The synthetic 3D multiple-choice benchmark (`medvl eval --bench synth3d`): questions about labelled CT
phantoms, each answered from a whole volume through the slices route.

Each case is a phantom (:mod:`medvl.synth.phantom`) made into the array curation stores for it: the
synthetic-3d card's `VolumeSpec` (:data:`SPEC`) applied to the image and its label volume, written as
`volumes/<sha256>.npy` (uint8 [C, S, P, L], LPS) beside the TSV. Every gold answer is computed here from
the label volume **on the stored grid** (after the same crop, resampling and padding as the image), never
from a text, by the rules and words of :mod:`medvl.volume_facts`, which `medvl generate` writes 3D
instructions by:

- **organ**: one organ with at least :data:`MIN_VOXELS` voxels in the volume; the three distractors
  have none.
- **lesion presence**: the lesion label has at least :data:`MIN_VOXELS` voxels (yes) or none (no); a
  volume with a few voxels only is asked nothing about lesions.
- **lesion side**: the mean column of the lesion's voxels against the volume's middle column (the
  foreground crop centres the body); LPS columns run from the patient's right to the left. Not asked
  within :data:`SIDE_MARGIN` columns of the middle.
- **lesion slice range**: the third of the volume's slices (lower = inferior, middle, upper = superior)
  holding the mean slice of the lesion's voxels; not asked within :data:`THIRD_MARGIN` of a boundary.
- **lesion size**: the diameter of the sphere of the lesion's volume (voxels x voxel volume in mm^3):
  small, medium or large (:data:`SIZE_BOUNDS_MM`); not asked within :data:`SIZE_MARGIN_MM` of a boundary.
- **plane**: the volume turned so that its slabs are axial, coronal or sagittal sections
  (:func:`reformat`); the gold is the plane it was turned to.

Lesions are placed by the builder (the third of the slices, the side, the size grade drawn evenly) so that
every answer occurs, but the gold is what the label volume then says. The TSV has VLMEvalKit's columns
(`index, image, question, A-D, answer, category`) where `image` names the volume file, plus `case` and
`evidence` (the measured value behind the gold answer).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from medvl.imaging import VolumeSpec, store_volume
from medvl.prompts import OPTION_LETTERS
from medvl.synth.phantom import LABELS, LESION_LABEL, Phantom, case_phantom
from medvl.volume_facts import (
    MIN_VOXELS,
    PLANES,
    SIDES,
    SIZES,
    THIRDS,
    reformat,
    side_of,
    size_grade,
    third_of,
)
from medvl.volume_facts import (
    QUESTIONS as VOLUME_QUESTIONS,
)

# configs/cards/synthetic-3d.yaml's `options.volume` (a test keeps them equal): what curation stores.
SPEC = VolumeSpec(
    spacing=(5.0, 6.25, 6.25), size=(32, 64, 64), windows=("abdomen", "lung", "bone"), crop_foreground=True
)
REGIONS = ("chest", "abdomen", "head")
KINDS = ("organ", "lesion presence", "lesion side", "lesion slice range", "lesion size", "plane")
# Organs asked about: every label but bone (in every phantom) and the lesion.
ORGANS = tuple(name for i, name in sorted(LABELS.items()) if name != "bone" and i != LESION_LABEL)
# The generator's wording (medvl.volume_facts.QUESTIONS), asked about the lesion.
QUESTIONS = {
    "organ": VOLUME_QUESTIONS["organ"][0],
    "lesion presence": VOLUME_QUESTIONS["presence"][0].format(label="lesion"),
    "lesion side": VOLUME_QUESTIONS["side"][0].format(label="lesion"),
    "lesion slice range": VOLUME_QUESTIONS["third"][0].format(label="lesion"),
    "lesion size": VOLUME_QUESTIONS["size"][0].format(label="lesion"),
    "plane": VOLUME_QUESTIONS["plane"][0],
}
# The benchmark's phantoms are cases (BENCH_SEED, i); training phantoms (medvl.synth.volumes) are cases
# (seed, i) of another seed, so a training seed must not be this one.
BENCH_SEED = 1000


def check_training_seed(seed: int) -> None:
    """ValueError for the benchmark's seed: training case i of it would be benchmark case i."""
    if seed == BENCH_SEED:
        raise ValueError(f"seed {seed} draws the synthetic 3D benchmark's phantoms; use another seed")


COLUMNS = ("index", "image", "question", "A", "B", "C", "D", "answer", "category", "case", "evidence")


# ---------------------------------------------------------------- gold answers from the label volume


def organ_counts(labels: np.ndarray) -> dict[str, int]:
    counts = np.bincount(labels.ravel(), minlength=max(LABELS) + 1)
    return {LABELS[i]: int(counts[i]) for i in LABELS}


def lesion_facts(labels: np.ndarray, spacing: tuple[float, float, float]) -> dict | None:
    """The lesion's measures on the stored grid: voxels, mean slice and column, equivalent diameter;
    None without lesion voxels."""
    z, _, x = np.nonzero(labels == LESION_LABEL)
    if len(z) == 0:
        return None
    volume_mm3 = len(z) * float(np.prod(spacing))
    return {
        "voxels": int(len(z)),
        "slice": float(z.mean()),
        "column": float(x.mean()),
        "diameter_mm": float((6 * volume_mm3 / np.pi) ** (1 / 3)),
    }


def case_questions(labels: np.ndarray, plane: str, rng: np.random.Generator) -> list[dict]:
    """The questions one case asks (`category`, `question`, `options`, `answer` index, `evidence`), all
    from its label array [S, P, L] on the stored grid, and the `plane` its plane question shows."""
    out = []

    def add(kind: str, options: list[str], gold: str, evidence: str, shuffle: bool = True) -> None:
        if shuffle:
            options = [options[i] for i in rng.permutation(len(options))]
        out.append(
            dict(
                category=kind,
                question=QUESTIONS[kind],
                options=options,
                answer=options.index(gold),
                evidence=evidence,
            )
        )

    counts = organ_counts(labels)
    present = [o for o in ORGANS if counts[o] >= MIN_VOXELS]
    absent = [o for o in ORGANS if counts[o] == 0]
    if present and len(absent) >= 3:
        gold = str(rng.choice(present))
        distractors = [absent[i] for i in rng.permutation(len(absent))[:3]]
        add("organ", [gold, *distractors], gold, f"{gold}: {counts[gold]} voxels; distractors: 0")
    spacing = SPEC.spacing
    facts = lesion_facts(labels, spacing)
    n = 0 if facts is None else facts["voxels"]
    if n == 0 or n >= MIN_VOXELS:
        add("lesion presence", ["yes", "no"], "yes" if n else "no", f"lesion voxels: {n}")
    if facts is not None and n >= MIN_VOXELS:
        slices, _, columns = labels.shape
        side = side_of(facts["column"], columns)
        if side is not None:
            add(
                "lesion side",
                list(SIDES),
                side,
                f"mean column {facts['column']:.1f}; middle {(columns - 1) / 2:.1f} (LPS)",
            )
        third = third_of(facts["slice"], slices)
        if third is not None:
            add(
                "lesion slice range",
                list(THIRDS)[::-1],
                third,
                f"mean slice {facts['slice']:.1f} of {slices} (0 inferior)",
                shuffle=False,
            )
        grade = size_grade(facts["diameter_mm"])
        if grade is not None:
            add(
                "lesion size",
                list(SIZES),
                grade,
                f"{n} voxels, equivalent diameter {facts['diameter_mm']:.1f} mm",
                shuffle=False,
            )
    add("plane", list(PLANES), plane, f"sections turned to {plane}")
    return out


# ---------------------------------------------------------------- phantoms


def _sitk(array: np.ndarray, spacing: tuple[float, float, float]):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)  # [z, y, x]; identity direction = LPS, as the phantom is drawn
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    return img


def prepare(p: Phantom, spec: VolumeSpec = SPEC) -> tuple[np.ndarray, np.ndarray]:
    """A phantom through `spec` (:data:`SPEC`: as curation stores it) -> (uint8 [C, S, P, L] array, its
    label array on the same grid)."""
    prepared = spec.apply(_sitk(p.hu, p.spacing), _sitk(p.labels, p.spacing), name=f"{p.region} phantom")
    assert prepared.labels is not None
    return prepared.array, prepared.labels


def make_case(
    region: str, lesion: bool, seed: tuple[int, ...], shape: tuple[int, int, int] = (32, 128, 128)
) -> tuple[np.ndarray, np.ndarray]:
    """One case: a phantom (:func:`case_phantom`, the training phantoms' rule) through :func:`prepare`."""
    return prepare(case_phantom(region, lesion, seed, shape))


def build_synth3d(
    out: str | Path, n: int = 60, seed: int = BENCH_SEED, shape: tuple[int, int, int] = (32, 128, 128)
) -> Path:
    """Write the benchmark: `n` phantoms (regions in turn, a lesion in every other pair of cycles so
    each region has both) as volumes under `out/volumes/` and their questions as `out/synth3d.tsv`;
    returns the TSV's path. `seed` keeps it apart from training phantoms (medvl.synth.volumes uses 0)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        region, lesion = REGIONS[i % 3], (i // 3) % 2 == 0
        array, labels = make_case(region, lesion, (seed, i), shape)
        rng = np.random.default_rng([seed, i, 2])
        plane = PLANES[int(rng.integers(3))]
        files = {"axial": store_volume(out, array)}
        files[plane] = store_volume(out, reformat(array, plane))
        for q in case_questions(labels, plane, rng):
            opts = q["options"]
            rows.append(
                {
                    "index": len(rows),
                    "image": files[plane] if q["category"] == "plane" else files["axial"],
                    "question": q["question"],
                    **{OPTION_LETTERS[k]: (opts[k] if k < len(opts) else "") for k in range(4)},
                    "answer": OPTION_LETTERS[q["answer"]],
                    "category": q["category"],
                    "case": f"{region}-{i:04d}",
                    "evidence": q["evidence"],
                }
            )
    path = out / "synth3d.tsv"
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path
