from __future__ import annotations

from medvl._stub import not_yet


def serve() -> None:
    """OpenAI-compatible API server. [not yet available]"""
    not_yet("serve", "issue 3")


def ui() -> None:
    """Web demo. [not yet available]"""
    not_yet("ui", "issue 3")
