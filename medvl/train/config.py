"""Stage configs: one YAML file per training stage, with the rows of GMAI-VL's Table 8.

Unknown keys and wrong types fail before anything is loaded, naming the key and the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from medvl.imaging import VolumeSpec
from medvl.model.build import check_volume_specs
from medvl.records import Strict


class Freeze(Strict):
    """Table 8's first three rows: which components keep their weights."""

    llm: bool
    projector: bool
    vision: bool


class DataSource(Strict):
    path: Path  # LLaVA-style JSON or JSONL
    image_root: Path | None = None  # image paths are relative to this (default: the file's folder)


class ResolutionStep(Strict):
    """One phase of a progressive-resolution schedule: images at `size` px until `until_step`
    (exclusive; the last phase leaves it out and runs to the end of the stage)."""

    size: int = Field(gt=0)
    until_step: int | None = Field(None, gt=0)


class LoraTarget(Strict):
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    target_modules: list[str] | None = None  # linear-layer names; default: every projection of the block


class Lora(Strict):
    """LoRA adapters (peft) in place of full training for the named components; the final model is
    merged back into plain weights. Components not named here train fully unless frozen."""

    llm: LoraTarget | None = None
    vision: LoraTarget | None = None
    dropout: float = Field(0.05, ge=0, lt=1)
    quantize_4bit: bool = False  # QLoRA: the frozen base in 4-bit NF4 (bitsandbytes, CUDA only)


class StageConfig(Strict):
    stage: str  # a human name, e.g. "I: shallow alignment"
    model: Path  # folder of the model to start from (a build, or the previous stage's final/)
    output_dir: Path
    # How DICOM/NIfTI training files become pixels (a preprocessing JSON, e.g. the `preprocessing` of
    # the curated records); saved with the checkpoint. Default: the starting model's.
    preprocessing: Path | None = None
    data: list[DataSource] = Field(min_length=1)
    # Volume samples (the slices route, docs/3d.md): the image tokens one volume may take, which set its
    # number of slabs K = volume_tokens // the model's tokens per image; and the specs of the curated
    # volumes (a card's `volume:`, at most one CT and one other). Both are saved with the model, which
    # chat and serving read scans with. Default: the starting model's (4096 tokens and medvl's default
    # specs for a new build).
    volume_tokens: int | None = Field(None, gt=0)
    volume_specs: list[VolumeSpec] | None = None

    freeze: Freeze
    # soft: whole samples packed into rows, each attending only to itself: with varlen attention the
    # whole micro-batch in one row, with sdpa/eager rows of up to max_length tokens
    packing: Literal["none", "soft"] = "none"
    # token: every assistant token of the global batch weighs the same (long answers count more);
    # sample: mean over samples of each sample's mean token loss
    loss_normalization: Literal["token", "sample"] = "token"
    # deal each global batch into micro-batches of similar lengths (less padding), spread so that
    # every rank gets the same number of tokens
    group_by_length: bool = True
    # auto: varlen (per-sample attention, medvl.model.attention) for packed rows, sdpa otherwise
    attn_implementation: Literal["auto", "varlen", "sdpa", "eager", "flash_attention_2"] = "auto"
    gradient_checkpointing: bool = False
    resolution_schedule: list[ResolutionStep] | None = None  # progressive resolution, low to high
    lora: Lora | None = None
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
    # DataLoader processes that read images and build batches while the model trains.
    # auto: none without a GPU (they would take cores from the compute), else up to 4 per GPU.
    num_workers: int | Literal["auto"] = "auto"

    log_every: int = Field(10, gt=0)
    save_every: int | None = Field(None, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    peak_flops: float | None = None  # for MFU; default: known GPU peak, or measured on CPU

    @field_validator("volume_specs")
    @classmethod
    def _one_spec_per_kind(cls, v: list[VolumeSpec] | None) -> list[VolumeSpec] | None:
        if v is not None:
            check_volume_specs(v)
        return v

    @model_validator(mode="after")
    def _check(self) -> StageConfig:
        if self.freeze.llm and self.freeze.projector and self.freeze.vision:
            raise ValueError("freeze: every component is frozen, nothing would train")
        if self.lora is not None:
            for part in ("llm", "vision"):
                if getattr(self.lora, part) is not None and getattr(self.freeze, part):
                    raise ValueError(
                        f"lora.{part} is set but freeze.{part} is true: unfreeze it to train adapters"
                    )
            if self.lora.llm is None and self.lora.vision is None:
                raise ValueError("lora: name at least one component (llm, vision)")
        if self.resolution_schedule:
            ends = [r.until_step for r in self.resolution_schedule]
            if ends[-1] is not None or any(e is None for e in ends[:-1]):
                raise ValueError(
                    "resolution_schedule: every phase but the last needs until_step; the last has none"
                )
            if ends[:-1] != sorted(set(ends[:-1])):
                raise ValueError("resolution_schedule: until_step must increase from phase to phase")
        return self

    def image_size_at(self, step: int) -> int | None:
        """The input size of the progressive-resolution schedule at optimizer step `step` (None: the
        vision tower's own)."""
        if not self.resolution_schedule:
            return None
        return next(r.size for r in self.resolution_schedule if r.until_step is None or step < r.until_step)


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
        cfg.preprocessing = base_dir / cfg.preprocessing if cfg.preprocessing else None
        for d in cfg.data:
            d.path = base_dir / d.path
            d.image_root = base_dir / d.image_root if d.image_root else None
    return cfg
