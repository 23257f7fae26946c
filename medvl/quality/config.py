"""The thresholds of `medvl quality`: the shipped `thresholds.yaml` beside this module holds every
default; a user's YAML overrides some keys of it. Unknown keys and wrong types are refused with the file
and the key."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import Field

from medvl.data.mix import as_model, read_yaml
from medvl.records import Strict


class ImageThresholds(Strict):
    min_side: int = Field(ge=1)
    max_aspect: float = Field(ge=1)
    min_std: float = Field(ge=0)
    duplicate_phash: int = Field(ge=0, le=64)
    benchmark_phash: int = Field(ge=0, le=64)


class FidelityThresholds(Strict):
    pass


class AlignmentThresholds(Strict):
    blind_answerable: Literal["reject", "flag"]
    prior_min_support: int = Field(ge=1)
    prior_min_share: float = Field(gt=0, le=1)
    short_answer_words: int = Field(ge=1)


class LanguageThresholds(Strict):
    max_repetition: float = Field(ge=0, le=1)
    min_lang_confidence: float = Field(ge=0, le=1)
    near_duplicate_jaccard: float = Field(gt=0, le=1)
    minhash_permutations: int = Field(ge=16)


class ClinicalThresholds(Strict):
    min_score: int = Field(ge=0, le=2)
    judge_send_image: bool
    judge_max_tokens: int = Field(ge=16)


class Thresholds(Strict):
    image: ImageThresholds
    fidelity: FidelityThresholds
    alignment: AlignmentThresholds
    language: LanguageThresholds
    clinical: ClinicalThresholds


def default_thresholds_path() -> Path:
    return Path(str(resources.files("medvl.quality") / "thresholds.yaml"))


def load_thresholds(path: str | Path | None = None) -> Thresholds:
    """The shipped `thresholds.yaml` (the one place defaults live), with the sections and keys of the
    YAML file at `path` laid over it."""
    raw = read_yaml(default_thresholds_path())
    if path is not None:
        for section, values in read_yaml(path).items():
            if isinstance(values, dict) and isinstance(raw.get(section), dict):
                raw[section] = {**raw[section], **values}
            else:
                raw[section] = values
    return as_model(raw, Thresholds, path if path is not None else default_thresholds_path())
