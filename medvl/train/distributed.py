"""The processes' group and the Accelerator, for every launcher: a plain `python`, `torchrun`, and
`accelerate launch --config_file configs/accelerate/...` (DDP, FSDP2, DeepSpeed ZeRO), on GPUs or on
CPUs alone.

What accelerate does not do by itself is done here, each workaround with its reason: CPU processes
joining one gloo group, FSDP2 and hybrid sharding on CPU processes, DeepSpeed told the stage's
gradient clipping and micro-batch size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    FullyShardedDataParallelPlugin,
    ParallelismConfig,
)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


@dataclass(frozen=True)
class Launch:
    """How the processes were started, from the variables `torchrun` / `accelerate launch` set."""

    world: int  # number of processes
    cpu: bool  # no GPU: the processes form a gloo group
    deepspeed: bool
    fsdp: bool


def join_process_group() -> Launch:
    """Joins this process to the launcher's group (a no-op for a single process). Must run before the
    model is loaded, the Accelerator after it (see `make_accelerator`)."""
    # Without a GPU, processes started by torchrun / accelerate launch must join one gloo group
    # (accelerate's MULTI_CPU); without cpu=True accelerate runs them as unrelated single processes.
    # DeepSpeed brings its own CPU accelerator and only needs to be told to use gloo.
    cpu = not torch.cuda.is_available()
    use_deepspeed = _env_flag("ACCELERATE_USE_DEEPSPEED")
    if cpu and use_deepspeed:
        import deepspeed.ops

        # gloo is enough: do not JIT-compile DeepSpeed's shared-memory CPU collective (g++, ~75 s)
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    group = {"backend": "gloo"} if cpu and use_deepspeed else {"cpu": cpu}
    world = PartialState(**group).num_processes
    return Launch(world=world, cpu=cpu, deepspeed=use_deepspeed, fsdp=_env_flag("ACCELERATE_USE_FSDP"))


def make_accelerator(
    launch: Launch,
    accum: int,
    bf16: bool,
    project_dir: Path,
    grad_clip: float | None,
    micro_batch_size: int,
) -> Accelerator:
    """The Accelerator for `launch`, accumulating `accum` micro-batches per optimizer step, logging to
    TensorBoard under `project_dir`.

    Create it after the model is loaded: under a ZeRO-3 config transformers would otherwise take its
    ZeRO-3 loading path, which records legacy key renamings that the final save then writes out
    (language_model.model.model.*). ZeRO-3 partitions the model at prepare() instead."""
    fsdp_on_cpu = launch.cpu and launch.world > 1 and launch.fsdp
    # A parallelism config (hybrid sharding, configs/accelerate/multi-node.yaml) is checked against
    # the distributed type as the Accelerator is built; on CPU that type only becomes FSDP in
    # enable_fsdp_on_cpu, which applies the config itself.
    hybrid_on_cpu = fsdp_on_cpu and os.environ.pop("ACCELERATE_USE_PARALLELISM_CONFIG", "").lower() == "true"
    accelerator = Accelerator(
        cpu=launch.cpu and not launch.deepspeed,
        # every trainable parameter takes part in every micro-batch (the collator's vision filler,
        # unread vision layers frozen): DDP need not search the graph for unused ones each step
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        gradient_accumulation_steps=accum,
        mixed_precision="bf16" if bf16 else "no",
        log_with="tensorboard",
        project_dir=str(project_dir),
    )
    if fsdp_on_cpu:
        enable_fsdp_on_cpu(accelerator, hybrid_on_cpu)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        # the stage decides: DeepSpeed's engine clips (its default is 1.0, whatever the stage says)
        # and counts micro-batches (we prepare no DataLoader it could read the size from)
        ds["gradient_clipping"] = grad_clip or 0.0
        ds["train_micro_batch_size_per_gpu"] = micro_batch_size
    return accelerator


def enable_fsdp_on_cpu(accelerator: Accelerator, hybrid: bool = False) -> None:
    """FSDP2 for processes without a GPU (a gloo group), as `accelerate launch` with an FSDP config
    asked. accelerate 1.15 applies FSDP only to GPU-class process groups and would silently run
    DDP on MULTI_CPU; FSDP2 itself (torch `fully_shard`) runs on gloo, and so does accelerate's FSDP2
    preparation once the state says FSDP. This is what lets the FSDP path be tested on a CPU machine.
    `hybrid`: the launch asked for a parallelism config (replicas x shards, from the
    PARALLELISM_CONFIG_* variables), applied here as the Accelerator would have on a GPU."""
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch set
    if plugin.fsdp_version != 2:
        raise ValueError("FSDP without a GPU needs fsdp_version: 2 in the accelerate config")
    # both singletons: a later AcceleratorState() copies PartialState's fields over its own
    PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    if hybrid:
        config = ParallelismConfig()
        accelerator.state.parallelism_config = config
        accelerator.state.device_mesh = config.get_device_mesh("cpu")
        config._validate_accelerator(accelerator)


def deepspeed_offloads_optimizer(accelerator: Accelerator) -> bool:
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return False
    zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    return zero.get("offload_optimizer", {}).get("device", "none") == "cpu"


def fsdp_layers(plugin: FullyShardedDataParallelPlugin, model) -> None:
    """Per-layer shard units for `TRANSFORMER_BASED_WRAP` without named classes: the layer classes of
    the model's `_no_split_modules` that it really contains. LLaVA lists those of every tower its
    config could hold (CLIPTextEmbeddings for a vision-only CLIP tower), and accelerate refuses
    names it does not find."""
    if plugin.transformer_cls_names_to_wrap is None and model._no_split_modules:
        present = {type(m).__name__ for m in model.modules()}
        plugin.transformer_cls_names_to_wrap = sorted(set(model._no_split_modules) & present)


def prepare(accelerator: Accelerator, model, optimizer, base) -> tuple:
    """The model and optimizer wrapped for the launch (DDP, FSDP2 shards, a DeepSpeed engine).
    `base`: the unwrapped transformers model, whose layers become FSDP's shard units."""
    if accelerator.distributed_type == DistributedType.FSDP:
        fsdp_layers(accelerator.state.fsdp_plugin, base)
    return accelerator.prepare(model, optimizer)
