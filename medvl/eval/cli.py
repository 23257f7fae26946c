from __future__ import annotations

from medvl._stub import not_yet


def eval_cmd() -> None:
    """Evaluate a model on medical VQA benchmarks. [not yet available]"""
    not_yet("eval", "issue 5")
