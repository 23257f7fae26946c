"""The training loop: one stage of the recipe, as named steps on accelerate.

`StageRecipe` holds the steps, in their order: `setup_distributed`, `load_model`,
`setup_accelerator`, `setup_model`, `setup_data`, `setup_optimizer`, `resume`, `setup_loader`,
`setup_metrics`, then `train` (`train_step` for each optimizer step, checkpoints, metrics) and `save`
(the final model). Each step hands the config fields it uses to the function doing the work.
`train_stage` runs one stage, `run_stages` several in a row.

DDP, FSDP and DeepSpeed come from `accelerate launch --config_file ...` (configs/accelerate/);
nothing here changes (medvl/train/distributed.py). The loss is a weighted sum over assistant tokens
divided by the number of units (tokens, or samples with `loss_normalization: sample`) in the whole
global batch, every micro-batch on every rank, so a step means the same thing at any micro-batch
size, accumulation, world size or packing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from medvl.data.conversations import IGNORE, Collator, ConversationDataset
from medvl.data.packing import PackedCollator
from medvl.imaging import VolumeSpec
from medvl.model.attention import register_varlen
from medvl.model.build import VLM, VolumePreprocessing, load, load_preprocessing, native_frames
from medvl.train import lora as lora_lib
from medvl.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_final
from medvl.train.config import DataSource, Freeze, Lora, StageConfig
from medvl.train.distributed import (
    deepspeed_offloads_optimizer,
    join_process_group,
    make_accelerator,
    prepare,
)
from medvl.train.metrics import MetricsLogger, StepCounts, peak_flops
from medvl.train.optim import lr_scheduler, make_optimizer
from medvl.train.sampler import GlobalBatchSampler

# ---------------------------------------------------------------- model


def load_weights(folder: Path, lora: Lora | None) -> VLM:
    """The stage's starting model; under QLoRA its frozen base in 4-bit."""
    if lora and lora.quantize_4bit:
        lora_lib.check_qlora()
        return lora_lib.load_4bit(folder, lora)
    return load(folder)


def resolve_attention(requested: str, packing: str) -> str:
    """The language model's attention implementation; `auto`: varlen for packed rows, else sdpa."""
    if requested == "auto":
        return "varlen" if packing == "soft" else "sdpa"
    return requested


def prepare_model(
    vlm: VLM,
    *,
    attn: str,
    freeze: Freeze,
    lora: Lora | None,
    gradient_checkpointing: bool,
    image_size: int | None,
    resolution_sizes: list[int],
):
    """Training settings on the loaded model; returns the model to train (wrapped by peft under
    LoRA) and the trainable parameter counts per component. `resolution_sizes`: the image sizes of
    a progressive-resolution schedule, in order (empty: none)."""
    model = vlm.model
    # Packed rows are recognised from position_ids only when no cache is built.
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    if attn == "varlen":
        register_varlen()
    # the vision tower sees whole images, never packed rows
    model.set_attn_implementation(
        {"text_config": attn, "vision_config": "sdpa" if attn == "varlen" else attn}
    )
    vision = model.config.vision_config
    if image_size and image_size != vision.image_size:
        raise ValueError(f"image_size {image_size} differs from the vision tower's {vision.image_size}")
    if resolution_sizes:
        if native_frames(vision):
            raise ValueError("resolution_schedule: a 3D (native) tower reads volumes at its own size only")
        if resolution_sizes[-1] != vision.image_size:
            raise ValueError(
                f"resolution_schedule ends at {resolution_sizes[-1]}px, the tower works at "
                f"{vision.image_size}px: end the schedule at the tower's size, the size the saved model "
                "is used at"
            )
        if any(s % vision.patch_size for s in resolution_sizes):
            raise ValueError(
                f"resolution_schedule sizes {resolution_sizes} must be multiples of the patch size "
                f"{vision.patch_size}"
            )
        # LLaVA does not pass interpolate_pos_encoding on to its tower: add it to every tower call.
        model.model.vision_tower.register_forward_pre_hook(
            lambda module, args, kwargs: (args, kwargs | {"interpolate_pos_encoding": True}), with_kwargs=True
        )
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trained = lora_lib.add_adapters(model, lora) if lora else model
    return trained, apply_freeze(model, freeze, lora)


def apply_freeze(model, freeze: Freeze, lora: Lora | None) -> dict[str, int]:
    """Table 8: set requires_grad per component; returns trainable parameter counts. A component
    with LoRA adapters trains only them."""
    with_lora = {p for p in ("llm", "vision") if lora is not None and getattr(lora, p) is not None}
    parts = {
        "vision": [model.model.vision_tower],
        "projector": [model.model.multi_modal_projector],
        "llm": [model.model.language_model, model.lm_head],
    }
    unread = unread_vision_parameters(model)
    counts = {}
    for name, modules in parts.items():
        frozen = getattr(freeze, name)
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


