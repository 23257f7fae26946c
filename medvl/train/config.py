"""Stage configs: one YAML file per training stage, with the rows of GMAI-VL's Table 8.

Unknown keys and wrong types fail before anything is loaded, naming the key and the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Freeze(Strict):
    """Table 8's first three rows: which components keep their weights."""

    llm: bool
    projector: bool
    vision: bool


class DataSource(Strict):
    path: Path  # LLaVA-style JSON or JSONL
    image_root: Path | None = None  # image paths are relative to this (default: the file's folder)


class StageConfig(Strict):
    stage: str  # a human name, e.g. "I: shallow alignment"
    model: Path  # folder of the model to start from (a build, or the previous stage's final/)
    output_dir: Path
    data: list[DataSource] = Field(min_length=1)

    freeze: Freeze
    packing: Literal["none", "soft"] = "none"
    lr: float = Field(gt=0)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    optimizer: Literal["adamw"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = 1.0
    image_size: int | None = None  # must match the vision tower
    global_batch_size: int = Field(gt=0)
    micro_batch_size: int = Field(gt=0)
    max_length: int = Field(2048, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    seed: int = 0
    num_workers: int = Field(0, ge=0)

    log_every: int = Field(10, gt=0)
    save_every: int | None = Field(None, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    peak_flops: float | None = None  # for MFU; default: known GPU peak, or measured on CPU

    @model_validator(mode="after")
    def _check(self) -> StageConfig:
        if self.freeze.llm and self.freeze.projector and self.freeze.vision:
            raise ValueError("freeze: every component is frozen, nothing would train")
        return self


def load_config(path: str | Path, base_dir: Path | None = None, **overrides) -> StageConfig:
    """Read a stage YAML. Relative paths in it are relative to `base_dir` (default: the current
    directory, like any CLI). `overrides` replace top-level keys (None leaves the file's value)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of keys to values at the top level")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = StageConfig(**raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "<top level>"
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown key '{key}'")
            else:
                problems.append(f"key '{key}': {err['msg']} (got {err.get('input')!r})")
        raise ValueError(f"{path}: invalid config: " + "; ".join(problems)) from None
    if base_dir is not None:
        cfg.model = base_dir / cfg.model
        cfg.output_dir = base_dir / cfg.output_dir
        for d in cfg.data:
            d.path = base_dir / d.path
            d.image_root = base_dir / d.image_root if d.image_root else None
    return cfg
