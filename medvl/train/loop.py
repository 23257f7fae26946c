"""The training loop: one stage of the recipe, explicit, on accelerate.

DDP, FSDP and DeepSpeed come from `accelerate launch --config_file ...` (configs/accelerate/);
nothing here changes. The loss is a weighted sum over assistant tokens divided by the number of
units (tokens, or samples with `loss_normalization: sample`) in the whole global batch, every
micro-batch on every rank, so a step means the same thing at any micro-batch size, accumulation,
world size or packing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    FullyShardedDataParallelPlugin,
    ParallelismConfig,
    set_seed,
)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from medvl.data.conversations import IGNORE, Collator, ConversationDataset
from medvl.data.packing import PackedCollator, plan_micro_batches
from medvl.model.build import VLM, load
from medvl.train import lora as lora_lib
from medvl.train.config import StageConfig

CKPT_PREFIX = "step-"


# ---------------------------------------------------------------- data order


class GlobalBatchSampler(torch.utils.data.Sampler[list[tuple[int, int | None]]]):
    """Yields this rank's micro-batches as (sample index, image size) pairs, a deterministic
    function of (seed, epoch, step), so a resumed run sees exactly the batches the uninterrupted run
    would have seen.

    Each global batch of `global_bs` samples is cut into `accum * world` micro-batches (see
    `plan_micro_batches`: grouped by length and balanced across ranks when `lengths` is given);
    micro-batch j of the window goes to rank j % world. `size_at(step)` is the image size of the
    progressive-resolution schedule, `lengths(size)` the token counts at that size.
    """

    def __init__(
        self,
        n: int,
        global_bs: int,
        micro_bs: int,
        world: int,
        rank: int,
        seed: int,
        total_steps: int,
        start_step: int = 0,
        *,
        lengths: Callable[[int | None], list[int]] | None = None,
        size_at: Callable[[int], int | None] = lambda step: None,
        packed: bool = False,
    ) -> None:
        if n < global_bs:
            raise ValueError(f"the data has {n} samples, fewer than one global batch of {global_bs}")
        self.n, self.global_bs, self.micro_bs = n, global_bs, micro_bs
        self.world, self.rank, self.seed = world, rank, seed
        self.total_steps, self.start_step = total_steps, start_step
        self.steps_per_epoch = n // global_bs  # drop the ragged tail: every step is a full batch
        self.lengths, self.size_at, self.packed = lengths, size_at, packed
        self._lengths: dict[int | None, list[int]] = {}

    @property
    def accum(self) -> int:
        return self.global_bs // (self.micro_bs * self.world)

    def global_batches(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        return perm[k * self.global_bs : (k + 1) * self.global_bs]

    def micro_batches(self, step: int) -> list[list[tuple[int, int | None]]]:
        """Every rank's micro-batches of `step`, micro-batch j for rank j % world."""
        batch, size = self.global_batches(step), self.size_at(step)
        if self.lengths is not None and size not in self._lengths:
            self._lengths[size] = self.lengths(size)
        lens = [self._lengths[size][i] for i in batch] if self.lengths is not None else [0] * len(batch)
        plan = plan_micro_batches(
            lens, self.accum * self.world, self.world, self.packed, self.lengths is not None
        )
        return [[(batch[j], size) for j in micro] for micro in plan]

    def __iter__(self):
        for step in range(self.start_step, self.total_steps):
            yield from self.micro_batches(step)[self.rank :: self.world]

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.accum


# ---------------------------------------------------------------- pieces


