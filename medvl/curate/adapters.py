"""Source adapters, registered by name. Each lists its *items* (cheap, in the driver: one image, volume
or clip, as a small picklable dict with a unique `id`) and *loads* an item into 2D samples (in a worker),
and, for volumes whose card sets `options.volume`, one preprocessed volume too (`SourceVolume`).
A card's `options` are checked against the adapter's `Options` model. Every pixel conversion is
medvl.imaging's, with the card's `Preprocessing` (`card_preprocessing`), which each record stores."""

from __future__ import annotations

import csv
import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import ImageSequence
from pydantic import Field

from medvl.errors import InputError
from medvl.imaging import (
    Preprocessing,
    VolumeSpec,
    body_part_region,
    check_same_grid,
    label_boxes,
    make_display,
    open_image,
    read_dicom,
    read_dicom_series,
    read_volume,
    resize_spacing,
    to_display,
    to_lps,
    volume_planes,
)
from medvl.records import Strict, read_rows
from medvl.volume_facts import label_measures

from .images import as_label_array, mask_boxes, mask_regions, slice_presence

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}


@dataclass
class SourceImage:
    """One 2D image out of an item, before vocabulary mapping and encoding (done by the pipeline)."""

    pixels: np.ndarray  # uint8, (H, W) or (H, W, 3)
    file: str  # path relative to the card's root: the provenance
    index: int = -1  # slice or frame index; -1 for a plain 2D image
    index_kind: str = ""  # "slice" | "frame" | ""
    labels: list[str] = field(default_factory=list)
    boxes: list[dict] = field(default_factory=list)  # authoritative boxes
    mask_boxes: list[dict] = field(default_factory=list)  # derived from a mask, when boxes were also given
    regions: list[dict] = field(default_factory=list)  # per label of a mask (images.mask_regions)
    splits: list[str] = field(default_factory=list)  # the source's own split names for it (`from: index`)
    modality: str | None = None  # source spelling; None: the card's
    body_region: str | None = None  # source spelling; None: the card's
    meta: dict = field(default_factory=dict)


@dataclass
class SourceVolume:
    """One volume out of an item, preprocessed by its card's `VolumeSpec` (`options.volume`)."""

    array: np.ndarray  # uint8 [C, S, P, L]
    spec: VolumeSpec
    file: str  # the image file or series folder, relative to the card's root
    labels: list[str]  # labels present in the array (from the label volume on the array's grid)
    boxes: list[dict]  # 3D boxes in voxels of the array (imaging.label_boxes)
    slices: dict[str, list[int]]  # label -> [first, last + 1) slice of the array
    measures: dict[str, dict]  # label -> voxels and centroid on the array's grid (volume_facts)
    source: dict  # the input's size, spacing and orientation code
    origin_mm: list[float]  # LPS position of voxel [0, 0, 0]
    modality: str | None = None
    body_region: str | None = None
    meta: dict = field(default_factory=dict)


ADAPTERS: dict[str, type] = {}


def card_preprocessing(card) -> Preprocessing:
    """How this card's files become pixels; stored with each of its records. A card that sets none of
    these gets medvl's default, which is also every checkpoint's default, so a model trained on such data
    is served DICOM exactly as it was curated."""
    return Preprocessing(
        ct_window=card.ct_window,
        default_region=card.body_region,
        region_map=card.body_region_map,
        max_side=card.max_side,
    )


def _display(card, im) -> np.ndarray:
    return to_display(im, card_preprocessing(card))


def register(name: str):
    def deco(cls: type) -> type:
        ADAPTERS[name] = cls
        return cls

    return deco


def _files(
    root: Path, pattern: str, exts: set[str] | None = IMAGE_EXTS, exclude: str | None = None
) -> list[str]:
    if not root.is_dir():
        raise FileNotFoundError(f"source root {root} does not exist")
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.glob(pattern)
        if (p.is_file() and (exts is None or p.suffix.lower() in exts))
        and not (exclude and p.relative_to(root).match(exclude))
    )


def _box(label: str, x: float, y: float, w: float, h: float) -> dict:
    return dict(label=label, x_min=float(x), y_min=float(y), x_max=float(x + w), y_max=float(y + h))


# ---------------------------------------------------------------- 2D classification


