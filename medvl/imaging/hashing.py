"""Image identity keys, shared by curation (duplicates), quality (the benchmark contamination guard) and
anything else that must decide whether two images are the same: one definition, so a hash stored at
curation matches one computed later."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image


def content_hash(arr: np.ndarray) -> str:
    """Exact duplicates: SHA-256 of the decoded pixels and their shape, so that one image stored as JPEG
    in one dataset and PNG in another is still caught when the pixels agree."""
    h = hashlib.sha256(str(arr.shape).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def perceptual_hash(arr: np.ndarray) -> int:
    """64-bit pHash (imagehash) as an unsigned int, for near-duplicate search by Hamming distance."""
    import imagehash

    im = Image.fromarray(arr)
    if max(im.size) > 128:  # pHash looks at 32x32 anyway; a box reduction first is much cheaper than Lanczos
        im = im.reduce(max(im.size) // 128)
    bits = imagehash.phash(im).hash.flatten()
    return int(np.packbits(bits).view(">u8")[0])
