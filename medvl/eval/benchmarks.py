"""Benchmark loaders: each reads the files a user downloaded into a list of :class:`Item`.

Every loader says in its docstring where the data comes from and raises :class:`BenchmarkError`
naming the file, the column and the problem when something is missing. Images are kept as their
source (a path or base64 text) and decoded only when a batch needs them.

3D benchmarks (synth3d, m3d-vqa, ct-rate-vqa) ask about a volume (`Item.volume`), shown to the model as
the slabs of the slices route (:func:`volume_images`). A question whose volume is missing or unreadable
is skipped, never fatal: the loader counts it by reason in the `notes` list it is given, which the run's
report carries.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from medvl.imaging import (
    DEFAULT_PREPROCESSING,
    Preprocessing,
    is_scan,
    read_image,
    slab_count,
    volume_slabs,
)
from medvl.prompts import OPTION_LETTERS as LETTERS
from medvl.prompts import build_prompt

Kind = Literal["mc", "closed", "open"]

# MMMU's Health & Medicine track (reference Table 4) is these five subjects.
MMMU_HEALTH_SUBJECTS = (
    "Basic_Medical_Science",
    "Clinical_Medicine",
    "Diagnostics_and_Laboratory_Medicine",
    "Pharmacy",
    "Public_Health",
)
# Image tokens per slab for an answerer that does not say (an API model): LLaVA-1.5's 576 (a 336 px
# CLIP ViT-L/14), which makes a 32-slice volume 7 slabs at the default volume budget.
DEFAULT_TOKENS_PER_IMAGE = 576


class BenchmarkError(ValueError):
    """A benchmark file is missing, or lacks a column/field, or holds a value we cannot use."""


@dataclass
class Item:
    id: str
    question: str
    kind: Kind
    answer: str  # the gold option letter for "mc", the answer text otherwise; "" when unknown
    images: list[str | Path] = field(default_factory=list)  # paths or base64 text
    options: dict[str, str] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)  # breakdown name -> value
    volume: Path | None = None  # a 3D question's volume, shown as slabs in place of `images`

    def prompt(self) -> str:
        return build_prompt(self.question, self.options)

    def load_images(
        self, size: int | None = None, preprocessing: Preprocessing = DEFAULT_PREPROCESSING
    ) -> list[Image.Image]:
        """The 2D images (a volume question's slabs depend on the model: :func:`volume_images`)."""
        return [
            read_image(s if isinstance(s, Path) else base64.b64decode(s), preprocessing, size=size)
            for s in self.images
        ]


def _need(row: dict, key: str, where: str) -> str:
    if key not in row:
        raise BenchmarkError(f"{where}: missing column/field {key!r} (has: {', '.join(map(str, row))})")
    value = row[key]
    return "" if value is None else str(value)


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise BenchmarkError(f"{path}: {what} not found")
    return path


def _find_image(name: str, roots: list[Path], where: str) -> Path:
    for root in roots:
        if (root / name).is_file():
            return root / name
    raise BenchmarkError(f"{where}: image {name!r} not found under {', '.join(map(str, roots))}")


def _cell(value) -> str:
    """A TSV/CSV cell as text; pandas-style 'nan' and blanks count as empty."""
    s = "" if value is None else str(value).strip()
    return "" if s.lower() == "nan" else s


# ---------------------------------------------------------------- VLMEvalKit TSV (multiple choice)


def _read_tsv(path: Path) -> list[dict[str, str]]:
    _existing(path, "TSV file")
    csv.field_size_limit(1 << 30)  # base64 images are long cells
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        raise BenchmarkError(f"{path}: no rows")
    return rows


def _tsv_images(row: dict, by_index: dict[str, str], where: str) -> list[str]:
    """The row's base64 images, each checked now (valid base64, a recognisable image header), so that
    a broken cell is reported with its file, line and column before any model is loaded."""
    image = _need(row, "image", where).strip()
    if image.startswith("["):  # MMMU: several images as a JSON list of base64 strings
        try:
            images = json.loads(image)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{where}: not a JSON list of base64 images ({e.msg})") from None
    else:
        # VLMEvalKit stores a repeated image once and refers to it by the index of the row holding it.
        while len(image) < 64 and image in by_index:
            image = by_index[image]
        images = [image]
    for i, b64 in enumerate(images):
        _check_base64_image(b64, where if len(images) == 1 else f"{where} (image {i + 1})")
    return images


def _check_base64_image(b64: str, where: str) -> None:
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BenchmarkError(f"{where}: not valid base64 ({e})") from None
    try:  # the header only: decoding every pixel here would double the cost of a run
        with Image.open(io.BytesIO(data)):
            pass
    except Exception:  # PIL raises several types for unreadable headers
        if data[128:132] != b"DICM":  # DICOM (PIL does not read it) is checked when decoded
            raise BenchmarkError(f"{where}: the {len(data)} decoded bytes are not an image") from None


def load_tsv(
    path: Path,
    groups: dict[str, tuple[str, ...]],
    *,
    keep: Callable[[dict], bool] = lambda row: True,
    skipped: Counter | None = None,
) -> list[Item]:
    """A VLMEvalKit multiple-choice TSV: `index`, `image` (base64), `question`, `A`..`E`, `answer`
    (a letter; absent or empty in a test split), plus category columns. `groups` maps each breakdown
    to the column names it may have (the first one present is used). With `skipped` (a 3D benchmark),
    `image` names a volume file relative to the TSV's folder instead (:func:`find_volume`): a question
    whose volume is missing or unreadable is left out and counted in `skipped` by reason."""
    rows = _read_tsv(path)
    by_index = {r.get("index", ""): r.get("image", "") for r in rows}
    column = list(rows[0]).index("image") + 1 if "image" in rows[0] else 0
    items = []
    for n, row in enumerate(rows, start=2):
        where = f"{path} line {n}"
        if not keep(row):
            continue
        options = {k: _cell(row.get(k)) for k in LETTERS if _cell(row.get(k))}
        if len(options) < 2:
            raise BenchmarkError(f"{where}: fewer than two options in columns A..E")
        answer = _cell(row.get("answer"))
        if answer and answer not in options:
            raise BenchmarkError(f"{where}: answer {answer!r} is not one of the options {', '.join(options)}")
        found = {}
        for name, columns in groups.items():
            col = next((c for c in columns if c in row), None)
            if col is None:
                raise BenchmarkError(f"{where}: missing column {' or '.join(map(repr, columns))} ({name})")
            found[name] = _cell(row[col])
        images, volume = [], None
        if skipped is None:
            images = _tsv_images(row, by_index, f"{where}, column {column} (image)")
        else:
            volume = find_volume(_need(row, "image", where), [path.parent], skipped)
            if volume is None:
                continue
        items.append(
            Item(
                id=_need(row, "index", where),
                question=_need(row, "question", where),
                kind="mc",
                answer=answer,
                images=images,
                options=options,
                groups=found,
                volume=volume,
            )
        )
    return items


def load_mc(path: Path, **_) -> list[Item]:
    """Any multiple-choice TSV in VLMEvalKit's layout, broken down by its `category` column
    (the quickstart's synthetic benchmark is one)."""
    return load_tsv(path, {"category": ("category",)})


def load_gmai_mmbench(path: Path, **_) -> list[Item]:
    """GMAI-MMBench VAL or TEST TSV (OpenGVLab/GMAI-MMBench on Hugging Face, as used by VLMEvalKit).
    VAL has answers and is scored; TEST has none and produces a submission file."""
    return load_tsv(
        path,
        {
            "clinical VQA task": ("clinical VQA task",),
            "department": ("department",),
            "perceptual granularity": ("perceptual granularity",),
            "modality": ("modality",),
        },
    )


def load_mmmu(path: Path, **_) -> list[Item]:
    """MMMU's VLMEvalKit TSV (MMMU_DEV_VAL.tsv): the Health & Medicine subjects of its validation
    split (rows whose `split` is 'validation' when that column exists). Open-ended rows (no options)
    are not part of this multiple-choice harness and are left out."""

    def keep(row: dict) -> bool:
        subject = _cell(row.get("category"))
        split_ok = _cell(row.get("split", "validation")) in ("validation", "")
        has_options = sum(1 for k in LETTERS if _cell(row.get(k))) >= 2
        return subject in MMMU_HEALTH_SUBJECTS and split_ok and has_options

    items = load_tsv(path, {"subject": ("category",)}, keep=keep)
    if not items:
        raise BenchmarkError(
            f"{path}: no Health & Medicine multiple-choice rows ({', '.join(MMMU_HEALTH_SUBJECTS)})"
        )
    return items


# ---------------------------------------------------------------- OmniMedVQA


def load_omnimedvqa(path: Path, **_) -> list[Item]:
    """OmniMedVQA (OpenGVLab/OmniMedVQA): either the native `QA_information` JSON files (a file, or a
    folder searched recursively; images under the dataset root, which is the folder holding `Images/`)
    or a VLMEvalKit-style TSV whose `category` (or `question_type`) column is the question type."""
    if path.suffix == ".tsv":
        return load_tsv(
            path,
            {"question type": ("question_type", "category"), "modality": ("modality_type", "modality")},
        )
    files = sorted(path.rglob("*.json")) if path.is_dir() else [_existing(path, "OmniMedVQA JSON")]
    if not files:
        raise BenchmarkError(f"{path}: no OmniMedVQA JSON files")
    items = []
    for file in files:
        root = next((p for p in [file.parent, *file.parents] if (p / "Images").is_dir()), file.parent)
        for n, row in enumerate(json.loads(file.read_text(encoding="utf-8"))):
            where = f"{file} entry {n}"
            options = {k: _cell(row.get(f"option_{k}")) for k in "ABCD" if _cell(row.get(f"option_{k}"))}
            gt = _need(row, "gt_answer", where).strip()
            answer = next((k for k, v in options.items() if v == gt), None)
            if answer is None:
                raise BenchmarkError(f"{where}: gt_answer {gt!r} matches no option_A..option_D")
            modality = row.get("modality_type", row.get("modality"))  # both spellings exist
            if modality is None:
                raise BenchmarkError(f"{where}: missing field 'modality_type' (or 'modality')")
            image = _find_image(_need(row, "image_path", where), [root], where)
            items.append(
                Item(
                    id=str(row.get("question_id", f"{file.stem}-{n}")),
                    question=_need(row, "question", where),
                    kind="mc",
                    answer=answer,
                    images=[image],
                    options=options,
                    groups={"question type": _need(row, "question_type", where), "modality": str(modality)},
                )
            )
    return items


# ---------------------------------------------------------------- closed/open VQA


def _closed_or_open(answer_type: str, where: str) -> Kind:
    t = answer_type.strip().upper()  # VQA-RAD has "CLOSED " with a trailing space
    if t not in ("CLOSED", "OPEN"):
        raise BenchmarkError(f"{where}: answer_type {answer_type!r} is neither CLOSED nor OPEN")
    return "closed" if t == "CLOSED" else "open"


def load_vqa_rad(path: Path, **_) -> list[Item]:
    """VQA-RAD (Lau et al. 2018, OSF: osf.io/89kps): `VQA_RAD Dataset Public.json` whose
    `phrase_type` test_freeform/test_para rows are the test split, or the common `testset.json`
    variant (every row is test). Images are searched beside the JSON, in `VQA_RAD Image Folder/`,
    `images/` and `imgs/`."""
    if path.is_dir():
        path = next(
            (path / n for n in ("testset.json", "VQA_RAD Dataset Public.json") if (path / n).exists()), path
        )
    rows = json.loads(_existing(path, "VQA-RAD JSON").read_text(encoding="utf-8"))
    roots = [path.parent / d for d in ("", "VQA_RAD Image Folder", "images", "imgs")]
    items = []
    for n, row in enumerate(rows):
        where = f"{path} entry {n}"
        phrase = row.get("phrase_type")
        if (
            phrase is not None
            and path.name != "testset.json"
            and phrase not in ("test_freeform", "test_para")
        ):
            continue
        answer_type = _need(row, "answer_type", where)
        items.append(
            Item(
                id=_need(row, "qid", where),
                question=_need(row, "question", where),
                kind=_closed_or_open(answer_type, where),
                answer=_need(row, "answer", where).strip(),
                images=[_find_image(_need(row, "image_name", where), roots, where)],
                groups={"answer type": answer_type.strip().upper()},
            )
        )
    return items


def load_slake(path: Path, *, split: str = "test", lang: str = "en", **_) -> list[Item]:
    """SLAKE 1.0 (Liu et al. 2021, www.med-vqa.com/slake): the folder holding `<split>.json` and
    `imgs/` (or the JSON itself). English by default (`lang="zh"` for Chinese)."""
    file = path / f"{split}.json" if path.is_dir() else path
    rows = json.loads(_existing(file, f"SLAKE {split} split").read_text(encoding="utf-8"))
    roots = [file.parent / "imgs"]
    items = []
    for n, row in enumerate(rows):
        where = f"{file} entry {n}"
        if _need(row, "q_lang", where) != lang:
            continue
        answer_type = _need(row, "answer_type", where)
        items.append(
            Item(
                id=_need(row, "qid", where),
                question=_need(row, "question", where),
                kind=_closed_or_open(answer_type, where),
                answer=_need(row, "answer", where).strip(),
                images=[_find_image(_need(row, "img_name", where), roots, where)],
                groups={
                    "answer type": answer_type.strip().upper(),
                    "content type": _need(row, "content_type", where),
                },
            )
        )
    if not items:
        raise BenchmarkError(f"{file}: no questions with q_lang={lang!r}")
    return items


def load_pathvqa(path: Path, **_) -> list[Item]:
    """PathVQA (He et al. 2020) as the Hugging Face release `flaviagiammarino/path-vqa` stores it: a
    Parquet file with `image` ({bytes}), `question`, `answer`. Yes/no answers are the closed
    questions. (The original pickle files are refused: convert them to Parquet.)"""
    if path.suffix == ".pkl":
        raise BenchmarkError(f"{path}: pickle files are refused (they can run code); use the Parquet release")
    import pyarrow.parquet as pq

    table = pq.read_table(_existing(path, "PathVQA Parquet file"))
    for col in ("image", "question", "answer"):
        if col not in table.column_names:
            raise BenchmarkError(f"{path}: missing column {col!r} (has: {', '.join(table.column_names)})")
    items = []
    for n, row in enumerate(table.to_pylist()):
        image = row["image"]
        data = image.get("bytes") if isinstance(image, dict) else image
        if not data:
            raise BenchmarkError(f"{path} row {n}: image has no bytes")
        answer = str(row["answer"]).strip()
        kind: Kind = "closed" if answer.lower() in ("yes", "no") else "open"
        items.append(
            Item(
                id=str(n),
                question=str(row["question"]),
                kind=kind,
                answer=answer,
                images=[base64.b64encode(data).decode()],
                groups={"answer type": kind.upper()},
            )
        )
    return items


_CHOICE_PREFIX = re.compile(r"^\s*[A-D]\s*[:.]\s*")


def load_pmc_vqa(path: Path, **_) -> list[Item]:
    """PMC-VQA (Zhang et al. 2023, xmcmic/PMC-VQA on Hugging Face): `test.csv`/`test_clean.csv` with
    `Figure_path`, `Question`, `Choice A`..`Choice D`, `Answer` (and `Answer_label` when present);
    images in `images/` or `figures/` beside the CSV."""
    with _existing(path, "PMC-VQA CSV").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    roots = [path.parent / d for d in ("images", "figures", "")]
    items = []
    for n, row in enumerate(rows, start=2):
        where = f"{path} line {n}"
        options = {k: _CHOICE_PREFIX.sub("", _need(row, f"Choice {k}", where)).strip() for k in "ABCD"}
        label = _cell(row.get("Answer_label"))
        answer_text = _need(row, "Answer", where).strip()
        by_text = {v: k for k, v in options.items()}
        if label in options:
            answer = label
        elif answer_text in options:
            answer = answer_text
        else:
            answer = by_text.get(_CHOICE_PREFIX.sub("", answer_text), "")
        if not answer:
            raise BenchmarkError(f"{where}: Answer {answer_text!r} matches no choice")
        items.append(
            Item(
                id=f"{n - 2}",
                question=_need(row, "Question", where),
                kind="mc",
                answer=answer,
                images=[_find_image(_need(row, "Figure_path", where), roots, where)],
                options=options,
                groups={},
            )
        )
    return items


# ---------------------------------------------------------------- 3D: volumes as questions' input

VOLUME_NPY = ".npy"


def volume_images(
    path: Path, tokens_per_image: int = DEFAULT_TOKENS_PER_IMAGE, volumes=None, frames: int | None = None
) -> list[Image.Image]:
    """A question's volume -> the slabs of the slices route (docs/3d.md), as the model reads a scan:
    `volumes` is its `medvl.model.build.VolumePreprocessing` (`vlm.volumes`: its training volumes' spec
    per modality and its volume budget; None: the default specs and budget). K = `slab_count` for the
    answerer's image tokens per slab and that budget. A stored array (.npy, :func:`stored_volume`) is
    cut as it is, as training cuts curated volumes; a scan (NIfTI, a DICOM series as a folder or .zip)
    is read and preprocessed by the spec for its modality, as chat and the server do. A native-route
    model (`frames`: its 3D tower's slabs) is given exactly `frames` slabs."""
    if volumes is None:
        from medvl.model.build import VolumePreprocessing

        volumes = VolumePreprocessing()
    if path.suffix.lower() == VOLUME_NPY:
        array = stored_volume(path)
        k = frames or slab_count(array.shape[1], tokens_per_image, volumes.volume_tokens)
        return volume_slabs(array, k)
    return volumes.slabs(path, tokens_per_image, frames=frames)


def stored_volume(path: Path) -> np.ndarray:
    """A volume stored as .npy -> uint8 [C, S, P, L]: medvl's own (curation's `volumes/<sha256>.npy`,
    the synthetic 3D benchmark's) as it is; M3D-Data's (floats in 0-1, [1, 32, 256, 256] = C, D, H, W)
    scaled to 0-255. A 3D array gets one channel."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise BenchmarkError(f"{path}: not a readable .npy array ({type(e).__name__})") from None
    problem = _array_problem(array.shape, array.dtype)
    if problem:
        raise BenchmarkError(f"{path}: {problem}")
    array = array if array.ndim == 4 else array[None]
    if array.dtype == np.uint8:
        return array
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise BenchmarkError(f"{path}: a float volume must hold values in 0-1 (M3D-Data's normalisation)")
    return np.rint(array * 255).astype(np.uint8)


def _array_problem(shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    if len(shape) not in (3, 4) or min(shape, default=0) < 1:
        return f"expected a [S, P, L] or [C, S, P, L] volume, got {list(shape)}"
    if dtype != np.uint8 and not np.issubdtype(dtype, np.floating):
        return f"expected uint8 or float voxels, got {dtype}"
    return None


def find_volume(name: str, roots: list[Path], skipped: Counter) -> Path | None:
    """The volume file `name` under the first of `roots` holding it, its .npy header checked (scans are
    read, with all their checks, when asked); None, with the reason counted in `skipped`, when it is
    missing or not a volume."""
    path = next((root / name for root in roots if name and (root / name).exists()), None)
    if path is None:
        skipped["volume file not found"] += 1
        return None
    if path.suffix.lower() == VOLUME_NPY:
        try:
            header = np.load(path, mmap_mode="r", allow_pickle=False)
            problem = _array_problem(header.shape, header.dtype)
        except (OSError, ValueError, EOFError):
            problem = "not a readable .npy array"
        if problem:
            skipped[f"unreadable volume ({problem})"] += 1
            return None
        return path
    if not is_scan(path):
        skipped["not a volume (.npy, .nii, .nii.gz, a DICOM series folder or .zip)"] += 1
        return None
    return path


def skip_notes(path: Path, items: list[Item], skipped: Counter, notes: list[str] | None) -> list[Item]:
    """Append one note per reason questions were skipped to `notes` (the run's report shows them);
    refuse a benchmark none of whose questions is left."""
    total = len(items) + sum(skipped.values())
    lines = [f"{n} of {total} questions skipped: {why}" for why, n in skipped.items()]
    if not items:
        raise BenchmarkError(f"{path}: no question left to ask ({'; '.join(lines) or 'no questions'})")
    if notes is not None:
        notes.extend(lines)
    return items


def load_synth3d(path: Path, *, notes: list[str] | None = None, **_) -> list[Item]:
    """The synthetic 3D multiple-choice benchmark (`medvl.synth.benchmark3d.build_synth3d`), or any TSV in
    VLMEvalKit's layout whose `image` column names a volume file (relative to the TSV's folder: a stored
    .npy array, a NIfTI file, a DICOM series folder or .zip), broken down by `category`. Questions whose
    volume is missing or unreadable are skipped and counted (`notes`)."""
    path = Path(path)
    if path.is_dir():
        path = path / "synth3d.tsv"
    skipped: Counter = Counter()
    items = load_tsv(path, {"category": ("category",)}, skipped=skipped)
    return skip_notes(path, items, skipped, notes)


# M3D-VQA's `Question Type` (BAAI-DCAI/M3D, Data/process/m3d_vqa_data_generation.py: the five aspects
# its questions were generated for, numbered in the order of the prompt).
M3D_QUESTION_TYPES = {"1": "Plane", "2": "Phase", "3": "Organ", "4": "Abnormality", "5": "Location"}
M3D_COLUMNS = ("Image Path", "Question", "Choice A", "Choice B", "Choice C", "Choice D", "Answer Choice")


def load_m3d_vqa(path: Path, *, split: str = "test", notes: list[str] | None = None, **_) -> list[Item]:
    """M3D-VQA (Bai et al. 2024, GoodBaiBai88/M3D-VQA on Hugging Face; github BAAI-DCAI/M3D): the
    closed-ended (multiple-choice) questions of `M3D_VQA_<split>.csv` (the file, or the folder holding
    it), columns `Image Path, Text, Question Type, Question, Choice A..D, Answer, Answer Choice`.
    `Image Path` is relative to M3D's data root, the CSV's folder or its parent (M3D keeps the CSV in
    `Data/data/M3D-VQA/` and the volumes under `Data/data/`): 1 x 32 x 256 x 256 arrays in 0-1, shown as
    slabs of adjacent slices. Choices M3D filled with 'NA' are left out. Rows whose volume is missing
    are skipped and counted (`notes`); breakdown by question type (Plane, Phase, Organ, Abnormality,
    Location)."""
    path = Path(path)
    if path.is_dir():
        path = path / f"M3D_VQA_{split}.csv"
    with _existing(path, "M3D-VQA CSV").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise BenchmarkError(f"{path}: no rows")
    roots = [path.parent, path.parent.parent]
    skipped: Counter = Counter()
    items = []
    for n, row in enumerate(rows, start=2):
        where = f"{path} line {n}"
        for col in M3D_COLUMNS:
            _need(row, col, where)
        letter = _cell(row["Answer Choice"]).upper()
        options = {k: _cell(row[f"Choice {k}"]) for k in "ABCD"}
        options = {k: v for k, v in options.items() if v and (v.upper() != "NA" or k == letter)}
        if letter not in options:
            letter = next((k for k, v in options.items() if v == _cell(row.get("Answer"))), "")
        if not letter:
            raise BenchmarkError(f"{where}: Answer Choice {row['Answer Choice']!r} names no choice")
        volume = find_volume(_cell(row["Image Path"]), roots, skipped)
        if volume is None:
            continue
        kind = _cell(row.get("Question Type"))
        items.append(
            Item(
                id=str(n - 2),
                question=_need(row, "Question", where).strip(),
                kind="mc",
                answer=letter,
                options=options,
                groups={"question type": M3D_QUESTION_TYPES.get(kind, kind)},
                volume=volume,
            )
        )
    return skip_notes(path, items, skipped, notes)


def ct_rate_volume_path(name: str, roots: list[Path]) -> Path | None:
    """CT-RATE keeps `valid_1_a_1.nii.gz` at `valid/valid_1/valid_1_a/valid_1_a_1.nii.gz` under its
    dataset folder; a flat copy is found too."""
    parts = name.split("_")
    nested = Path(parts[0], "_".join(parts[:2]), "_".join(parts[:3]), name) if len(parts) >= 4 else None
    for root in roots:
        for candidate in (root / name, root / nested if nested else None):
            if candidate is not None and candidate.is_file():
                return candidate
    return None


# CT-CHAT's task tokens closing a question (a VQA item's `id` starts with its task, e.g. multiple_choice_0).
CT_RATE_TASKS = ("multiple_choice", "short_answer", "long_answer", "report_generation")
_CT_RATE_TOKEN = re.compile(r"<(multiple_choice|short_answer|long_answer|report_generation)>")
_CT_RATE_CHOICE = re.compile(r"\(([a-dA-D])\)")


def _ct_rate_task(item_id: str, turn: dict) -> str:
    if turn.get("type"):
        return str(turn["type"])
    token = _CT_RATE_TOKEN.search(str(turn.get("value", "")))
    if token:
        return token.group(1)
    return next((t for t in CT_RATE_TASKS if item_id.startswith(t)), "unknown")


def _ct_rate_question(text: str, task: str, where: str) -> tuple[str, dict[str, str]]:
    """A human turn -> (question, options): `<image>` and the task token removed; a multiple-choice
    turn's `(a) ... (d) ...` choices split off."""
    text = _CT_RATE_TOKEN.sub("", text.replace("<image>", "")).strip()
    if task != "multiple_choice":
        return text, {}
    parts = _CT_RATE_CHOICE.split(text)  # [question, "a", choice, "b", choice, ...]
    options = {parts[i].upper(): parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}
    if len(options) < 2:
        raise BenchmarkError(f"{where}: a multiple-choice question without (a)..(d) choices")
    return parts[0].strip(), options


def load_ct_rate_vqa(path: Path, *, notes: list[str] | None = None, **_) -> list[Item]:
    """CT-RATE's VQA set (Hamamci et al. 2024, the CT-CHAT data in Hugging Face `ibrahimhamamci/CT-RATE`;
    github ibrahimethemhamamci/CT-CHAT): a JSON list (`valid_vqa.json`, or the file named) of
    `{"id": "<task>_<n>", "image": "valid_1_a_1.nii.gz", "conversations": [{"from": "human", "value":
    "<image>\\n...", "type": ...}, {"from": "gpt", "value": ...}, ...]}`. Each human/gpt pair is one
    question about the volume: multiple choice (`(a) ... (d) ... <multiple_choice>`, answered `(b) ...`)
    scored as options; short answers as closed (yes/no) or open questions. Long answers and report
    generation are skipped and counted (reports: `--bench ct-rate`). Volumes are found as for the report
    task (the JSON's folder, its parent or `volumes/`, flat or at CT-RATE's nested path); questions of a
    missing volume are skipped and counted (`notes`)."""
    path = Path(path)
    if path.is_dir():
        path = path / "valid_vqa.json"
    try:
        entries = json.loads(_existing(path, "CT-RATE VQA JSON").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(entries, list):
        raise BenchmarkError(f"{path}: expected a JSON list of VQA entries")
    roots = [path.parent, path.parent.parent, path.parent / "volumes"]
    skipped: Counter = Counter()
    items = []
    for n, entry in enumerate(entries):
        where = f"{path} entry {n}"
        entry_id = str(entry.get("id", n))
        turns = entry.get("conversations")
        if not isinstance(turns, list):
            raise BenchmarkError(f"{where}: missing field 'conversations' (a list of turns)")
        name = _need(entry, "image", where).strip()
        volume = ct_rate_volume_path(name, roots)
        for t in range(0, len(turns) - 1, 2):
            human, gpt = turns[t], turns[t + 1]
            task = _ct_rate_task(entry_id, human)
            if task not in ("multiple_choice", "short_answer"):
                skipped[f"{task} (not scored as VQA)"] += 1
                continue
            if volume is None:
                skipped["volume file not found"] += 1
                continue
            turn_where = f"{where} turn {t}"
            question, options = _ct_rate_question(_need(human, "value", turn_where), task, turn_where)
            reply = _need(gpt, "value", turn_where).strip()
            if options:
                letter = _CT_RATE_CHOICE.match(reply)
                answer = (
                    letter.group(1).upper()
                    if letter
                    else next((k for k, v in options.items() if v.lower() == reply.lower()), "")
                )
                if answer not in options:
                    raise BenchmarkError(f"{turn_where}: answer {reply[:60]!r} names no choice")
                kind: Kind = "mc"
            else:
                answer, kind = reply, "closed" if reply.lower().rstrip(".") in ("yes", "no") else "open"
            items.append(
                Item(
                    id=f"{entry_id}-{t // 2}",
                    question=question,
                    kind=kind,
                    answer=answer,
                    options=options,
                    groups={"question type": task},
                    volume=volume,
                )
            )
    return skip_notes(path, items, skipped, notes)


LOADERS: dict[str, Callable[..., list[Item]]] = {
    "mc": load_mc,
    "gmai-mmbench": load_gmai_mmbench,
    "omnimedvqa": load_omnimedvqa,
    "mmmu": load_mmmu,
    "vqa-rad": load_vqa_rad,
    "slake": load_slake,
    "pathvqa": load_pathvqa,
    "pmc-vqa": load_pmc_vqa,
    "synth3d": load_synth3d,
    "m3d-vqa": load_m3d_vqa,
    "ct-rate-vqa": load_ct_rate_vqa,
}


def default_train_split(bench: str, data: Path) -> Path | None:
    """The benchmark's own training split beside the evaluated data, when it ships one: SLAKE's
    `train.json` in the folder `--data` names (or beside the JSON it names). None otherwise: the
    majority baseline then comes from the evaluated answers and there is no question prior."""
    if bench != "slake":
        return None
    train = (data if data.is_dir() else data.parent) / "train.json"
    return train if train.is_file() else None


def load_benchmark(bench: str, data: Path, **options) -> list[Item]:
    if bench not in LOADERS:
        raise BenchmarkError(f"unknown benchmark {bench!r}; choose one of {', '.join(LOADERS)}")
    items = LOADERS[bench](Path(data), **options)
    seen: set[str] = set()
    for it in items:
        if it.id in seen:
            raise BenchmarkError(f"{data}: question id {it.id!r} appears twice")
        seen.add(it.id)
    return items
