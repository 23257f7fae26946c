from __future__ import annotations

from medvl._stub import not_yet


def curate() -> None:
    """Ingest labelled datasets (2D, 3D, video) into traceable records. [not yet available]"""
    not_yet("curate", "issue 4")
