"""Training throughput: medvl (soft packing, length-grouped batches) against the baseline a user would
otherwise write, stock transformers `Trainer` + `LlavaForConditionalGeneration` with padded batches,
on the same model, data, global batch and number of steps, in the same run.

The corpus mixes lengths the way instruction mixes do: SLAKE VQA (a real image + a short question and
answer), generated captions of varied length about the same images (from SLAKE's modality, region and
box labels), and text-only questions. Reported: useful (non-padding) tokens/s, padding fraction, and
MFU = model matmul FLOP/s / the matmul peak measured on this machine in this run (and against the
989 TFLOP/s bf16 datasheet peak on an H100/H200). The first step of each run is warm-up and not timed.

    python benchmarks/train_throughput.py --slake ../shared/data/slake                   # CPU, tiny
    python benchmarks/train_throughput.py --device cuda --size 1.5b --micro-batch 8      # H100
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

# Model shapes with random weights (nothing is downloaded): a CLIP ViT-L/14-336 tower with a
# Qwen2.5-1.5B-shaped or Llama-7B-shaped language model, or the tiny test model.
VISION_L14 = dict(
    model_type="clip_vision_model",
    image_size=336,
    patch_size=14,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    projection_dim=768,
)
SIZES = {
    "tiny": None,  # medvl/presets/tiny.yaml
    "1.5b": (
        VISION_L14,
        dict(
            model_type="qwen2",
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            max_position_embeddings=4096,
        ),
    ),
    "7b": (
        VISION_L14,
        dict(
            model_type="llama",
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
        ),
    ),
}


SIDES = ["left", "right", "upper", "lower"]


def build_corpus(slake: Path, n: int, seed: int) -> list[dict]:
    """LLaVA-style records: 50% SLAKE VQA, 25% captions of 1-12 sentences, 25% text-only Q&A."""
    rows = [r for r in json.loads((slake / "train.json").read_text()) if r["q_lang"] == "en"]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        r = rng.choice(rows)
        kind = rng.random()
        if kind < 0.5:
            conv = [
                {"from": "human", "value": f"<image>\n{r['question']}"},
                {"from": "gpt", "value": r["answer"]},
            ]
            out.append({"id": f"vqa{i}", "image": r["img_name"], "conversations": conv})
        elif kind < 0.75:
            boxes = json.loads((slake / "imgs" / r["img_name"].split("/")[0] / "detection.json").read_text())
            labels = [k for b in boxes for k in b] or ["no labelled structure"]
            sentences = [f"This is a {r['modality']} image of the {r['location'].lower()}."] + [
                f"The {rng.choice(labels).lower()} is visible in the {rng.choice(SIDES)} part of the image, "
                f"with {rng.choice(['normal', 'slightly increased', 'reduced'])} intensity."
                for _ in range(rng.randint(1, 12))
            ]
            conv = [
                {"from": "human", "value": "<image>\nDescribe the image in detail."},
                {"from": "gpt", "value": " ".join(sentences)},
            ]
            out.append({"id": f"cap{i}", "image": r["img_name"], "conversations": conv})
        else:
            conv = [
                {
                    "from": "human",
                    "value": f"In a {r['modality']} of the {r['location'].lower()}, {r['question']}",
                },
                {"from": "gpt", "value": f"{r['answer']}. " * rng.randint(1, 4)},
            ]
            out.append({"id": f"txt{i}", "conversations": conv})
    return out


def build_model(size: str, corpus: list[dict], folder: Path, vocab: int) -> None:
    from medvl.model.build import PresetSpec, build_from_configs, build_preset
    from medvl.model.tokenizer import train_tokenizer

    texts = [t["value"].replace("<image>\n", "") for r in corpus for t in r["conversations"]]
    tok = train_tokenizer(texts, vocab_size=vocab)
    if SIZES[size] is None:
        vlm = build_preset("tiny", tokenizer=tok)
    else:
        vision, llm = SIZES[size]
        spec = PresetSpec(name=size, vision_config=vision, llm_config=llm, vision_feature_layer=-2)
        vlm = build_from_configs(spec, tok)
    vlm.save(folder)


def summarise(
    name: str, steps: list[dict], model, peak: float, datasheet: float | None, memory: float
) -> dict:
    from medvl.train.metrics import flops_per_step

    timed = steps[1:]  # the first step warms up kernels and allocators
    # the LM head's FLOPs where it ran: medvl's loop records it, the baseline runs it on every token
    flops = sum(
        flops_per_step(model, s["tokens"], s["images"], n_logits=s.get("logit_positions")) for s in timed
    )
    seconds = sum(s["seconds"] for s in timed)
    tokens = sum(s["tokens"] for s in timed)
    positions = sum(s["positions"] for s in timed)
    row = {
        "run": name,
        "steps_timed": len(timed),
        "useful_tokens_per_s": tokens / seconds,
        "padding_fraction": 1 - tokens / positions,
        "mfu_measured_peak": flops / seconds / peak,
    }
    if memory:
        row["peak_gpu_memory_gib"] = memory / 2**30
    if datasheet:
        row["mfu_datasheet_peak"] = flops / seconds / datasheet
    return row


def run_medvl(args, folder: Path, data: Path, slake: Path, work: Path) -> list[dict]:
    from medvl.train.config import load_config
    from medvl.train.loop import train_stage

    cfg = {
        "stage": "bench",
        "model": str(folder),
        "output_dir": str(work / "medvl"),
        "data": [{"path": str(data), "image_root": str(slake / "imgs")}],
        "freeze": {"llm": False, "projector": False, "vision": False},
        "lr": 1e-5,
        "warmup_ratio": 0.0,
        "global_batch_size": args.global_batch,
        "micro_batch_size": args.packed_micro_batch or args.micro_batch,
        "max_length": args.max_length,
        "max_steps": args.steps,
        "packing": "soft",
        "group_by_length": True,
        "precision": "bf16" if args.device == "cuda" else "fp32",
        "attn_implementation": args.attn,
        "gradient_checkpointing": args.gradient_checkpointing,
        "log_every": 1000,
    }
    path = work / "medvl.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train_stage(load_config(path))
    return json.loads((work / "medvl" / "history.json").read_text())


def run_baseline(args, folder: Path, data: Path, slake: Path, work: Path) -> list[dict]:
    """What a user writes with stock transformers: tokenize, pad each batch to its longest, Trainer."""
    from transformers import LlavaForConditionalGeneration, Trainer, TrainerCallback, TrainingArguments

    from medvl.data.conversations import Collator, ConversationDataset
    from medvl.model.build import load

    vlm = load(folder)
    attn = "sdpa" if args.attn == "auto" else args.attn  # what a user of stock transformers gets
    model = LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation=attn)
    model.config.use_cache = False
    dataset = ConversationDataset(vlm, [(data, slake / "imgs")], args.max_length)
    pad = Collator(vlm)
    keys = ("input_ids", "attention_mask", "labels", "pixel_values")
    steps: list[dict] = []

    counts = [0, 0, 0]  # non-padding tokens, positions, images since the last step

    def collate(batch):
        b = pad(batch)
        n_img = b["pixel_values"].shape[0] if "pixel_values" in b else 0
        counts[:] = [counts[0] + int(b["num_tokens"]), counts[1] + b["input_ids"].numel(), counts[2] + n_img]
        return {k: b[k] for k in keys if k in b}

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if not steps:
                self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            steps.append(
                {"tokens": counts[0], "positions": counts[1], "images": counts[2], "seconds": now - self.t}
            )
            counts[:] = [0, 0, 0]
            self.t = now

    targs = TrainingArguments(
        output_dir=str(work / "baseline"),
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.global_batch // args.micro_batch,
        max_steps=args.steps,
        learning_rate=1e-5,
        bf16=args.device == "cuda",
        use_cpu=args.device == "cpu",
        report_to=[],
        save_strategy="no",
        logging_steps=1000,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        activation_checkpointing=args.gradient_checkpointing,
        seed=0,
        disable_tqdm=True,
    )
    Trainer(
        model=model, args=targs, train_dataset=dataset, data_collator=collate, callbacks=[Timer()]
    ).train()
    return steps


def main() -> None:
    default_slake = Path(
        os.environ.get("MEDVL_SHARED_DATA", Path(__file__).resolve().parents[1] / "../shared/data")
    )
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--slake", type=Path, default=default_slake / "slake", help="SLAKE root (train.json, imgs/)"
    )
    p.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model shape, random weights")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument(
        "--packed-micro-batch",
        type=int,
        help="medvl's samples per micro-batch (default: --micro-batch); packed rows hold no padding, so more "
        "samples fit the memory the padded baseline needs for --micro-batch (peak memory is reported)",
    )
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument(
        "--attn",
        default="auto",
        help="attention implementation; auto: medvl's default for packed rows (varlen) against the "
        "baseline's sdpa; any other value is used by both runs",
    )
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run the pair (medvl, then the baseline) this many times; the speedup reported is the "
        "median of the pairs' ratios (a shared machine's speed drifts between runs)",
    )
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if not (args.slake / "train.json").is_file():
        raise SystemExit(f"{args.slake}: no SLAKE train.json (pass --slake)")

    from medvl.train.metrics import measure_matmul_flops

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    n = 8192 if args.device == "cuda" else 1024
    peak = measure_matmul_flops(
        torch.device(args.device), dtype, n=n, reps=20 if args.device == "cuda" else 4
    )
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    datasheet = 989e12 if any(k in device_name for k in ("H100", "H200")) else None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = build_corpus(args.slake, args.samples, seed=0)
        data = work / "corpus.json"
        data.write_text(json.dumps(corpus))
        build_model(args.size, corpus, work / "model", args.vocab)
        pairs = []  # one (medvl, baseline) pair per repeat, run back to back
        for _ in range(args.repeats):
            runs = {}
            for name, run in (
                ("medvl (soft packing)", run_medvl),
                ("transformers Trainer (padded)", run_baseline),
            ):
                gc.collect()  # the previous run's model and optimizer
                if args.device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                shutil.rmtree(work / "medvl", ignore_errors=True)
                steps = run(args, work / "model", data, args.slake, work)
                runs[name] = (steps, torch.cuda.max_memory_allocated() if args.device == "cuda" else 0)
            pairs.append(runs)
        from medvl.model.build import load

        model = load(work / "model").model  # for its parameter counts (every part trains in both runs)
    repeats = [
        [summarise(name, steps, model, peak, datasheet, mem) for name, (steps, mem) in runs.items()]
        for runs in pairs
    ]
    ratios = [rows[0]["useful_tokens_per_s"] / rows[1]["useful_tokens_per_s"] for rows in repeats]
    result = {
        "device": device_name,
        "size": args.size,
        "matmul_peak_measured_tflops": peak / 1e12,
        "args": vars(args) | {"slake": str(args.slake), "out": str(args.out)},
        "repeats": [{"runs": rows, "speedup_useful_tokens_per_s": r} for rows, r in zip(repeats, ratios)],
        "speedup_useful_tokens_per_s": statistics.median(ratios),  # median over the repeats
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