def apply_freeze(model, cfg: StageConfig) -> dict[str, int]:
    """Table 8: set requires_grad per component; returns trainable parameter counts. A component
    with LoRA adapters trains only them."""
    with_lora = {p for p in ("llm", "vision") if cfg.lora is not None and getattr(cfg.lora, p) is not None}
    parts = {
        "vision": [model.model.vision_tower],
        "projector": [model.model.multi_modal_projector],
        "llm": [model.model.language_model, model.lm_head],
    }
    unread = unread_vision_parameters(model)
    counts = {}
    for name, modules in parts.items():
        frozen = getattr(cfg.freeze, name)
        n = 0
        for m in modules:
            for pname, p in m.named_parameters():
                trains = not frozen and (name not in with_lora or "lora_" in pname) and p not in unread
                p.requires_grad_(trains)
                n += p.numel() * trains
        counts[name] = n
    return counts


def unread_vision_parameters(model) -> set[torch.nn.Parameter]:
    """Vision-tower parameters LLaVA never reads, so never trained: it takes the hidden states of
    `vision_feature_layer` (-2 by default), so later layers, the final norm and any pooling head get
    no gradient. Freezing them keeps them out of the optimizer: no memory spent on their state, and
    sharded (FSDP/ZeRO) optimizer checkpoints have state for every parameter they list."""
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)  # transformers 5 CLIP towers hold their layers directly
    if not hasattr(tower, "encoder"):
        return set()
    n = len(tower.encoder.layers)
    layer = model.config.vision_feature_layer
    # hidden_states[i] is the output of encoder layer i (1-based), hidden_states[0] the embeddings
    read = max(i % (n + 1) for i in (layer if isinstance(layer, list) else [layer]))
    unread = [*tower.encoder.layers[read:]] + [getattr(tower, k, None) for k in ("post_layernorm", "head")]
    return {p for m in unread if m is not None for p in m.parameters()}


def lr_lambda(cfg: StageConfig, total_steps: int):
    warmup = int(cfg.warmup_ratio * total_steps)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul peak for MFU: known datacenter GPUs by name, else measured here (CPU)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in {
            "H200": 989,
            "H100": 989,
            "A100": 312,
            "L40S": 362,
            "A10": 125,
            "4090": 165,
        }.items():
            if key in name:
                return tflops * 1e12
    return measure_matmul_flops(device, dtype)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024, reps: int = 4) -> float:
    """Best of three timings of `reps` square matmuls: the attainable peak on this machine."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = 0.0
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


def flops_per_step(
    model, n_text_tokens: int, n_images: int, image_size: int | None = None, n_logits: int | None = None
) -> float:
    """Matmul FLOPs of one forward + backward: 2 per parameter per token forward, 2 more for the
    activation gradients where a gradient flows through, 2 more for weight gradients where the weights
    train (frozen parts skip them). The LM (embedding lookups excluded) runs over every token and its
    head over `n_logits` positions (default: every token), the vision tower over its patches of every
    image."""
    vt = model.model.vision_tower
    llm = model.model.language_model
    n_vision = sum(p.numel() for p in vt.parameters())
    n_llm = sum(p.numel() for p in llm.parameters()) - llm.get_input_embeddings().weight.numel()
    n_head = model.lm_head.weight.numel()
    n_logits = n_text_tokens if n_logits is None else n_logits
    # weight gradients of LoRA's frozen base weights are not computed
    vision_trains = any(p.requires_grad for n, p in vt.named_parameters() if "lora_" not in n)
    llm_trains = model.lm_head.weight.requires_grad
    llm_factor = 2 + 2 + 2 * llm_trains  # something upstream of the LM always trains
    vision_factor = 2 + 4 * vision_trains
    patches = ((image_size or vt.config.image_size) // vt.config.patch_size) ** 2 + 1
    lm = (n_llm * n_text_tokens + n_head * n_logits) * llm_factor
    return lm + n_vision * patches * n_images * vision_factor


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """The model's keyword arguments from a collated batch. Packed rows carry their sample boundaries
    under the names transformers passes down to the attention layers (varlen and flash-attention)."""
    inputs = {
        k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "pixel_values") if k in batch
    }
    if "cu_seq_lens" in batch:
        longest = int(batch["max_seq_len"])
        inputs |= {
            "cu_seq_lens_q": batch["cu_seq_lens"],
            "cu_seq_lens_k": batch["cu_seq_lens"],
            "max_length_q": longest,
            "max_length_k": longest,
        }
    return inputs


def loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy at labelled positions, each weighted (see `Collator`), summed. Logits
    are computed only at the batch's `head_positions`, where the next token is labelled
    (`logits_to_keep`): image tokens, prompts and padding never go through the LM head, whose
    [positions x vocabulary] logits are the largest activation of a VLM step (151k-word vocabularies)."""
    labels, weights, keep = batch["labels"], batch["loss_weights"], batch["head_positions"]
    logits = model(**model_inputs(batch), logits_to_keep=keep).logits  # [rows, len(keep), vocab]
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels[:, keep + 1].reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    )
    return (ce * weights[:, keep + 1].reshape(-1)).sum()


