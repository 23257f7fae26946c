"""Benchmark loaders: each reads the files a user downloaded into a list of :class:`Item`.

Every loader says in its docstring where the data comes from and raises :class:`BenchmarkError`
naming the file, the column and the problem when something is missing. Images are kept as their
source (a path or base64 text) and decoded only when a batch needs them.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image

from medvl.imaging import DEFAULT_PREPROCESSING, Preprocessing, read_image
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

    def prompt(self) -> str:
        return build_prompt(self.question, self.options)

    def load_images(
        self, size: int | None = None, preprocessing: Preprocessing = DEFAULT_PREPROCESSING
    ) -> list[Image.Image]:
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
) -> list[Item]:
    """A VLMEvalKit multiple-choice TSV: `index`, `image` (base64), `question`, `A`..`E`, `answer`
    (a letter; absent or empty in a test split), plus category columns. `groups` maps each breakdown
    to the column names it may have (the first one present is used)."""
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
        items.append(
            Item(
                id=_need(row, "index", where),
                question=_need(row, "question", where),
                kind="mc",
                answer=answer,
                images=_tsv_images(row, by_index, f"{where}, column {column} (image)"),
                options=options,
                groups=found,
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


LOADERS: dict[str, Callable[..., list[Item]]] = {
    "mc": load_mc,
    "gmai-mmbench": load_gmai_mmbench,
    "omnimedvqa": load_omnimedvqa,
    "mmmu": load_mmmu,
    "vqa-rad": load_vqa_rad,
    "slake": load_slake,
    "pathvqa": load_pathvqa,
    "pmc-vqa": load_pmc_vqa,
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
