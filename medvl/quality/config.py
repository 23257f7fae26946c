"""The thresholds of `medvl quality` (a YAML file; the shipped defaults are `thresholds.yaml` beside
this module). Unknown keys and wrong types are refused with the file and the key."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import Field

from medvl.data.mix import read_yaml_model
from medvl.records import Strict


class ImageThresholds(Strict):
    min_side: int = Field(32, ge=1)
    max_aspect: float = Field(6.0, ge=1)
    min_std: float = Field(3.0, ge=0)
    duplicate_phash: int = Field(4, ge=0, le=64)
    benchmark_phash: int = Field(6, ge=0, le=64)


class FidelityThresholds(Strict):
    pass


class AlignmentThresholds(Strict):
    blind_answerable: Literal["reject", "flag"] = "reject"
    prior_min_support: int = Field(20, ge=1)
    prior_min_share: float = Field(0.95, gt=0, le=1)
    short_answer_words: int = Field(6, ge=1)


class LanguageThresholds(Strict):
    max_repetition: float = Field(0.35, ge=0, le=1)
    min_lang_confidence: float = Field(0.8, ge=0, le=1)
    near_duplicate_jaccard: float = Field(0.9, gt=0, le=1)
    minhash_permutations: int = Field(128, ge=16)


class ClinicalThresholds(Strict):
    min_score: int = Field(1, ge=0, le=2)
    judge_send_image: bool = False
    judge_max_tokens: int = Field(400, ge=16)


class Thresholds(Strict):
    image: ImageThresholds = ImageThresholds()
    fidelity: FidelityThresholds = FidelityThresholds()
    alignment: AlignmentThresholds = AlignmentThresholds()
    language: LanguageThresholds = LanguageThresholds()
    clinical: ClinicalThresholds = ClinicalThresholds()


def default_thresholds_path() -> Path:
    return Path(str(resources.files("medvl.quality") / "thresholds.yaml"))


def load_thresholds(path: str | Path | None = None) -> Thresholds:
    """The thresholds of a YAML file (default: the shipped `thresholds.yaml`); a key left out takes
    its default."""
    return read_yaml_model(path if path is not None else default_thresholds_path(), Thresholds)