@register("folder")
class FolderPerClass:
    """root/<class>/<image>: the folder name is the label."""

    class Options(Strict):
        pattern: str = "*/*"

    @staticmethod
    def items(card, opts, root: Path) -> list[dict]:
        return [{"id": f} for f in _files(root, opts.pattern)]

    @staticmethod
    def load(card, opts, root: Path, item: dict) -> Iterator[SourceImage]:
        im = open_image(root / item["id"], item["id"], max_pixels=card.max_pixels)
        yield SourceImage(_display(card, im), item["id"], labels=[Path(item["id"]).parent.name])


@register("table")
class LabelTable:
    """CSV or JSON / JSONL label files (a glob: several tables are read in name order): one row per image
    with one or several labels, optionally its modality, body region and a box."""

    class Options(Strict):
        file: str  # a file name or a glob, relative to the root
        image_column: str = "image"
        label_column: str | list[str] = "label"  # several: the labels of every column, in column order
        separator: str | None = None  # multi-label cells, e.g. "|"
        skip_labels: list[str] = []  # cell values that are no label (e.g. "no finding")
        label_formats: dict[
            str, str
        ] = {}  # column -> how its values read as labels, e.g. {grade: "grade {}"}
        images_dir: str = ""
        modality_column: str | None = None  # per-row modality (else the card's)
        region_column: str | None = None  # per-row body region (mapped by body_region_map)
        box_column: str | None = None  # [x_min, y_min, x_max, y_max] in pixels, maxima exclusive, or empty
        box_label_column: str | None = None  # the box's label (default: the row's first label)

    @staticmethod
    def items(card, opts, root: Path) -> list[dict]:
        files = _files(root, opts.file, None)
        if not files:
            raise ValueError(f"{root / opts.file}: no label table matches")
        label_cols = [opts.label_column] if isinstance(opts.label_column, str) else opts.label_column
        optional = [opts.modality_column, opts.region_column, opts.box_column, opts.box_label_column]
        items = []
        for file in files:
            rows = _table_rows(root / file)
            # A column the card names but the table lacks is a card error for every row: stop, do not
            # quarantine.
            for col in [opts.image_column, *label_cols, *(c for c in optional if c)]:
                if rows and col not in rows[0]:
                    raise ValueError(
                        f"{root / file}: no column {col!r} (columns: {', '.join(map(str, rows[0]))})"
                    )
            for n, row in enumerate(rows):
                labels = [
                    opts.label_formats.get(col, "{}").format(x)
                    for col in label_cols
                    for x in _cell_labels(row.get(col), opts.separator)
                    if x not in opts.skip_labels
                ]
                items.append(
                    {
                        "id": f"{file}#{n}",
                        "file": (Path(opts.images_dir) / str(row.get(opts.image_column, ""))).as_posix(),
                        "labels": labels,
                        "modality": (row.get(opts.modality_column) if opts.modality_column else None) or None,
                        "region": (row.get(opts.region_column) if opts.region_column else None) or None,
                        "box": row.get(opts.box_column) if opts.box_column else None,
                        "box_label": row.get(opts.box_label_column) if opts.box_label_column else None,
                    }
                )
        return items

    @staticmethod
    def load(card, opts, root: Path, item: dict) -> Iterator[SourceImage]:
        if not item["labels"]:
            raise InputError(item["id"], "labels", "empty label")
        if not (root / item["file"]).is_file():
            raise InputError(item["id"], opts.image_column, f"image {item['file']} not found")
        im = open_image(root / item["file"], item["file"], max_pixels=card.max_pixels)
        boxes = []
        if item["box"] not in (None, "", []):
            box = item["box"]
            if isinstance(box, str):
                box = box.replace(",", " ").split()
            try:
                x0, y0, x1, y1 = (float(v) for v in box)
            except (TypeError, ValueError):
                raise InputError(
                    item["id"], opts.box_column, f"expected [x_min, y_min, x_max, y_max], got {box!r}"
                ) from None
            label = str(item["box_label"] or item["labels"][0])
            boxes = [dict(label=label, x_min=x0, y_min=y0, x_max=x1, y_max=y1)]
        yield SourceImage(
            _display(card, im),
            item["file"],
            labels=item["labels"],
            boxes=boxes,
            modality=item["modality"],
            body_region=item["region"],
        )


def _table_rows(path: Path) -> list[dict]:
    """Rows of a CSV file, a JSON list of objects or a JSONL file."""
    if path.suffix.lower() in (".json", ".jsonl"):
        rows = read_rows(path)
    else:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    return rows


def _cell_labels(raw, separator: str | None) -> list[str]:
    """A table cell as labels: a JSON list, a separated string, or nothing (None, "")."""
    if raw is None or raw == "":
        return []
    # No separator: the cell is one label ("pleural effusion"), not split at spaces.
    values = raw if isinstance(raw, list) else str(raw).split(separator) if separator else [raw]
    return [s.strip() for s in map(str, values) if s.strip()]


@register("npz")
class NpzArrays:
    """MedMNIST's layout: an .npz per dataset with `<split>_images` (N, H, W) or (N, H, W, 3) uint8 and
    `<split>_labels` (N,) or (N, 1) class indices (the card's `label_names` name them all) or (N, K) 0/1
    multi-label columns. Records are array rows (`file` "x.npz/train_images", `index` the row); an item is
    a run of `rows_per_item` rows, so a large array is not read once per image."""

    SPLITS = True  # the array prefix is the split (train, val, test)

    class Options(Strict):
        files: str = "*.npz"
        splits: list[str] = ["train", "val", "test"]  # array prefixes read, in this order
        rows_per_item: int = Field(256, ge=1)

    @staticmethod
    def items(card, opts, root: Path) -> list[dict]:
        items = []
        for rel in _files(root, opts.files, {".npz"}):
            header = _npz_header(root / rel)
            if header is None:  # load() quarantines the file, saying why
                items.append(
                    {"id": rel, "file": rel, "prefix": None, "problem": "not a readable .npz (zip) file"}
                )
                continue
            names, rows = header
            for prefix in opts.splits:
                if f"{prefix}_images" not in names and f"{prefix}_labels" not in names:
                    continue
                n = rows.get(f"{prefix}_images")
                # An unreadable header (n None) still makes an item: load() quarantines it, saying why.
                for start in range(0, n or 1, opts.rows_per_item):
                    items.append(
                        {"id": f"{rel}/{prefix}#{start}", "file": rel, "prefix": prefix, "start": start}
                    )
            if not any(f"{p}_images" in names or f"{p}_labels" in names for p in opts.splits):
                problem = (
                    f"no {'/'.join(opts.splits)}_images arrays (has {', '.join(sorted(names)) or 'none'})"
                )
                items.append({"id": rel, "file": rel, "prefix": None, "problem": problem})
        return items

    @staticmethod
    def load(card, opts, root: Path, item: dict) -> Iterator[SourceImage]:
        rel, prefix = item["file"], item["prefix"]
        if prefix is None:
            raise InputError(rel, "arrays", item["problem"])
        images, labels = _npz_arrays(root / rel, rel, prefix)
        stop = min(len(images), item["start"] + opts.rows_per_item)
        for i in range(item["start"], stop):
            # (N, K) labels are multi-label indicators: the columns set to 1
            values = [int(labels[i])] if labels.ndim == 1 else [int(k) for k in np.nonzero(labels[i])[0]]
            yield SourceImage(
                np.ascontiguousarray(images[i]),
                f"{rel}/{prefix}_images",
                i,
                "row",
                # A class the card does not name keeps its index, and the label-space check quarantines
                # that row alone.
                labels=[card.label_names.get(v, str(v)) for v in values],
                splits=[prefix],
            )


def _npz_header(path: Path) -> tuple[set[str], dict[str, int | None]] | None:
    """Array names of an .npz and their lengths, from the .npy headers only (nothing decompressed beyond
    them); a length is None where the header cannot be read; None for a file that is no zip archive."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names, rows = set(), {}
            for member in z.namelist():
                name = member.removesuffix(".npy")
                names.add(name)
                try:
                    with z.open(member) as f:
                        major, _ = np.lib.format.read_magic(f)
                        read = (
                            np.lib.format.read_array_header_1_0
                            if major == 1
                            else np.lib.format.read_array_header_2_0
                        )
                        shape = read(f)[0]
                    rows[name] = shape[0] if shape else None
                except (ValueError, OSError, zipfile.BadZipFile):
                    rows[name] = None
            return names, rows
    except (zipfile.BadZipFile, OSError):
        return None


@lru_cache(maxsize=2)
def _npz_arrays(path: Path, rel: str, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """`<prefix>_images` and `<prefix>_labels` of an .npz, checked (cached: an item is a run of rows)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {}
            for kind in ("images", "labels"):
                name = f"{prefix}_{kind}"
                if name not in z.files:
                    raise InputError(rel, name, "array missing")
                arrays[kind] = z[name]
    except InputError:
        raise
    except Exception as e:  # zipfile, numpy and zlib raise several types for a damaged archive
        raise InputError(rel, f"{prefix}_images", f"not a readable .npz ({type(e).__name__})") from None
    images, labels = arrays["images"], arrays["labels"]
    if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] == 3)):
        raise InputError(
            rel,
            f"{prefix}_images",
            f"expected uint8 (N, H, W) or (N, H, W, 3), got {images.dtype} {images.shape}",
        )
    if labels.dtype.kind not in "iub" or labels.ndim not in (1, 2):
        raise InputError(
            rel,
            f"{prefix}_labels",
            f"expected integer (N,), (N, 1) or (N, K), got {labels.dtype} {labels.shape}",
        )
    if len(labels) != len(images):
        raise InputError(rel, f"{prefix}_labels", f"{len(labels)} labels for {len(images)} images")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    return images, labels


