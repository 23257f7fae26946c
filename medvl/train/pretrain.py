"""Pretraining of the tiny parts, so the quickstart can start the recipe from "pretrained" parts.

The three stages assume a pretrained vision encoder and a pretrained language model. None can be
downloaded here, so the quickstart makes its own on the embedded synthetic data and saves them as
ordinary Hugging Face folders; the VLM is then assembled through `build_from_parts`, the same path a
user with real weights takes:

- the language model: causal-LM pretraining on the generated medical text;
- the vision tower: supervised pretraining with one linear head per label field (modality, body
  region, finding, grade, location) on the pooled CLS token; the heads are dropped at save time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionModel

from medvl.imaging import read_image
from medvl.model.build import PresetSpec, square_image_processor
from medvl.train.optim import lr_scheduler, make_optimizer

WARMUP_STEPS = 20  # then cosine decay to 0


def pretrain_llm(
    spec: PresetSpec,
    tokenizer,
    lines: list[str],
    out: Path,
    *,
    steps: int = 300,
    batch_size: int = 16,
    seq_len: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    log=print,
) -> list[float]:
    """Causal-LM pretraining on `lines` (packed into fixed-length rows, end-of-turn between lines).
    Saves model and tokenizer (with its chat template) to `out`. Returns the loss curve."""
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        **spec.llm_config,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        use_cache=False,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]:
        stream.extend(ids + [eos])
    data = torch.tensor(stream)
    n_rows = len(data) // seq_len
    rows = data[: n_rows * seq_len].view(n_rows, seq_len)
    opt = make_optimizer(model.parameters(), lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = lr_scheduler(opt, "cosine", WARMUP_STEPS, steps)
    g = torch.Generator().manual_seed(seed)
    losses = []
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        batch = rows[torch.randint(0, n_rows, (batch_size,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == steps:
            tok_s = (step + 1) * batch_size * seq_len / (time.perf_counter() - t0)
            log(
                f"  llm pretrain step {step + 1}/{steps} loss {sum(losses[-50:]) / len(losses[-50:]):.3f} "
                f"({tok_s:.0f} tok/s)"
            )
    model.config.use_cache = True
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return losses


def pretrain_vision(
    spec: PresetSpec,
    records: list[dict],
    image_root: Path,
    out: Path,
    fields: tuple[str, ...] = ("modality", "body_region", "finding", "grade", "location"),
    *,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    log=print,
) -> list[float]:
    """Supervised multi-head pretraining of a CLIP vision tower on labelled images. Saves the tower
    and its image processor to `out`. Returns the loss curve."""
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(**spec.vision_config)
    tower = CLIPVisionModel(cfg)
    processor = square_image_processor(cfg.image_size)
    classes = {f: sorted({str(r.get(f)) for r in records}) for f in fields}
    heads = torch.nn.ModuleDict({f: torch.nn.Linear(cfg.hidden_size, len(c)) for f, c in classes.items()})
    targets = {f: torch.tensor([classes[f].index(str(r.get(f))) for r in records]) for f in fields}
    images = [read_image(image_root / r["image"], size=cfg.image_size) for r in records]
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    params = list(tower.parameters()) + list(heads.parameters())
    opt = make_optimizer(params, lr, betas=(0.9, 0.999), weight_decay=0.01)
    sched = lr_scheduler(opt, "cosine", WARMUP_STEPS, steps)
    g = torch.Generator().manual_seed(seed)
    losses, accs = [], []
    tower.train()
    for step in range(steps):
        idx = torch.randint(0, len(records), (batch_size,), generator=g)
        pooled = tower(pixel_values=pixels[idx]).pooler_output
        loss = torch.zeros(())
        correct = []
        for f, head in heads.items():
            logits = head(pooled)
            loss = loss + torch.nn.functional.cross_entropy(logits, targets[f][idx])
            correct.append((logits.argmax(-1) == targets[f][idx]).float().mean().item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        accs.append(sum(correct) / len(correct))
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(
                f"  vision pretrain step {step + 1}/{steps} loss {sum(losses[-50:]) / len(losses[-50:]):.3f} "
                f"label accuracy {sum(accs[-50:]) / len(accs[-50:]):.2f}"
            )
    tower.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (Path(out) / "label_heads.json").write_text(json.dumps(classes, indent=1))
    return losses
