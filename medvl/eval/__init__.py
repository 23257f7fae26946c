"""Evaluation: medical VQA benchmarks, VLMEvalKit-style scoring, reports with published reference rows.
See docs/eval.md."""

from medvl.eval.benchmarks import BenchmarkError, Item, load_benchmark
from medvl.eval.harness import APIModel, LocalModel, evaluate, rescore
from medvl.eval.matching import extract_choice
from medvl.eval.scoring import normalize_answer, score, token_recall

__all__ = [
    "APIModel",
    "BenchmarkError",
    "Item",
    "LocalModel",
    "evaluate",
    "extract_choice",
    "load_benchmark",
    "normalize_answer",
    "rescore",
    "score",
    "token_recall",
]
