from __future__ import annotations

from medvl._stub import not_yet


def train() -> None:
    """Train one stage from a YAML config. [being built]"""
    not_yet("train", "issue 2")


def pipeline() -> None:
    """Chain stages I, II, III. [being built]"""
    not_yet("pipeline", "issue 2")
