"""Records: the rows stages pass to each other, and the one way to read row files.

- `Strict`: the pydantic base of every config and card model (unknown keys are errors, so a typo in a
  YAML file fails loudly instead of being ignored).
- `CURATED_COLUMNS`: the curated-record schema (`medvl curate` writes it, generation reads it), one
  documented entry per column; `curated_features()` / `curated_schema()` give it as Hugging Face
  features / an Arrow schema. Columns added later carry a default that `with_defaults(row)` fills in for
  rows of older curated sets (which `read_rows` returns as they are).
- `read_rows(path)`: a JSON list, JSONL or Parquet file (or a folder of Parquet files) as dicts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from medvl.errors import InputError

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa


class Strict(BaseModel):
    """A model that refuses keys it does not declare."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # "string" | "int32" | "image" | "strings" (a list) | "boxes" (a list of pixel boxes)
    doc: str
    # What a reader assumes when a file written before this column existed lacks it (`with_defaults`);
    # None: the column has always been written.
    default: str | None = None


CURATED_COLUMNS: tuple[Column, ...] = (
    Column("id", "string", "Provenance id `source/file[#sliceN|#frameN]`; unique within a curated set."),
    Column("image", "image", "The 2D image (slice, frame) as PNG bytes; decoded to a PIL image on load."),
    Column("width", "int32", "Image width in pixels."),
    Column("height", "int32", "Image height in pixels."),
    Column("modality", "string", "Imaging modality, one of `medvl.vocab.MODALITIES`."),
    Column("body_region", "string", "One of `medvl.vocab.BODY_REGIONS`; empty when the source does not say."),
    Column("department", "string", "Clinical department, one of `medvl.vocab.DEPARTMENTS`."),
    Column("original_task", "string", "The source dataset's task, one of `medvl.vocab.ORIGINAL_TASKS`."),
    Column("clinical_task", "string", "One of `medvl.vocab.CLINICAL_TASKS`, by label or the card's default."),
    Column(
        "labels", "strings", "The image's labels after the card's `label_map`, each once, in source order."
    ),
    Column(
        "boxes",
        "boxes",
        "Authoritative boxes: `label, x_min, y_min, x_max, y_max` in pixels of the stored image, maxima "
        "exclusive (given by the source, or derived from its mask when it gave none).",
    ),
    Column(
        "mask_boxes",
        "boxes",
        "Boxes derived from a mask when the source also gave boxes; kept to check one against the other.",
    ),
    Column("source", "string", "The dataset card's `name`."),
    Column("license", "string", "The source's licence, as its card states it."),
    Column("file", "string", "The source file (or series folder), relative to the card's root."),
    Column("index", "int32", "Slice or frame index within `file`; -1 for a plain 2D image."),
    Column(
        "index_kind",
        "string",
        '"slice", "frame", "row" (a row of an array file such as an .npz), or empty for a plain 2D image.',
    ),
    Column("sha256", "string", "SHA-256 of the decoded pixels (exact-duplicate key, format-independent)."),
    Column("phash", "string", "64-bit perceptual hash of the image, 16 hex digits (near-duplicate key)."),
    Column(
        "duplicate_of", "string", "Id of the earlier record this one nearly or exactly repeats (flag policy)."
    ),
    Column(
        "meta",
        "string",
        "JSON object: spacing, CT window, axis, frame time, allow-listed technical DICOM tags.",
    ),
    Column(
        "preprocessing",
        "string",
        "JSON `medvl.imaging.Preprocessing` the source file was rendered with (CT window policy, "
        "percentiles, max side); a model trained on the record is served with the same.",
    ),
    Column(
        "split",
        "string",
        '"train", "validation" or "test" as the source defines it (the card\'s `split`), never guessed; '
        '"" when the source defines none or does not list the item.',
        default="",
    ),
    Column(
        "annotation",
        "string",
        'JSON `{"exhaustive": bool, "label_space": [sorted labels]}`: the card\'s label space, and whether '
        "the source annotates every one of them on every image (then a label absent from `labels` is a "
        "verified negative).",
        default=json.dumps({"exhaustive": False, "label_space": []}),
    ),
    Column(
        "regions",
        "string",
        'JSON list, one entry per label of a mask: `{"label", "area_share" (label pixels / image pixels), '
        '"cx", "cy" (centroid, 0-1 of width / height), "x_min", "y_min", "x_max", "y_max" (pixels, maxima '
        "exclusive)}`; `[]` when the source has no mask.",
        default="[]",
    ),
    Column(
        "kind",
        "string",
        '"image": a 2D image, slice or frame, in `image`. "volume": a whole preprocessed 3D volume (id '
        "`source/file#volume`), stored beside the Parquet files as `volume`'s `file`; its `image` is null, "
        "`width`/`height` are the array's columns/rows, `labels` those present anywhere in it, `boxes` and "
        "`regions` empty (its 3D boxes are in `volume`), `phash` empty (volumes are deduplicated exactly).",
        default="image",
    ),
    Column(
        "volume",
        "string",
        'JSON, for kind "volume" (else ""): `file` (`volumes/<sha256>.npy`, a uint8 [C, S, P, L] array in '
        "LPS: read with `np.load(..., allow_pickle=False)`), `shape`, `channels` (one name per channel), "
        "`spacing_mm` and `origin_mm` (LPS position of voxel [0, 0, 0]) of the array, `source` (the file's "
        "own `size`, `spacing_mm` in its axis order and `orientation` code, e.g. RAS), `boxes` (per "
        "connected component of a label: `label, z_min, y_min, x_min, z_max, y_max, x_max` in voxels of "
        "the array, maxima exclusive), `slices` (label -> [first, last + 1) slice) and `measures` (label -> "
        "`voxels` and `centroid` [slice, row, column] on the array's grid). docs/3d.md.",
        default="",
    ),
    Column(
        "volume_spec",
        "string",
        'JSON `medvl.imaging.VolumeSpec`, for kind "volume" (else ""): how the array was made from the '
        "file; `VolumeSpec.apply` makes it again, in training, evaluation and serving alike.",
        default="",
    ),
)


