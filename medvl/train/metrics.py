"""What a training step is measured by: its token, position, image and LM-head counts, its matmul
FLOPs, and from them tokens/s and MFU (model FLOPs utilisation) for TensorBoard and the progress bar."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from medvl.model.build import native_frames, tower_patches


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
    if native_frames(vt.config):  # a 3D tower: its tubelets of one volume, and its CLS token
        patches = tower_patches(vt.config) + 1
    else:
        patches = ((image_size or vt.config.image_size) // vt.config.patch_size) ** 2 + 1
    lm = (n_llm * n_text_tokens + n_head * n_logits) * llm_factor
    return lm + n_vision * patches * n_images * vision_factor


COUNTS = ("tokens", "positions", "images", "logit_positions")


@dataclass
class StepCounts:
    """One rank's share of an optimizer step, counted from the CPU batches (reading a GPU tensor
    would make the host wait on the GPU): non-padding tokens, all positions (padding included),
    images and LM-head positions as one CPU tensor (reduced across ranks in one call), and the
    matmul FLOPs."""

    counts: torch.Tensor
    flops: float

    @classmethod
    def of(cls, micro: list[dict[str, torch.Tensor]], model, image_size: int | None) -> StepCounts:
        counts = torch.zeros(len(COUNTS), dtype=torch.long)
        flops = 0.0
        for b in micro:
            n_tokens = int(b["num_tokens"])
            n_img = b["pixel_values"].shape[0] if "pixel_values" in b else 0
            n_logits = b["head_positions"].numel() * b["input_ids"].shape[0]
            counts += torch.tensor([n_tokens, b["input_ids"].numel(), n_img, n_logits])
            flops += flops_per_step(model, n_tokens, n_img, image_size, n_logits)
        return cls(counts, flops)

    @property
    def tokens(self) -> int:
        return int(self.counts[0])

    def global_counts(self, accelerator: Accelerator) -> dict[str, int]:
        """Every rank's counts summed, by name."""
        return dict(zip(COUNTS, accelerator.reduce(self.counts.to(accelerator.device), "sum").tolist()))


class MetricsLogger:
    """Loss, learning rate, tokens/s and MFU, averaged over the steps since the last report, to the
    accelerator's trackers (TensorBoard) and the progress bar every `every` steps and at the end.
    Tokens/s counts every rank (this rank's tokens x processes: the batches are balanced across ranks);
    MFU is this rank's FLOPs over this rank's `peak`."""

    def __init__(self, accelerator: Accelerator, peak: float, every: int, bar: tqdm) -> None:
        self.accelerator, self.peak, self.every, self.bar = accelerator, peak, every, bar
        self._reset()

    def _reset(self) -> None:
        self.loss, self.tokens, self.flops, self.steps = 0.0, 0, 0.0, 0
        self.t = time.perf_counter()

    def step(self, step: int, loss: float, lr: float, counts: StepCounts, last: bool) -> None:
        """After optimizer step `step` (1-based); `last`: the run's final step, always reported."""
        self.loss += loss
        self.tokens += counts.tokens
        self.flops += counts.flops
        self.steps += 1
        self.bar.update(1)
        if step % self.every and not last:
            return
        dt = time.perf_counter() - self.t
        tok_s = self.tokens * self.accelerator.num_processes / dt
        mfu = self.flops / dt / self.peak
        metrics = {"loss": self.loss / self.steps, "lr": lr, "tokens_per_s": tok_s, "mfu": mfu}
        self.accelerator.log(metrics, step=step)
        self.bar.set_postfix(
            loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}", mfu=f"{mfu:.1%}"
        )
        self._reset()
