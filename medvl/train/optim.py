"""The optimizer and learning-rate schedule, shared by the stages and the pretraining of the tiny
parts: AdamW, and transformers' schedules with a linear warm-up."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from transformers import get_scheduler


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    *,
    fused: bool = False,
    cpu_adam: bool = False,
) -> torch.optim.Optimizer:
    """AdamW. `fused`: one kernel for the whole update (on GPU; the transformers Trainer default
    too). `cpu_adam`: DeepSpeed's vectorised CPU Adam in AdamW mode, the same update: ZeRO-Offload
    keeps optimizer state in CPU memory and refuses torch's AdamW there (compiled on first use)."""
    params = list(params)
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, betas=betas, weight_decay=weight_decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)


def lr_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: Literal["cosine", "constant"],
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' schedules, stepped once per optimizer step: a linear warm-up from 0 over
    `warmup_steps` (step s of the warm-up trains at s / warmup_steps of the peak, so step 0 at 0: with
    3 warm-up steps the first only fills AdamW's moments; with none the first step is at the peak),
    then `cosine` decay to `min_lr_ratio` x the peak at `total_steps`, or `constant` at the peak."""
    if schedule == "cosine":
        return get_scheduler(
            "cosine_with_min_lr",
            optimizer,
            num_warmup_steps=warmup_steps,
            num_training_steps=total_steps,
            scheduler_specific_kwargs={"min_lr_rate": min_lr_ratio},
        )
    if schedule == "constant":
        return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup_steps)
    raise ValueError(f"unknown lr schedule {schedule!r}: cosine or constant")