def with_defaults(row: dict) -> dict:
    """A curated row with every column added since it was written set to its documented default
    (`split` "", `annotation` not exhaustive with an empty label space, `regions` []), so readers of
    older curated sets need no special case."""
    missing = {c.name: c.default for c in CURATED_COLUMNS if c.default is not None and c.name not in row}
    return {**missing, **row}


def curated_features() -> datasets.Features:
    """The curated-record columns as Hugging Face features (`image` decodes to PIL)."""
    import datasets as hf

    box = hf.List(
        {
            k: hf.Value("string") if k == "label" else hf.Value("float32")
            for k in ("label", "x_min", "y_min", "x_max", "y_max")
        }
    )
    types = {
        "string": hf.Value("string"),
        "int32": hf.Value("int32"),
        "image": hf.Image(),
        "strings": hf.List(hf.Value("string")),
        "boxes": box,
    }
    return hf.Features({c.name: types[c.type] for c in CURATED_COLUMNS})


def curated_schema() -> pa.Schema:
    """The Arrow schema curated Parquet files are written with (it carries the features as metadata,
    so `datasets.load_dataset("parquet", ...)` decodes `image`)."""
    return curated_features().arrow_schema


def read_rows(path: str | Path | Sequence[str | Path]) -> list[dict]:
    """Rows as dicts from a JSON list, a JSONL file, a Parquet file, a folder of Parquet files (sorted by
    name, e.g. a curated set's `data/`) or a list of any of these, in order.

    JSON vs JSONL is decided by the first character (`[`: a list), so a `.json` file holding one object
    per line reads too. Bad input raises `InputError` naming the file and the line."""
    if isinstance(path, (list, tuple)):
        return [row for p in path for row in read_rows(p)]
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise InputError(str(path), "folder", "holds no .parquet files")
        return [row for f in files for row in read_rows(f)]
    if not path.is_file():
        raise InputError(str(path), "file", "not found")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise InputError(str(path), "file", f"not a readable Parquet file ({type(e).__name__})") from None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(str(path), "file", "not UTF-8 text") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(str(path), f"line {e.lineno}", f"not valid JSON ({e.msg})") from None
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise InputError(str(path), f"[{i}]", f"expected a JSON object, got {type(row).__name__}")
        return rows
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(str(path), f"line {i}", f"not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise InputError(str(path), f"line {i}", f"expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows
