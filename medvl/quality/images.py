"""Dimension 1 (image validity) and the benchmark contamination guard: decoding, size and content
checks, the two image hashes, and the index of benchmark images.

Hashes are curation's: `sha256` of the decoded display pixels (greyscale as (H, W), colour as
(H, W, 3); the shape is hashed too), so a benchmark image stored as JPEG and the same pixels stored as
PNG by curation agree; `phash`, imagehash's 64-bit pHash as an unsigned int, catches re-encoded,
resized or slightly altered copies by Hamming distance."""

from __future__ import annotations

import base64
import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medvl.errors import InputError
from medvl.imaging import content_hash, open_image, perceptual_hash, to_display

from .config import ImageThresholds

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}


def hamming(h: int, hashes: np.ndarray) -> np.ndarray:
    """Bit distances between one 64-bit hash and an array of them (uint64)."""
    return np.bitwise_count(hashes ^ np.uint64(h))


def decode(source: str | Path | bytes, name: str) -> np.ndarray:
    """A file or bytes -> the display pixels curation would store (uint8, greyscale or RGB)."""
    return to_display(open_image(source if isinstance(source, bytes) else Path(source), name))


@dataclass(frozen=True)
class ImageFacts:
    """What dimension 1 measured on one image file; `problem` is set when it did not decode."""

    file_sha256: str = ""  # of the file's bytes: the fact sheet's image_sha256
    sha256: str = ""  # of the decoded pixels
    phash: int = 0
    width: int = 0
    height: int = 0
    std: float = 0.0
    problem: str = ""


def measure(path: Path) -> ImageFacts:
    try:
        data = path.read_bytes()
    except OSError as e:
        return ImageFacts(problem=f"unreadable file ({type(e).__name__})")
    try:
        px = decode(data, str(path))
    except InputError as e:
        return ImageFacts(file_sha256=hashlib.sha256(data).hexdigest(), problem=e.problem)
    return ImageFacts(
        file_sha256=hashlib.sha256(data).hexdigest(),
        sha256=content_hash(px),
        phash=perceptual_hash(px),
        width=px.shape[1],
        height=px.shape[0],
        std=float(px.std()),
    )


def image_problems(m: ImageFacts, t: ImageThresholds) -> list[str]:
    """Dimension 1's failures on one image (duplicates are found later, across records)."""
    if m.problem:
        return ["decode"]
    out = []
    if min(m.width, m.height) < t.min_side:
        out.append("resolution")
    if max(m.width, m.height) / min(m.width, m.height) > t.max_aspect:
        out.append("aspect ratio")
    if m.std < t.min_std:
        out.append("blank")
    return out


# ------------------------------------------------------------------------------------ benchmarks


@dataclass(frozen=True)
class BenchmarkImage:
    where: str  # file (and row or entry) it came from
    sha256: str
    phash: int


def benchmark_images(path: Path) -> Iterator[BenchmarkImage]:
    """Every image of one evaluation benchmark split: a VLMEvalKit TSV (base64 `image` column), a
    SLAKE split JSON (or a folder holding `test.json` and `imgs/`), a curated Parquet set (its `split`
    == "test" records, hashes as stored), or any folder of image files (searched recursively)."""
    if path.is_dir() and (path / "test.json").is_file() and (path / "imgs").is_dir():
        path = path / "test.json"
    if path.is_file() and path.suffix == ".tsv":
        yield from _tsv_images(path)
    elif path.is_file() and path.suffix == ".json":
        yield from _slake_images(path)
    elif (
        path.suffix == ".parquet"
        or (path.is_dir() and any(path.glob("*.parquet")))
        or (path / "data").is_dir()
    ):
        yield from _curated_images(path)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        if not files:
            raise InputError(str(path), "folder", "holds no image files")
        for f in files:
            yield _hashed(f.read_bytes(), str(f))
    else:
        raise InputError(
            str(path), "benchmark", "not a TSV, a SLAKE split JSON, a curated set or an image folder"
        )