# ---------------------------------------------------------------- 2D detection


@register("coco")
class Coco:
    class Options(Strict):
        annotations: str
        images_dir: str = ""

    @staticmethod
    def items(card, opts, root: Path) -> list[dict]:
        coco = json.loads((root / opts.annotations).read_text())
        cats = {c["id"]: c["name"] for c in coco.get("categories", [])}
        items = {
            im["id"]: {
                "id": (Path(opts.images_dir) / im["file_name"]).as_posix(),
                "size": [im.get("width"), im.get("height")],
                "boxes": [],
            }
            for im in coco["images"]
        }
        for a in coco.get("annotations", []):
            it = items.get(a["image_id"])
            if it is None:  # an annotation for no image: nothing to attach it to; kept visible in the item
                continue
            it["boxes"].append(_box(cats.get(a["category_id"], str(a["category_id"])), *a["bbox"]))
        return sorted(items.values(), key=lambda i: i["id"])

    @staticmethod
    def load(card, opts, root: Path, item: dict) -> Iterator[SourceImage]:
        im = open_image(root / item["id"], item["id"], max_pixels=card.max_pixels)
        if item["size"][0] and tuple(item["size"]) != im.size:
            raise InputError(
                item["id"], "width/height", f"annotation says {item['size']}, image is {im.size}"
            )
        yield SourceImage(_display(card, im), item["id"], labels=_uniq(item["boxes"]), boxes=item["boxes"])


@register("voc")
class PascalVoc:
    class Options(Strict):
        annotations: str = "Annotations/*.xml"
        images_dir: str = "JPEGImages"

    @staticmethod
    def items(card, opts, root: Path) -> list[dict]:
        return [{"id": f} for f in _files(root, opts.annotations, {".xml"})]

    @staticmethod
    def load(card, opts, root: Path, item: dict) -> Iterator[SourceImage]:
        try:
            tree = ET.parse(root / item["id"]).getroot()
            fname = tree.findtext("filename")
            size = (int(tree.findtext("size/width")), int(tree.findtext("size/height")))
            # VOC corners are 1-based and inclusive: pixel column 1 is the first; records are 0-based with
            # exclusive maxima, so only the minima move.
            boxes = [
                dict(
                    label=o.findtext("name"),
                    x_min=float(o.findtext("bndbox/xmin")) - 1,
                    y_min=float(o.findtext("bndbox/ymin")) - 1,
                    x_max=float(o.findtext("bndbox/xmax")),
                    y_max=float(o.findtext("bndbox/ymax")),
                )
                for o in tree.iter("object")
            ]
        except (ET.ParseError, TypeError, ValueError) as e:
            raise InputError(item["id"], "xml", f"malformed VOC annotation ({e})") from None
        rel = (Path(opts.images_dir) / (fname or "")).as_posix()
        if not fname or not (root / rel).is_file():
            raise InputError(item["id"], "filename", f"image {rel} not found")
        im = open_image(root / rel, rel, max_pixels=card.max_pixels)
        if size != im.size:
            raise InputError(item["id"], "size", f"annotation says {size}, image {rel} is {im.size}")
        yield SourceImage(
            _display(card, im), rel, labels=_uniq(boxes), boxes=boxes, meta={"annotation": item["id"]}
        )


