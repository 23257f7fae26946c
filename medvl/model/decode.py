"""Batched decoding (transformers' `generate`): the one path `medvl chat`, `eval` and `serve` share.

A conversation is a list of messages in the transformers/OpenAI shape; images are given beside it in
the order their `{"type": "image"}` parts appear. The prompt comes from the processor's chat
template, exactly as stock `processor.apply_chat_template` builds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from medvl.model.build import VLM


@dataclass
class Conversation:
    messages: list[dict]
    images: list[Image.Image] = field(default_factory=list)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"


def user_turn(question: str, image: Image.Image | None = None) -> Conversation:
    """A single question, with or without an image."""
    content: list[dict] = [{"type": "image"}] if image is not None else []
    content.append({"type": "text", "text": question})
    return Conversation([{"role": "user", "content": content}], [image] if image is not None else [])


def encode(vlm: VLM, conversations: list[Conversation]) -> dict[str, torch.Tensor]:
    """Prompts for a batch (left-padded), with the image tokens expanded by the processor."""
    prompts = [
        vlm.processor.apply_chat_template(c.messages, add_generation_prompt=True) for c in conversations
    ]
    images = [im.convert("RGB") for c in conversations for im in c.images]
    for c in conversations:
        n_parts = sum(
            1
            for m in c.messages
            if not isinstance(m["content"], str)
            for p in m["content"]
            if p.get("type") in ("image", "image_url")
        )
        if n_parts != len(c.images):
            raise ValueError(f"conversation has {n_parts} image parts but {len(c.images)} images")
    return vlm.processor(text=prompts, images=images or None, padding=True, return_tensors="pt").to(
        vlm.model.device
    )


@torch.inference_mode()
def generate(
    vlm: VLM,
    conversations: list[Conversation],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
    streamer=None,
) -> list[Completion]:
    """Greedy when temperature is 0, else sampling. Returns one completion per conversation."""
    if not conversations:
        return []
    inputs = encode(vlm, conversations)
    prompt_len = inputs["input_ids"].shape[1]
    if seed is not None:
        torch.manual_seed(seed)
    kwargs: dict = dict(max_new_tokens=max_new_tokens, streamer=streamer)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if stop:
        # transformers' StopStringCriteria: a row ends once its text ends in a stop string, across token
        # boundaries; the others go on. The stop string itself is cut from the text below.
        kwargs.update(stop_strings=stop, tokenizer=vlm.tokenizer)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(vlm.model.dtype)
    out = vlm.model.generate(**inputs, **kwargs)
    eos, pad = vlm.tokenizer.eos_token_id, vlm.tokenizer.pad_token_id
    results = []
    for i, row in enumerate(out[:, prompt_len:].tolist()):
        ids: list[int] = []
        finish = "length"
        for t in row:
            if t == eos:
                finish = "stop"
                break
            if t == pad:
                break
            ids.append(t)
        text = vlm.tokenizer.decode(ids, skip_special_tokens=True)
        for s in stop or []:
            if s in text:
                text, finish = text[: text.index(s)], "stop"
        n_prompt = int(inputs["attention_mask"][i].sum())
        results.append(Completion(text, ids, n_prompt, len(ids), finish))
    return results
