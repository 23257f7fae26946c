"""The interface every generation backend implements, and how the pipeline seeds it.

A backend turns one fact sheet into raw samples of one format in one language. The pipeline owns
everything around it: which formats and languages a record gets, the seed, the image file (written to
`images/<facts.image_sha256>.png` in the output folder before `write` is called, so a backend that sends
the image reads it there), ids, provenance, validation and the output files. A raw sample is a dict
with `conversations` (LLaVA turns, the image token at the start of the first human turn unless the format
is "text") plus `options` and `answer` (perception) or `box` (region); the pipeline sets the other keys.

Determinism: `write` is called with a generator seeded by (run seed, record id, format) only, the same
for the English sample and its Chinese version, so a backend that draws the same numbers in both
languages writes a Chinese sample with the English one's letters, numbers and boxes.
"""

from __future__ import annotations

import hashlib

import numpy as np

from medvl.samples import FactSheet


class Backend:
    name: str = ""
    model: str = ""
    prompt_version: str = ""
    # Writes samples of volume records: the template backend, whose 3D writers are
    # medvl.generate.volume's (the pipeline calls them); for any other, volume records are skipped.
    volumes: bool = False

    def config(self) -> dict:
        """Everything about the backend that changes its output (part of the job's fingerprint)."""
        return {"backend": self.name, "model": self.model, "prompt_version": self.prompt_version}

    def setup(self) -> None:
        """Once per worker process before its first record (clients, caches)."""

    def write(self, facts: FactSheet, fmt: str, lang: str, rng: np.random.Generator) -> list[dict]:
        """Raw samples of format `fmt` in language `lang`; [] when the record cannot support the format
        (a region caption without a box). The pipeline asks for English first, then for Chinese with a
        generator seeded the same way."""
        raise NotImplementedError


def seeded(seed: int, record_id: str, *parts: str) -> np.random.Generator:
    """A generator that depends only on the run seed, the record id and `parts` (not on worker, order or
    process): SHA-256 of them, so it is stable across Python versions and machines."""
    key = "\x1f".join([str(seed), record_id, *parts]).encode()
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:16], "big"))