@register("per_image_json")
class PerImageJson:
    """One folder per image with the image, a box file ([{label: [x, y, w, h]}], SLAKE's detection.json)
    and optionally a mask (one grey level per label: card `label_names`). Index files (SLAKE's split
    JSONs) give each image's modality and body region."""

    class Options(Strict):
        images: str = "imgs/*/source.jpg"
        boxes_file: str = "detection.json"
        mask_file: str | None = "mask.png"
        index_files: list[str] = []
        index_image_key: str = "img_name"
        index_modality_key: str = "modality"
        index_region_key: str = "location"
        index_prefix: str = "imgs/"

    SPLITS = True  # an index file's name is its split (train.json, validate.json, test.json)

    @staticmethod
    def items(card, opts, root: Path) -> list[dict]:
        info: dict[str, tuple[str, str]] = {}
        splits: dict[str, list[str]] = {}
        for f in opts.index_files:
            for row in json.loads((root / f).read_text()):
                key = opts.index_prefix + row[opts.index_image_key]
                info[key] = (row[opts.index_modality_key], row[opts.index_region_key])
                if Path(f).stem not in splits.setdefault(key, []):
                    splits[key].append(Path(f).stem)
        return [
            {
                "id": f,
                "modality": info.get(f, (None, None))[0],
                "region": info.get(f, (None, None))[1],
                "splits": splits.get(f, []),
            }
            for f in _files(root, opts.images)
        ]

    @staticmethod
    def load(card, opts, root: Path, item: dict) -> Iterator[SourceImage]:
        rel = item["id"]
        folder = Path(rel).parent
        im = open_image(root / rel, rel, max_pixels=card.max_pixels)
        box_rel = (folder / opts.boxes_file).as_posix()
        try:
            raw = json.loads((root / box_rel).read_text())
            boxes = [_box(label, *xywh) for entry in raw for label, xywh in entry.items()]
        except FileNotFoundError:
            raise InputError(box_rel, "boxes", "box file missing") from None
        except (ValueError, TypeError, AttributeError) as e:
            raise InputError(box_rel, "boxes", f"expected a list of {{label: [x, y, w, h]}} ({e})") from None
        derived, regions, meta = [], [], {}
        if opts.mask_file and (root / folder / opts.mask_file).is_file():
            mrel = (folder / opts.mask_file).as_posix()
            mask = np.asarray(
                open_image(root / mrel, mrel, max_pixels=card.max_pixels, field="mask").convert("L")
            )
            if mask.shape != (im.size[1], im.size[0]):
                raise InputError(mrel, "mask", f"mask is {mask.shape[::-1]}, image {rel} is {im.size}")
            derived, meta = mask_boxes(mask, card.label_names), {"mask": mrel}
            regions = mask_regions(mask, card.label_names)
        if item["modality"] is None and card.modality is None:
            raise InputError(rel, "modality", "image is in no index file and the card sets no modality")
        yield SourceImage(
            _display(card, im),
            rel,
            labels=_uniq(boxes),
            boxes=boxes,
            mask_boxes=derived,
            regions=regions,
            modality=item["modality"],
            body_region=item["region"],
            meta=meta,
            splits=item["splits"],
        )


# ---------------------------------------------------------------- 2D segmentation


@register("mask2d")
class Mask2D:
    """Image + mask pairs; one box per connected component per label. Grey masks use `label_names`
    (value -> label); colour masks use `colours` ("#rrggbb" -> label)."""

    class Options(Strict):
        images: str = "images/*"
        masks_dir: str = "masks"
        mask_suffix: str = ".png"  # masks_dir/<image stem><suffix>
        colours: dict[str, str] = {}

    @staticmethod
    def items(card, opts, root: Path) -> list[dict]:
        return [{"id": f} for f in _files(root, opts.images)]

    @staticmethod
    def load(card, opts, root: Path, item: dict) -> Iterator[SourceImage]:
        rel = item["id"]
        mrel = (Path(opts.masks_dir) / (Path(rel).stem + opts.mask_suffix)).as_posix()
        if not (root / mrel).is_file():
            raise InputError(rel, "mask", f"mask {mrel} not found")
        im = open_image(root / rel, rel, max_pixels=card.max_pixels)
        m = open_image(root / mrel, mrel, max_pixels=card.max_pixels, field="mask")
        if m.size != im.size:
            raise InputError(mrel, "mask", f"mask is {m.size}, image {rel} is {im.size}")
        if opts.colours:
            rgb = np.asarray(m.convert("RGB")).astype(np.int32)
            code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
            names = {int(c.lstrip("#"), 16): n for c, n in opts.colours.items()}
        else:
            code, names = np.asarray(m.convert("L")), card.label_names
        boxes = mask_boxes(code, names)
        yield SourceImage(
            _display(card, im),
            rel,
            labels=_uniq(boxes),
            boxes=boxes,
            regions=mask_regions(code, names),
            meta={"mask": mrel},
        )