def _hashed(data: bytes, where: str) -> BenchmarkImage:
    px = decode(data, where)
    return BenchmarkImage(where, content_hash(px), perceptual_hash(px))


def _tsv_images(path: Path) -> Iterator[BenchmarkImage]:
    csv.field_size_limit(1 << 30)  # base64 images are long cells
    with path.open(encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.DictReader(f, delimiter="\t"), 2):
            cell = (row.get("image") or "").strip()
            if len(cell) < 64:  # VLMEvalKit refers to a repeated image by its row's index: seen already
                continue
            cells = json.loads(cell) if cell.startswith("[") else [cell]
            for k, b64 in enumerate(cells):
                where = f"{path} line {n}" + (f" image {k + 1}" if len(cells) > 1 else "")
                try:
                    data = base64.b64decode(b64, validate=True)
                except ValueError:
                    raise InputError(str(path), f"line {n}", "image is not valid base64") from None
                yield _hashed(data, where)


def _slake_images(path: Path) -> Iterator[BenchmarkImage]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(str(path), f"line {e.lineno}", f"not valid JSON ({e.msg})") from None
    names = sorted({r["img_name"] for r in rows if isinstance(r, dict) and "img_name" in r})
    if not names:
        raise InputError(str(path), "img_name", "no entry names an image")
    for name in names:
        f = path.parent / "imgs" / name
        if not f.is_file():
            raise InputError(str(path), "img_name", f"image not found: imgs/{name}")
        yield _hashed(f.read_bytes(), str(f))


def _curated_images(path: Path) -> Iterator[BenchmarkImage]:
    """The test-split records of a curated set: their stored hashes, or (a set written without them)
    hashes of their image bytes."""
    import pyarrow.parquet as pq

    folder = path / "data" if path.is_dir() and (path / "data").is_dir() else path
    files = [folder] if folder.is_file() else sorted(folder.glob("*.parquet"))
    for f in files:
        names = set(pq.read_schema(f).names)
        if "split" not in names:
            raise InputError(str(f), "split", "no split column: curate the source with a split option")
        stored = {"sha256", "phash"} <= names
        table = pq.read_table(f, columns=["id", "split", *(["sha256", "phash"] if stored else ["image"])])
        for row in table.to_pylist():
            if row["split"] != "test":
                continue
            if stored:
                yield BenchmarkImage(f"{f} {row['id']}", row["sha256"], int(row["phash"], 16))
            else:
                yield _hashed(row["image"]["bytes"], f"{f} {row['id']}")


def benchmark_index(paths: list[Path]) -> list[BenchmarkImage]:
    """The images of every benchmark given, each distinct pixel hash once (first place it was seen)."""
    seen: dict[str, BenchmarkImage] = {}
    for p in paths:
        for b in benchmark_images(p):
            seen.setdefault(b.sha256, b)
    return list(seen.values())


def write_index(images: list[BenchmarkImage], path: Path) -> None:
    rows = [{"where": b.where, "sha256": b.sha256, "phash": f"{b.phash:016x}"} for b in images]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


class BenchmarkGuard:
    """Looks up an image among the benchmark images: the same pixels, or a pHash within `distance`."""

    def __init__(self, rows: list[dict], distance: int) -> None:
        self.rows = rows
        self.by_sha = {r["sha256"]: r for r in rows}
        self.hashes = np.array([int(r["phash"], 16) for r in rows], dtype=np.uint64)
        self.distance = distance

    def match(self, sha256: str, ph: int) -> tuple[dict, int, bool] | None:
        """(benchmark entry, pHash distance, whether the pixels are the same) of the closest benchmark
        image within `distance`, or None."""
        if sha256 in self.by_sha:
            return self.by_sha[sha256], 0, True
        if not len(self.hashes):
            return None
        d = hamming(ph, self.hashes)
        i = int(np.argmin(d))
        return (self.rows[i], int(d[i]), False) if d[i] <= self.distance else None