def attn_implementation(cfg: StageConfig) -> str:
    if cfg.attn_implementation == "auto":
        return "varlen" if cfg.packing == "soft" else "sdpa"
    return cfg.attn_implementation


def varlen_attention(cfg: StageConfig) -> bool:
    """Attention whose cost is per sample, not per row: packed micro-batches go into one row."""
    return attn_implementation(cfg) in ("varlen", "flash_attention_2")


def prepare_model(vlm: VLM, cfg: StageConfig):
    """Training settings on the loaded model; returns the model to train (wrapped by peft under
    LoRA) and the trainable parameter counts per component."""
    model = vlm.model
    # Packed rows are recognised from position_ids only when no cache is built.
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    attn = attn_implementation(cfg)
    # the vision tower sees whole images, never packed rows
    model.set_attn_implementation(
        {"text_config": attn, "vision_config": "sdpa" if attn == "varlen" else attn}
    )
    vision = model.config.vision_config
    if cfg.image_size and cfg.image_size != vision.image_size:
        raise ValueError(f"image_size {cfg.image_size} differs from the vision tower's {vision.image_size}")
    if cfg.resolution_schedule:
        sizes = [r.size for r in cfg.resolution_schedule]
        if sizes[-1] != vision.image_size:
            raise ValueError(
                f"resolution_schedule ends at {sizes[-1]}px, the tower works at {vision.image_size}px: "
                "end the schedule at the tower's size, the size the saved model is used at"
            )
        if any(s % vision.patch_size for s in sizes):
            raise ValueError(
                f"resolution_schedule sizes {sizes} must be multiples of the patch size {vision.patch_size}"
            )
        # LLaVA does not pass interpolate_pos_encoding on to its tower: add it to every tower call.
        model.model.vision_tower.register_forward_pre_hook(
            lambda module, args, kwargs: (args, kwargs | {"interpolate_pos_encoding": True}), with_kwargs=True
        )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trained = lora_lib.add_adapters(model, cfg.lora) if cfg.lora else model
    return trained, apply_freeze(model, cfg)


