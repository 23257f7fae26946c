"""A file's bytes, with the limits every reader applies before decoding anything."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medvl.errors import InputError

# Decompression bombs: images above this many pixels (a DICOM: per frame) are refused from their
# header, before any pixel is decoded.
MAX_PIXELS = 50_000_000
# Files above this many bytes are refused before they are read into memory.
MAX_BYTES = 256 * 1024 * 1024


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: 128-byte preamble then `DICM`."""
    return data[128:132] == b"DICM"


def read_bytes(source: str | Path | bytes, name: str, max_bytes: int | None = MAX_BYTES) -> bytes:
    """The bytes of a file (or the bytes given), refused when empty or above `max_bytes` (None: no
    limit), the size checked before reading."""
    check_size(source, name, max_bytes)
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def check_size(source: str | Path | bytes, name: str, max_bytes: int | None) -> None:
    n = len(source) if isinstance(source, bytes) else Path(source).stat().st_size
    if n == 0:
        raise InputError(name, "file", "empty file")
    if max_bytes is not None and n > max_bytes:
        raise InputError(name, "file", f"{n} bytes, above the {max_bytes}-byte limit")


def store_volume(root: str | Path, array: np.ndarray) -> str:
    """`root/volumes/<sha256>.npy` (plain .npy, no pickle; named by `content_hash` of the array), written
    to a temp file then renamed, so a killed job leaves a whole file or a temp one, and two workers
    writing the same volume write the same bytes. Returns the path relative to `root`."""
    from .hashing import content_hash

    rel = f"volumes/{content_hash(array)}.npy"
    path = Path(root) / rel
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a name
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    return rel