# ---------------------------------------------------------------- data


def stage_volumes(vlm: VLM, volume_tokens: int | None, specs: list[VolumeSpec] | None) -> VolumePreprocessing:
    """The stage's volume preprocessing: the config's budget and specs, each defaulting to the starting
    model's. The budget must pay for one image."""
    start = vlm.volumes
    volumes = VolumePreprocessing(
        volume_tokens=volume_tokens or start.volume_tokens,
        specs=tuple(specs) if specs is not None else start.specs,
    )
    volumes.check_budget(vlm.model.config.image_seq_length)
    return volumes


def check_volume_shapes(dataset: ConversationDataset, volumes: VolumePreprocessing) -> None:
    """Every volume sample's stored array must have the shape one of the model's specs makes (the one
    chat and serving will apply to scans), so a model is not saved to be served scans preprocessed
    otherwise than its training volumes. A spec's array turned to another plane (the plane questions
    of `medvl generate`, `medvl.volume_facts.reformat`) counts as made by it."""
    from medvl.volume_facts import PLANES, turned_shape

    specs = [volumes.spec_for("CT"), volumes.spec_for("")]
    shapes = {turned_shape((len(sp.channels()), *sp.size), plane) for sp in specs for plane in PLANES}
    for s in dataset.samples:
        if s.volume is None:
            continue
        shape = tuple(np.load(s.volume, mmap_mode="r", allow_pickle=False).shape)  # the header only
        if shape not in shapes:
            made = ", ".join(str(list(x)) for x in sorted(shapes))
            raise ValueError(
                f"sample id {s.id}: volume {s.volume} is {list(shape)} [C, S, P, L], which none of the "
                f"model's volume specs makes ({made}): set volume_specs to the spec it was curated with "
                "(its card's `volume:`)"
            )


def read_data(vlm: VLM, sources: list[DataSource], max_length: int, sizes: set[int]) -> ConversationDataset:
    """The stage's samples, volumes cut into slabs as `vlm.volumes` says; every sample must fit
    `max_length` at each image size in `sizes`."""
    dataset = ConversationDataset(
        vlm, [(d.path, d.image_root) for d in sources], max_length, vlm.volumes.volume_tokens
    )
    check_volume_shapes(dataset, vlm.volumes)
    for size in sizes:
        if max(dataset.lengths(size)) > max_length:
            raise ValueError(
                f"at {size}px images a sample has {max(dataset.lengths(size))} tokens > max_length"
            )
    return dataset


def make_collator(vlm: VLM, packing: str, row_length: int | None, loss_normalization: str) -> Collator:
    """Padded micro-batches, or (`packing: soft`) whole samples packed into rows of at most
    `row_length` tokens (None: the whole micro-batch in one row, for varlen attention)."""
    if packing == "soft":
        return PackedCollator(vlm, row_length, loss_normalization, vision_filler=True)
    return Collator(vlm, loss_normalization, vision_filler=True)


