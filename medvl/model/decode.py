"""Batched decoding (transformers' `generate`): the one path `medvl chat`, `eval` and `serve` share.

A conversation is a list of messages in the transformers/OpenAI shape; images are given beside it in
the order their `{"type": "image"}` parts appear. The prompt comes from the processor's chat
template, exactly as stock `processor.apply_chat_template` builds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from medvl.model.build import VLM, native_frames, tower_slabs


@dataclass
class Conversation:
    """`images`: one per image part. For a native-route model (a 3D tower, `native_frames`) an image
    part is a volume: its T slabs as a list, or a 2D image, fed as a still volume (the image T times)."""

    messages: list[dict]
    images: list[Image.Image | list[Image.Image]] = field(default_factory=list)


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
    """Prompts for a batch (left-padded), with the image tokens expanded by the processor. A
    native-route model's volumes: each `<image>` becomes the config's `image_seq_length` image tokens
    (the processor's own check would count a volume's slabs as images) and the pixel values
    [n, T, 3, H, W] come from its image processor, as in training."""
    prompts = [
        vlm.processor.apply_chat_template(c.messages, add_generation_prompt=True) for c in conversations
    ]
    frames = native_frames(vlm.model.config)
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
    if frames:
        return encode_volumes(vlm, prompts, [im for c in conversations for im in c.images], frames)
    images = [im.convert("RGB") for c in conversations for im in c.images]
    return vlm.processor(text=prompts, images=images or None, padding=True, return_tensors="pt").to(
        vlm.model.device
    )


def encode_volumes(
    vlm: VLM, prompts: list[str], inputs: list[Image.Image | list[Image.Image]], frames: int
) -> dict[str, torch.Tensor]:
    """`encode` for a native-route model (its docstring)."""
    volumes = []
    for x in inputs:
        slabs = [x] * frames if isinstance(x, Image.Image) else list(x)
        if len(slabs) != frames:
            raise ValueError(f"a volume of {len(slabs)} slabs; this model's 3D tower reads {frames}")
        volumes.append(tower_slabs(vlm.model.config, slabs))
    token = vlm.processor.image_token
    expanded = [p.replace(token, token * vlm.model.config.image_seq_length) for p in prompts]
    out = dict(vlm.tokenizer(expanded, padding=True, return_tensors="pt"))
    if volumes:
        out |= vlm.processor.image_processor(volumes, return_tensors="pt")
    return {k: v.to(vlm.model.device) for k, v in out.items()}


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