def data_workers(cfg: StageConfig, accelerator: Accelerator) -> int:
    """`num_workers`, with auto resolved: on a GPU, up to 4 loader processes per training process
    from the node's cores, leaving one core per process for the training loop itself."""
    if cfg.num_workers != "auto":
        return cfg.num_workers
    if accelerator.device.type != "cuda":
        return 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # set by torchrun and accelerate launch
    return max(0, min(4, (os.cpu_count() or 1) // local - 1))


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


# ---------------------------------------------------------------- checkpoints


def latest_checkpoint(output_dir: Path) -> Path | None:
    """Only fully written checkpoints count: they are written under a temporary name and renamed."""
    ckpts = sorted(
        (output_dir / "checkpoints").glob(f"{CKPT_PREFIX}*"), key=lambda p: int(p.name[len(CKPT_PREFIX) :])
    )
    ckpts = [p for p in ckpts if (p / "trainer_state.json").exists()]
    return ckpts[-1] if ckpts else None


def save_checkpoint(
    accelerator: Accelerator, cfg: StageConfig, step: int, scheduler, history: list[dict]
) -> None:
    root = cfg.output_dir / "checkpoints"
    final = root / f"{CKPT_PREFIX}{step:08d}"
    tmp = root / f".tmp-{CKPT_PREFIX}{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)  # before any rank writes its shard into it
    accelerator.wait_for_everyone()
    # model (safetensors), optimizer and RNG states; accelerate reloads them with weights_only=True.
    # Under FSDP / DeepSpeed every rank writes its own shard files.
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()  # every shard written before the directory is renamed
    if accelerator.is_main_process:
        state = {"step": step, "scheduler": scheduler.state_dict(), "history": history}
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        tmp.rename(final)  # atomic: a checkpoint either exists whole or not at all
        done = sorted(p for p in root.glob(f"{CKPT_PREFIX}*"))
        for old in done[: -cfg.keep_checkpoints]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------- the loop


def train_stage(cfg: StageConfig, resume: bool = False, stop_after: int | None = None) -> Path:
    """Run one stage; returns the folder of the final model (`<output_dir>/final`).
    `stop_after` ends the run early after that many steps (for tests of resume)."""
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available())
    # Without a GPU, processes started by torchrun / accelerate launch must join one gloo group
    # (accelerate's MULTI_CPU); without cpu=True accelerate runs them as unrelated single processes.
    # DeepSpeed brings its own CPU accelerator and only needs to be told to use gloo.
    cpu = not torch.cuda.is_available()
    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if cpu and use_deepspeed:
        import deepspeed.ops

        # gloo is enough: do not JIT-compile DeepSpeed's shared-memory CPU collective (g++, ~75 s)
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    group = {"backend": "gloo"} if cpu and use_deepspeed else {"cpu": cpu}
    world = PartialState(**group).num_processes
    if cfg.global_batch_size % (cfg.micro_batch_size * world):
        raise ValueError(
            f"global_batch_size {cfg.global_batch_size} is not a multiple of "
            f"micro_batch_size {cfg.micro_batch_size} x {world} processes"
        )
    accum = cfg.global_batch_size // (cfg.micro_batch_size * world)
    set_seed(cfg.seed)
    # Loaded before the Accelerator exists: under a ZeRO-3 config transformers would otherwise take
    # its ZeRO-3 loading path, which records legacy key renamings that the final save then writes
    # out (language_model.model.model.*). ZeRO-3 partitions the model at prepare() instead.
    if cfg.lora and cfg.lora.quantize_4bit:
        lora_lib.check_qlora()
        vlm = lora_lib.load_4bit(cfg.model, cfg.lora)
    else:
        vlm = load(cfg.model)
    fsdp_on_cpu = cpu and world > 1 and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    # A parallelism config (hybrid sharding, configs/accelerate/multi-node.yaml) is checked against
    # the distributed type as the Accelerator is built; on CPU that type only becomes FSDP in
    # enable_fsdp_on_cpu, which applies the config itself.
    hybrid_on_cpu = fsdp_on_cpu and os.environ.pop("ACCELERATE_USE_PARALLELISM_CONFIG", "").lower() == "true"
    accelerator = Accelerator(
        cpu=cpu and not use_deepspeed,
        # every trainable parameter takes part in every micro-batch (the collator's vision filler,
        # unread vision layers frozen): DDP need not search the graph for unused ones each step
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        gradient_accumulation_steps=accum,
        mixed_precision="bf16" if use_bf16 else "no",
        log_with="tensorboard",
        project_dir=str(cfg.output_dir),
    )
    if fsdp_on_cpu:
        enable_fsdp_on_cpu(accelerator, hybrid_on_cpu)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        # the stage decides: DeepSpeed's engine clips (its default is 1.0, whatever the stage says)
        # and counts micro-batches (we prepare no DataLoader it could read the size from)
        ds["gradient_clipping"] = cfg.grad_clip or 0.0
        ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    base = vlm.model
    model, counts = prepare_model(vlm, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    dataset = ConversationDataset(vlm, [(d.path, d.image_root) for d in cfg.data], cfg.max_length)
    for size in {r.size for r in cfg.resolution_schedule or []}:
        if max(dataset.lengths(size)) > cfg.max_length:
            raise ValueError(
                f"at {size}px images a sample has {max(dataset.lengths(size))} tokens > max_length"
            )
    steps_per_epoch = len(dataset) // cfg.global_batch_size
    total_steps = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))

    params = [p for p in model.parameters() if p.requires_grad]
    if deepspeed_offloads_optimizer(accelerator):
        # ZeRO-Offload keeps optimizer state in CPU memory and refuses torch's AdamW there: DeepSpeed's
        # vectorised CPU Adam (compiled on first use) in AdamW mode is the same update, much faster.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(
            params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, adamw_mode=True
        )
    else:
        # fused: one kernel for the whole update on GPU (the transformers Trainer default too)
        optimizer = torch.optim.AdamW(
            params,
            lr=cfg.lr,
            betas=cfg.betas,
            weight_decay=cfg.weight_decay,
            fused=accelerator.device.type == "cuda",
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    if accelerator.distributed_type == DistributedType.FSDP:
        fsdp_layers(accelerator.state.fsdp_plugin, base)
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP replaces them with shards
    deepspeed_engine = accelerator.distributed_type == DistributedType.DEEPSPEED  # it clips and steps

    start_step, history = 0, []
    ckpt = latest_checkpoint(cfg.output_dir) if resume else None
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        state = json.loads((ckpt / "trainer_state.json").read_text())
        start_step, history = state["step"], state["history"]
        scheduler.load_state_dict(state["scheduler"])
        accelerator.print(f"resumed from {ckpt} at step {start_step}")

    sampler = GlobalBatchSampler(
        len(dataset),
        cfg.global_batch_size,
        cfg.micro_batch_size,
        accelerator.num_processes,
        accelerator.process_index,
        cfg.seed,
        total_steps,
        start_step,
        lengths=dataset.lengths if cfg.group_by_length else None,
        size_at=cfg.image_size_at,
        packed=cfg.packing == "soft",
    )
    collate = (
        PackedCollator(
            vlm, None if varlen_attention(cfg) else cfg.max_length, cfg.loss_normalization, vision_filler=True
        )
        if cfg.packing == "soft"
        else Collator(vlm, cfg.loss_normalization, vision_filler=True)
    )
    cuda = accelerator.device.type == "cuda"
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=data_workers(cfg, accelerator),
        pin_memory=cuda,  # page-locked batches: the copy to the GPU overlaps the compute
    )

    accelerator.init_trackers(cfg.stage.split(":")[0].strip().replace(" ", "_") or "stage")
    peak = cfg.peak_flops or peak_flops(accelerator.device, torch.bfloat16 if use_bf16 else torch.float32)
    accelerator.print(
        f"[{cfg.stage}] {len(dataset)} samples, {total_steps} steps of {cfg.global_batch_size} "
        f"({cfg.micro_batch_size} x {accum} accumulation x {accelerator.num_processes} processes, "
        f"{accelerator.distributed_type.value}: {type(model).__name__}); trainable: {counts}"
    )
    model.train()
    bar = tqdm(total=total_steps, initial=start_step, disable=not accelerator.is_main_process, desc=cfg.stage)
    it = iter(loader)
    window = {"loss": 0.0, "tokens": 0, "flops": 0.0, "steps": 0, "t": time.perf_counter()}
    end = min(total_steps, start_step + stop_after) if stop_after else total_steps
    for step in range(start_step, end):
        t_step = time.perf_counter()  # data loading included, as in any step time a user sees
        micro = [next(it) for _ in range(accum)]
        n_units = torch.tensor(sum(int(b["loss_units"]) for b in micro), device=accelerator.device)
        n_units = accelerator.reduce(n_units, "sum").clamp(min=1)
        step_loss = torch.zeros((), device=accelerator.device)
        # non-padding tokens, all positions (padding included), images and LM-head positions of this
        # rank, counted from the CPU batches: reading a GPU tensor would make the host wait on the GPU
        shape = torch.zeros(4, dtype=torch.long)
        size = cfg.image_size_at(step)
        for b in micro:
            n_tokens = int(b["num_tokens"])
            n_img = b["pixel_values"].shape[0] if "pixel_values" in b else 0
            n_logits = b["head_positions"].numel() * b["input_ids"].shape[0]
            shape += torch.tensor([n_tokens, b["input_ids"].numel(), n_img, n_logits])
            window["tokens"] += n_tokens
            window["flops"] += flops_per_step(base, n_tokens, n_img, size, n_logits)
            # counts and the longest sample (0-dim) stay on the host, where they are read
            b = {k: v.to(accelerator.device, non_blocking=cuda) if v.dim() else v for k, v in b.items()}
            with accelerator.accumulate(model):
                loss = loss_sum(model, b)
                # accelerate divides by `accum` and DDP averages over ranks: undo both, so the
                # gradient is that of (weighted sum over the global batch) / (its units).
                accelerator.backward(loss * accelerator.num_processes * accum / n_units)
                if accelerator.sync_gradients and cfg.grad_clip and not deepspeed_engine:
                    accelerator.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach()
        scheduler.step()
        loss = (accelerator.reduce(step_loss, "sum") / n_units).item()
        lr = scheduler.get_last_lr()[0]
        tokens, positions, images, logit_positions = accelerator.reduce(
            shape.to(accelerator.device), "sum"
        ).tolist()
        history.append(
            {
                "step": step + 1,
                "loss": loss,
                "lr": lr,
                "tokens": tokens,
                "positions": positions,
                "images": images,
                "logit_positions": logit_positions,
                "seconds": time.perf_counter() - t_step,
            }
        )
        window["loss"] += loss
        window["steps"] += 1
        bar.update(1)
        if (step + 1) % cfg.log_every == 0 or step + 1 == end:
            dt = time.perf_counter() - window["t"]
            tok_s = window["tokens"] * accelerator.num_processes / dt
            mfu = window["flops"] / dt / peak
            metrics = {"loss": window["loss"] / window["steps"], "lr": lr, "tokens_per_s": tok_s, "mfu": mfu}
            accelerator.log(metrics, step=step + 1)
            bar.set_postfix(
                loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}", mfu=f"{mfu:.1%}"
            )
            window = {"loss": 0.0, "tokens": 0, "flops": 0.0, "steps": 0, "t": time.perf_counter()}
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total_steps:
            save_checkpoint(accelerator, cfg, step + 1, scheduler, history)
    bar.close()

    final = cfg.output_dir / "final"
    if end == total_steps:
        accelerator.wait_for_everyone()
        state_dict = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            if cfg.lora:  # adapters merged into a fresh full-precision base: a plain LLaVA checkpoint
                out = lora_lib.merged(
                    cfg.model, cfg.lora, {k: v for k, v in state_dict.items() if k in trainable}
                )
                state_dict = None
            else:
                out = accelerator.unwrap_model(model)
                out.set_attn_implementation("sdpa")  # the saved model must load where flash-attn is absent
            out.config.use_cache = True
            out.config.text_config.use_cache = True
            out.save_pretrained(final, state_dict=state_dict, safe_serialization=True)
            vlm.processor.save_pretrained(final)
            (cfg.output_dir / "history.json").write_text(json.dumps(history))
    elif accelerator.is_main_process:
        (cfg.output_dir / "history.json").write_text(json.dumps(history))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # last: it also tears down the process group
    return final
