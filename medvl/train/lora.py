"""LoRA (and QLoRA) through peft, per component, and the merge back into a plain LLaVA checkpoint."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch
from accelerate import PartialState
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoProcessor, LlavaForConditionalGeneration

from medvl.model.build import VLM, load_preprocessing, load_volumes
from medvl.train.config import Lora

# The linear layers of a decoder block (Llama, Qwen2, Mistral, InternLM2 ports) and of a CLIP/SigLIP
# encoder block.
DEFAULT_TARGETS = {
    "llm": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "vision": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}
PREFIX = {"llm": r"model\.language_model\.", "vision": r"model\.vision_tower\."}


def lora_config(lora: Lora) -> LoraConfig:
    """One peft config for both components: a regex over module names, ranks per component."""
    patterns, ranks, alphas = [], {}, {}
    for part in ("llm", "vision"):
        target = getattr(lora, part)
        if target is None:
            continue
        names = "|".join(map(re.escape, target.target_modules or DEFAULT_TARGETS[part]))
        patterns.append(rf"{PREFIX[part]}(.*\.)?({names})")
        ranks[rf"{PREFIX[part]}.*"] = target.r
        alphas[rf"{PREFIX[part]}.*"] = target.alpha
    first = lora.llm or lora.vision
    return LoraConfig(
        r=first.r,
        lora_alpha=first.alpha,
        lora_dropout=lora.dropout,
        target_modules="|".join(patterns),
        rank_pattern=ranks,
        alpha_pattern=alphas,
        bias="none",
    )


def check_qlora() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(
            "lora.quantize_4bit (QLoRA) needs a CUDA GPU: bitsandbytes 4-bit has no CPU path here"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError("lora.quantize_4bit (QLoRA) needs bitsandbytes: pip install bitsandbytes")


def load_4bit(folder: Path, lora: Lora) -> VLM:
    """The frozen base in NF4; the projector, the head and any component without adapters stay in
    bf16 (they may train)."""
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    skip = ["multi_modal_projector", "lm_head"] + (["vision_tower"] if lora.vision is None else [])
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=skip,
    )
    # each process quantizes its own copy onto its own GPU
    gpu = PartialState().local_process_index
    model = LlavaForConditionalGeneration.from_pretrained(
        folder, quantization_config=quant, dtype=torch.bfloat16, use_safetensors=True, device_map={"": gpu}
    )
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    return VLM(
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False),
        processor,
        load_preprocessing(folder),
        load_volumes(folder),
    )


def add_adapters(model: LlavaForConditionalGeneration, lora: Lora) -> PeftModel:
    return get_peft_model(model, lora_config(lora))


def merged(base_folder: Path, lora: Lora, trained: dict[str, torch.Tensor]) -> LlavaForConditionalGeneration:
    """A plain model: a fresh full-precision load of the base, the trained tensors (adapters and any
    fully trained component) put in, the adapters merged into the weights and removed. Going back to
    the full-precision base keeps QLoRA's quantisation out of the saved weights."""
    base = LlavaForConditionalGeneration.from_pretrained(
        base_folder, dtype=torch.float32, use_safetensors=True
    )
    peft_model = add_adapters(base, lora)
    trained = {k: v.float() for k, v in trained.items()}
    missing = set(trained) - set(peft_model.state_dict())
    if missing:
        raise ValueError(f"trained tensors with no place in the model: {sorted(missing)[:5]}")
    peft_model.load_state_dict(trained, strict=False)
    return peft_model.merge_and_unload()