def data_workers(num_workers: int | str, device: torch.device) -> int:
    """`num_workers`, with auto resolved: on a GPU, up to 4 loader processes per training process
    from the node's cores, leaving one core per process for the training loop itself."""
    if num_workers != "auto":
        return int(num_workers)
    if device.type != "cuda":
        return 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # set by torchrun and accelerate launch
    return max(0, min(4, (os.cpu_count() or 1) // local - 1))


def make_loader(
    dataset: ConversationDataset, sampler: GlobalBatchSampler, collate: Collator, workers: int, cuda: bool
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=cuda,  # page-locked batches: the copy to the GPU overlaps the compute
    )


# ---------------------------------------------------------------- one step


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


def train_step(
    accelerator: Accelerator,
    model,
    optimizer: torch.optim.Optimizer,
    micro: list[dict[str, torch.Tensor]],
    *,
    params: list[torch.nn.Parameter],
    grad_clip: float | None,
) -> float:
    """One optimizer step over this rank's micro-batches `micro` (forward and backward each, the
    update after the last); returns the step's loss over the global batch."""
    device, cuda = accelerator.device, accelerator.device.type == "cuda"
    n_units = torch.tensor(sum(int(b["loss_units"]) for b in micro), device=device)
    n_units = accelerator.reduce(n_units, "sum").clamp(min=1)
    # DeepSpeed's engine clips (told the stage's grad_clip) and steps itself
    clip = grad_clip if accelerator.distributed_type != DistributedType.DEEPSPEED else None
    step_loss = torch.zeros((), device=device)
    for b in micro:
        # counts and the longest sample (0-dim) stay on the host, where they are read
        b = {k: v.to(device, non_blocking=cuda) if v.dim() else v for k, v in b.items()}
        with accelerator.accumulate(model):
            loss = loss_sum(model, b)
            # accelerate divides by the accumulation and DDP averages over ranks: undo both, so the
            # gradient is that of (weighted sum over the global batch) / (its units).
            accelerator.backward(loss * accelerator.num_processes * len(micro) / n_units)
            if accelerator.sync_gradients and clip:
                accelerator.clip_grad_norm_(params, clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step_loss += loss.detach()
    return (accelerator.reduce(step_loss, "sum") / n_units).item()


# ---------------------------------------------------------------- the recipe


class StageRecipe:
    """One stage as named steps. `setup` runs the set-up steps in their order, `train` the optimizer
    steps, `save` the final model (`train_stage` runs all three). Each step hands the config fields
    it uses to the function that does the work."""

    def __init__(self, cfg: StageConfig) -> None:
        self.cfg = cfg
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available())
        self.attn = resolve_attention(cfg.attn_implementation, cfg.packing)
        self.sizes = [r.size for r in cfg.resolution_schedule or []]  # progressive resolution

    def setup(self, resume: bool = False) -> None:
        self.setup_distributed()
        self.load_model()  # before the Accelerator exists (see make_accelerator)
        self.setup_accelerator()
        self.setup_model()
        self.setup_data()
        self.setup_optimizer()
        self.start_step, self.history = self.resume() if resume else (0, [])
        self.setup_loader()
        self.setup_metrics()

    def setup_distributed(self) -> None:
        """The launcher's process group, the accumulation it implies, the seed."""
        cfg = self.cfg
        self.launch = join_process_group()
        world = self.launch.world
        if cfg.global_batch_size % (cfg.micro_batch_size * world):
            raise ValueError(
                f"global_batch_size {cfg.global_batch_size} is not a multiple of "
                f"micro_batch_size {cfg.micro_batch_size} x {world} processes"
            )
        self.accum = cfg.global_batch_size // (cfg.micro_batch_size * world)
        set_seed(self.cfg.seed)

    def load_model(self) -> None:
        self.vlm = load_weights(self.cfg.model, self.cfg.lora)
        if self.cfg.preprocessing:  # the training data's, when it differs from the starting model's
            self.vlm.preprocessing = load_preprocessing(self.cfg.preprocessing)
        self.vlm.volumes = stage_volumes(self.vlm, self.cfg.volume_tokens, self.cfg.volume_specs)
        self.base = self.vlm.model  # the transformers model under any wrapper: what FLOPs are counted on

    def setup_accelerator(self) -> None:
        cfg = self.cfg
        self.accelerator = make_accelerator(
            self.launch, self.accum, self.bf16, cfg.output_dir, cfg.grad_clip, cfg.micro_batch_size
        )

    def setup_model(self) -> None:
        cfg = self.cfg
        self.model, self.trainable_counts = prepare_model(
            self.vlm,
            attn=self.attn,
            freeze=cfg.freeze,
            lora=cfg.lora,
            gradient_checkpointing=cfg.gradient_checkpointing,
            image_size=cfg.image_size,
            resolution_sizes=self.sizes,
        )
        self.trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}

    def setup_data(self) -> None:
        cfg = self.cfg
        self.dataset = read_data(self.vlm, cfg.data, cfg.max_length, set(self.sizes))
        steps_per_epoch = len(self.dataset) // cfg.global_batch_size
        self.total_steps = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))

    def setup_optimizer(self) -> None:
        """Optimizer and schedule, then the model and optimizer wrapped for the launch."""
        cfg, acc = self.cfg, self.accelerator
        optimizer = make_optimizer(
            [p for p in self.model.parameters() if p.requires_grad],
            cfg.lr,
            cfg.betas,
            cfg.weight_decay,
            fused=acc.device.type == "cuda",
            cpu_adam=deepspeed_offloads_optimizer(acc),
        )
        self.scheduler = lr_scheduler(
            optimizer,
            cfg.lr_schedule,
            int(cfg.warmup_ratio * self.total_steps),
            self.total_steps,
            cfg.min_lr_ratio,
        )
        self.model, self.optimizer = prepare(acc, self.model, optimizer, self.base)
        self.params = [p for p in self.model.parameters() if p.requires_grad]  # FSDP: its shards

    def resume(self) -> tuple[int, list[dict]]:
        """The step and history of the newest complete checkpoint, its state restored (none: 0, [])."""
        ckpt = latest_checkpoint(self.cfg.output_dir)
        return (0, []) if ckpt is None else load_checkpoint(self.accelerator, ckpt, self.scheduler)

    def setup_loader(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        sampler = GlobalBatchSampler(
            len(self.dataset),
            cfg.global_batch_size,
            cfg.micro_batch_size,
            acc.num_processes,
            acc.process_index,
            cfg.seed,
            self.total_steps,
            self.start_step,
            lengths=self.dataset.lengths if cfg.group_by_length else None,
            size_at=cfg.image_size_at,
            packed=cfg.packing == "soft",
        )
        varlen = self.attn in ("varlen", "flash_attention_2")  # per-sample cost: the micro-batch in one row
        collate = make_collator(
            self.vlm, cfg.packing, None if varlen else cfg.max_length, cfg.loss_normalization
        )
        workers = data_workers(cfg.num_workers, acc.device)
        self.loader = make_loader(self.dataset, sampler, collate, workers, acc.device.type == "cuda")

    def setup_metrics(self) -> None:
        """TensorBoard, the matmul peak MFU is measured against, and the run's summary line."""
        cfg, acc = self.cfg, self.accelerator
        acc.init_trackers(cfg.stage.split(":")[0].strip().replace(" ", "_") or "stage")
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.peak = cfg.peak_flops or peak_flops(acc.device, dtype)
        acc.print(
            f"[{cfg.stage}] {len(self.dataset)} samples, {self.total_steps} steps of {cfg.global_batch_size} "
            f"({cfg.micro_batch_size} x {self.accum} accumulation x {acc.num_processes} processes, "
            f"{acc.distributed_type.value}: {type(self.model).__name__}); trainable: {self.trainable_counts}"
        )

    def train(self, stop_after: int | None = None) -> int:
        """Optimizer steps from where setup left off to the end of the stage (or `stop_after` steps);
        returns the number of steps done in all."""
        cfg, acc = self.cfg, self.accelerator
        end = min(self.total_steps, self.start_step + stop_after) if stop_after else self.total_steps
        self.model.train()
        bar = tqdm(
            total=self.total_steps, initial=self.start_step, disable=not acc.is_main_process, desc=cfg.stage
        )
        metrics = MetricsLogger(acc, self.peak, cfg.log_every, bar)
        batches = iter(self.loader)
        for step in range(self.start_step, end):
            t = time.perf_counter()  # data loading included, as in any step time a user sees
            micro = [next(batches) for _ in range(self.accum)]
            counts = StepCounts.of(micro, self.base, cfg.image_size_at(step))
            loss = train_step(
                acc, self.model, self.optimizer, micro, params=self.params, grad_clip=cfg.grad_clip
            )
            self.scheduler.step()
            lr = self.scheduler.get_last_lr()[0]
            record = {"step": step + 1, "loss": loss, "lr": lr} | counts.global_counts(acc)
            self.history.append(record | {"seconds": time.perf_counter() - t})
            metrics.step(step + 1, loss, lr, counts, last=step + 1 == end)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < self.total_steps:
                save_checkpoint(
                    acc, cfg.output_dir, step + 1, self.scheduler, self.history, cfg.keep_checkpoints
                )
        bar.close()
        return end

    def save(self, done_steps: int) -> Path:
        """The history, and the final model once every step is done; ends the run (and tears down
        the process group). Returns the final model's folder (`<output_dir>/final`)."""
        cfg, acc = self.cfg, self.accelerator
        final = cfg.output_dir / "final"
        if done_steps == self.total_steps:
            save_final(
                acc,
                self.model,
                self.vlm.processor,
                final,
                trainable=self.trainable,
                lora=cfg.lora,
                base=cfg.model,
                preprocessing=self.vlm.preprocessing,
                volumes=self.vlm.volumes,
            )
        if acc.is_main_process:
            (cfg.output_dir / "history.json").write_text(json.dumps(self.history))
        acc.wait_for_everyone()
        acc.end_training()  # last: it also tears down the process group
        return final


def train_stage(cfg: StageConfig, resume: bool = False, stop_after: int | None = None) -> Path:
    """Run one stage; returns the folder of the final model (`<output_dir>/final`). `resume`: from the
    newest complete checkpoint in `output_dir`. `stop_after` ends the run early after that many steps
    (for tests of resume)."""
    recipe = StageRecipe(cfg)
    recipe.setup(resume)
    return recipe.save(recipe.train(stop_after))


def run_stages(cfgs: list[StageConfig], model: Path | None = None, resume: bool = False) -> list[Path]:
    """Train `cfgs` in order, each from the previous stage's `final/` (the first from `model`, or its
    own config's). With `resume`, finished stages are skipped and an interrupted one resumes."""
    finals = []
    for cfg in cfgs:
        if model is not None:
            cfg.model = model
        final = cfg.output_dir / "final"
        if resume and (final / "config.json").exists():
            print(f"[{cfg.stage}] already finished: {final}")
        else:
            final = train_stage(cfg, resume=resume)
        finals.append(final)
        model = final
    return finals