# ---------------------------------------------------------------- 3D volumes


class VolumeOptions(Strict):
    images: str = "**/*.nii.gz"
    exclude: str | None = None  # glob of files matched by `images` that are not images (other label volumes)
    labels: str | None = None  # label volume path template: "{dir}", "{name}", "{stem}" of the image
    axis: Literal["axial", "coronal", "sagittal"] = "axial"
    slices_per_label: int = 5  # evenly spaced slices containing each label
    negatives: int = 2  # slices containing no label
    unlabelled_slices: int = 8  # evenly spaced slices of a volume without labels
    region_from_parent: bool = False  # body region = parent folder name (mapped by body_region_map)
    # Also keep each volume whole, preprocessed by this spec (docs/3d.md), next to its slices.
    volume: VolumeSpec | None = None


def choose_slices(
    labels: np.ndarray | None, n: int, per_label: int, negatives: int, unlabelled: int
) -> list[int]:
    """Slices containing each labelled structure (evenly spaced over its extent) plus a few negatives."""
    if labels is None:
        return sorted({int(i) for i in np.linspace(0, n - 1, min(n, unlabelled)).round()})

    def spread(idx: np.ndarray, k: int) -> set[int]:
        return {int(idx[int(i)]) for i in np.linspace(0, len(idx) - 1, min(len(idx), k)).round()}

    _, present = slice_presence(labels)
    chosen: set[int] = set()
    for column in present.T:
        chosen |= spread(np.nonzero(column)[0], per_label)
    empty = np.nonzero(~present.any(axis=1))[0]
    if len(empty) and negatives:
        chosen |= spread(empty, negatives)
    return sorted(chosen)


def volume_samples(
    card, opts, img, lab, lrel: str | None, rel: str, modality: str, region: str | None, meta: dict
) -> Iterator[SourceImage | SourceVolume]:
    """Slices of one volume (and its label volume `lab`, file `lrel`, or None) as 2D samples; then, when
    the card asks for it, the whole volume through its `VolumeSpec`."""
    if img.GetDimension() != 3:
        raise InputError(rel, "image", f"expected a 3D volume, got {img.GetDimension()}D {img.GetSize()}")
    if opts.volume is not None:
        opts.volume.check_modality(modality, rel)
    lps = to_lps(img)
    vol, spacing = volume_planes(lps, opts.axis)
    labels = None
    if lab is not None:
        lab = to_lps(lab)
        check_same_grid(lps, lab, lrel)
        labels = as_label_array(volume_planes(lab, opts.axis)[0], lrel)
    prep = card_preprocessing(card)
    display, shown = make_display(prep, modality, region, vol)
    slice_meta = {**meta, **shown, "axis": opts.axis, "spacing_mm": [float(s) for s in spacing]}
    for k in choose_slices(
        labels, vol.shape[0], opts.slices_per_label, opts.negatives, opts.unlabelled_slices
    ):
        px, lk = resize_spacing(
            display(vol[k]), spacing, prep.max_side, None if labels is None else labels[k]
        )
        boxes = [] if lk is None else mask_boxes(lk, card.label_names)
        yield SourceImage(
            px,
            rel,
            k,
            "slice",
            labels=_uniq(boxes),
            boxes=boxes,
            regions=[] if lk is None else mask_regions(lk, card.label_names),
            modality=modality,
            body_region=region,
            meta=slice_meta,
        )
    if opts.volume is not None:
        # The file as read, not `lps`: the spec reorients it itself and records the file's orientation.
        v = opts.volume.apply(img, None if lab is None else lab, lrel or rel)
        larr = None if v.labels is None else as_label_array(v.labels, lrel)
        boxes, ranges = ([], {}) if larr is None else label_boxes(larr, card.label_names)
        yield SourceVolume(
            v.array,
            opts.volume,
            rel,
            labels=_uniq(boxes),
            boxes=boxes,
            slices=ranges,
            measures={} if larr is None else label_measures(larr, card.label_names),
            source=v.source,
            origin_mm=v.origin_mm,
            modality=modality,
            body_region=region,
            meta=meta,
        )


def _label_path(template: str, rel: str) -> str:
    p = Path(rel)
    name = p.name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else p.stem
    # Path() drops the "./" of a file at the root, so its label volume is recognised as one (`items`).
    return Path(template.format(dir=p.parent.as_posix(), name=name, stem=stem)).as_posix()


