from __future__ import annotations

from medvl._stub import not_yet


def quality() -> None:
    """Five-dimension data-quality filtering (InfiMed). [not yet available]"""
    not_yet("quality", "a later issue")
