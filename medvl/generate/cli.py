from __future__ import annotations

from medvl._stub import not_yet


def generate() -> None:
    """Write the six instruction formats from curated records with a VLM. [not yet available]"""
    not_yet("generate", "a later issue (the quickstart uses medvl.synth templates)")