def _label_volume(opts, root: Path, rel: str):
    if not opts.labels:
        return None, None
    lrel = _label_path(opts.labels, rel)
    if not (root / lrel).is_file():
        raise InputError(rel, "labels", f"label volume {lrel} not found")
    return read_volume(root / lrel, lrel, "labels"), lrel


@register("nifti")
class Nifti:
    """NIfTI (or any SimpleITK-readable) volumes with optional label volumes -> 2D slices (and each volume
    whole, with `options.volume`)."""

    Options = VolumeOptions

    @staticmethod
    def items(card, opts, root: Path) -> list[dict]:
        files = _files(root, opts.images, None, opts.exclude)
        if opts.labels:  # a label volume matched by the image glob is not an image
            labels = {_label_path(opts.labels, f) for f in files}
            files = [f for f in files if f not in labels]
        return [{"id": f} for f in files]

    @staticmethod
    def load(card, opts, root: Path, item: dict) -> Iterator[SourceImage]:
        rel = item["id"]
        if card.modality is None:
            raise InputError(rel, "modality", "NIfTI carries no modality; set `modality` in the card")
        img = read_volume(root / rel, rel, "image")
        lab, lrel = _label_volume(opts, root, rel)
        region = Path(rel).parent.name if opts.region_from_parent else None
        yield from volume_samples(card, opts, img, lab, lrel, rel, card.modality, region, {})


@register("dicom")
class Dicom:
    """DICOM: single files (2D, or multi-frame -> frames) or, with `series: true`, one folder per series
    (-> slices, with an optional label volume). Headers are de-identified as soon as they are read."""

    class Options(VolumeOptions):
        images: str = "**/*.dcm"
        series: bool = False

    @staticmethod
    def items(card, opts, root: Path) -> list[dict]:
        files = _files(root, opts.images, None, opts.exclude)
        if opts.series:
            return [{"id": d} for d in sorted({Path(f).parent.as_posix() for f in files})]
        return [{"id": f} for f in files]

    @staticmethod
    def load(card, opts, root: Path, item: dict) -> Iterator[SourceImage]:
        from .deid import deidentify, technical_meta

        rel = item["id"]
        if opts.series:
            img, header = read_dicom_series(root / rel, rel, Path(opts.images).name)
            ds = deidentify(header)
            lab, lrel = _label_volume(opts, root, rel)
            modality = card.modality or str(ds.get("Modality", ""))
            region = body_part_region(ds.get("BodyPartExamined")) or card.body_region
            yield from volume_samples(card, opts, img, lab, lrel, rel, modality, region, technical_meta(ds))
            return
        dcm = read_dicom(root / rel, rel, max_pixels=card.max_pixels, max_bytes=None)
        meta = technical_meta(deidentify(dcm.ds))
        modality = card.modality or dcm.modality
        if not modality:
            raise InputError(rel, "Modality", "no Modality tag and the card sets no `modality`")
        # A multi-frame file (cine, enhanced CT/MR) carries no labels: like an unlabelled volume, it gives
        # `unlabelled_slices` evenly spaced frames rather than every one of its (often hundreds of) frames.
        chosen = choose_slices(None, dcm.frames, 0, 0, opts.unlabelled_slices)
        planes, shown = dcm.render(chosen, card_preprocessing(card), modality)
        multi = dcm.frames > 1
        for k, px in zip(chosen, planes, strict=True):
            yield SourceImage(
                px,
                rel,
                k if multi else -1,
                "frame" if multi else "",
                modality=modality,
                body_region=dcm.body_part or card.body_region,
                meta={**meta, **shown},
            )


# ---------------------------------------------------------------- video


