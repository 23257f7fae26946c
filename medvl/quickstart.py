from __future__ import annotations

from medvl._stub import not_yet


def quickstart() -> None:
    """Run the whole pipeline on embedded synthetic data. [being built]"""
    not_yet("quickstart", "issue 2")
