"""Checkpoints a stage resumes from, and the final model it leaves.

A checkpoint (`<output_dir>/checkpoints/step-NNNNNNNN/`) is accelerate's saved state (model as
safetensors, optimizer, RNG; one shard file per rank under FSDP / DeepSpeed) plus
`trainer_state.json` (step, scheduler, history). The final model (`<output_dir>/final/`) is a plain
LLaVA folder that stock transformers loads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from accelerate import Accelerator

from medvl.imaging import Preprocessing
from medvl.model.build import VolumePreprocessing, save_input_descriptions
from medvl.train import lora as lora_lib
from medvl.train.config import Lora

CKPT_PREFIX = "step-"


def latest_checkpoint(output_dir: Path) -> Path | None:
    """Only fully written checkpoints count: they are written under a temporary name and renamed."""
    ckpts = sorted(
        (output_dir / "checkpoints").glob(f"{CKPT_PREFIX}*"), key=lambda p: int(p.name[len(CKPT_PREFIX) :])
    )
    ckpts = [p for p in ckpts if (p / "trainer_state.json").exists()]
    return ckpts[-1] if ckpts else None


def save_checkpoint(
    accelerator: Accelerator, output_dir: Path, step: int, scheduler, history: list[dict], keep: int
) -> None:
    """The state after `step` optimizer steps; the newest `keep` checkpoints are kept."""
    root = output_dir / "checkpoints"
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
        for old in done[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Accelerator, folder: Path, scheduler) -> tuple[int, list[dict]]:
    """Restores model, optimizer, RNG and scheduler from `folder`; returns the step it was saved at
    and the history up to it."""
    accelerator.load_state(str(folder))
    state = json.loads((folder / "trainer_state.json").read_text())
    scheduler.load_state_dict(state["scheduler"])
    accelerator.print(f"resumed from {folder} at step {state['step']}")
    return state["step"], state["history"]


def save_final(
    accelerator: Accelerator,
    model,
    processor,
    folder: Path,
    *,
    trainable: set[str],
    lora: Lora | None,
    base: Path,
    preprocessing: Preprocessing,
    volumes: VolumePreprocessing,
) -> None:
    """The trained model as a plain LLaVA folder, gathered from every rank's shards. Under LoRA the
    `trainable` tensors (adapters, fully trained components) are merged into a fresh full-precision
    load of `base`, the stage's starting model. The preprocessing it was trained with (of files, and of
    scans: volume spec and token budget) goes beside the weights, so inference reads files into the same
    pixels and scans into the same slabs."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # a collective under FSDP / ZeRO-3: every rank
    if not accelerator.is_main_process:
        return
    if lora:
        out = lora_lib.merged(base, lora, {k: v for k, v in state_dict.items() if k in trainable})
        state_dict = None
    else:
        out = accelerator.unwrap_model(model)
        out.set_attn_implementation("sdpa")  # the saved model must load where flash-attn is absent
    out.config.use_cache = True
    out.config.text_config.use_cache = True
    out.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    processor.save_pretrained(folder)
    save_input_descriptions(preprocessing, volumes, folder)