VIDEO_EXTS = {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv"}


@register("video")
class Video:
    """Clips -> frames at `fps`, with the clip's labels (its parent folder name, folder-per-class). MP4,
    AVI, MOV, MKV, WebM, MPEG are decoded with PyAV (FFmpeg); animated GIF / multi-frame TIFF with
    Pillow; a folder of frame images is a clip at `source_fps`. A clip is kept whole or quarantined
    whole: an unreadable or truncated clip yields no frames."""

    class Options(Strict):
        clips: str = "*/*"
        fps: float = Field(1.0, gt=0)  # frames kept per second of video
        source_fps: float = Field(25.0, gt=0)  # for frame folders and TIFF stacks, which carry no timing
        max_frames: int = Field(64, ge=1)
        label_from_parent: bool = True

    @staticmethod
    def items(card, opts, root: Path) -> list[dict]:
        if not root.is_dir():
            raise FileNotFoundError(f"source root {root} does not exist")
        return [{"id": p.relative_to(root).as_posix()} for p in sorted(root.glob(opts.clips))]

    @staticmethod
    def load(card, opts, root: Path, item: dict) -> Iterator[SourceImage]:
        rel = item["id"]
        path = root / rel
        labels = [Path(rel).parent.name] if opts.label_from_parent else []
        suffix = path.suffix.lower()
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS)
            timed = ((i / opts.source_fps, f) for i, f in enumerate(files))
            pick = lambda f: _display(card, open_image(f, f"{rel}/{f.name}", max_pixels=card.max_pixels))  # noqa: E731
        elif suffix in VIDEO_EXTS:
            timed = _av_frames(path, rel, card.max_pixels)
            pick = lambda fr: fr.to_ndarray(format="rgb24")  # noqa: E731
        elif suffix in (".gif", ".tif", ".tiff", ".webp", ".png"):
            im = open_image(path, rel, max_pixels=card.max_pixels)
            timed = list(_still_frames(im, opts.source_fps))  # all times first: `pick` seeks

            def pick(k: int) -> np.ndarray:
                im.seek(k)
                return _display(card, im.convert("RGB"))
        else:
            raise InputError(rel, "file", f"not a video format this adapter reads ({suffix or 'no suffix'})")
        chosen = [(k, t, pick(fr)) for k, t, fr in at_rate(timed, opts.fps, opts.max_frames)]
        if not chosen:
            raise InputError(rel, "frames", "clip has no frames")
        for k, t, px in chosen:
            yield SourceImage(px, rel, k, "frame", labels=labels, meta={"time_s": round(t, 3)})


def at_rate(frames: Iterable[tuple[float, object]], fps: float, max_frames: int) -> Iterator[tuple]:
    """From (time in s, frame) pairs in presentation order, the frame on screen at each instant
    t0 + k / fps (t0: the first frame's time) up to the last frame's time, at most `max_frames` of them,
    as (frame index, time, frame). Reading stops once they are chosen: a long clip is not decoded to its
    end."""
    eps = 1e-6
    k, n, t0, prev = 0, 0, None, None
    for i, (t, fr) in enumerate(frames):
        if t0 is None:
            t0 = t
        elif t0 + k / fps < t - eps:  # instant k falls while the previous frame is on screen
            yield prev
            n += 1
            if n == max_frames:
                return
            k = max(k + 1, math.ceil((t - t0 - eps) * fps))
        prev = (i, t, fr)
    if prev is not None and t0 + k / fps <= prev[1] + eps:
        yield prev


def _still_frames(im, source_fps: float) -> Iterator[tuple[float, int]]:
    """Frame times of a GIF / TIFF stack from the per-frame durations (TIFF has none: `source_fps`)."""
    t = 0.0
    for k, fr in enumerate(ImageSequence.Iterator(im)):
        yield t, k
        t += (fr.info.get("duration") or 1000.0 / source_fps) / 1000.0


def _av_frames(path: Path, rel: str, max_pixels: int) -> Iterator[tuple[float, object]]:
    """Decoded frames of the first video stream with their presentation times. A clip whose container
    promises more frames than can be decoded is truncated."""
    import av

    try:
        container = av.open(str(path))
    except av.FFmpegError as e:
        raise InputError(rel, "file", f"not a readable video ({_av_reason(e)})") from None
    with container:
        if not container.streams.video:
            raise InputError(rel, "file", "no video stream")
        stream = container.streams.video[0]
        w, h = stream.codec_context.width, stream.codec_context.height
        if w * h > max_pixels or not w or not h:
            raise InputError(rel, "frames", f"{w}x{h} frames (max_pixels={max_pixels})")
        rate = float(stream.average_rate or 25)
        n = 0
        try:
            for frame in container.decode(stream):
                yield (frame.time if frame.time is not None else n / rate), frame
                n += 1
        except av.FFmpegError as e:
            raise InputError(
                rel, "frames", f"corrupt or truncated video data after {n} frames ({_av_reason(e)})"
            ) from None
        if stream.frames and n < stream.frames:
            raise InputError(
                rel, "frames", f"truncated: decoded {n} of the {stream.frames} frames it declares"
            )


def _av_reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or type(e).__name__


def _uniq(boxes: list[dict]) -> list[str]:
    return list(dict.fromkeys(b["label"] for b in boxes))
