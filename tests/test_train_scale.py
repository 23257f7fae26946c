"""Training at scale on the tiny model: packed stages with exact resume, activation checkpointing,
progressive resolution, LoRA merged into a plain checkpoint, QLoRA's clear error without a GPU."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from test_packing import make_scale_root, stage_keys
from transformers import LlavaForConditionalGeneration

from medvl.data.conversations import ConversationDataset
from medvl.model.build import load
from medvl.train.config import load_config
from medvl.train.loop import train_stage
from medvl.train.sampler import GlobalBatchSampler


@pytest.fixture(scope="session")
def scale_tiny_model(tmp_path_factory):
    return make_scale_root(tmp_path_factory)


def stage(root, out, **keys):
    cfg = stage_keys(root, output_dir=str(out), **keys)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path)


def history(cfg):
    return json.loads((cfg.output_dir / "history.json").read_text())


def test_packed_stage_resumes_exactly(scale_tiny_model, tmp_path):
    full = stage(scale_tiny_model, tmp_path / "full", max_steps=3, loss_normalization="sample")
    train_stage(full)
    cut = stage(scale_tiny_model, tmp_path / "cut", max_steps=3, save_every=1, loss_normalization="sample")
    train_stage(cut, stop_after=2)
    train_stage(cut, resume=True)
    a, b = history(full), history(cut)
    assert [h["step"] for h in b] == [1, 2, 3]
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["tokens"] == y["tokens"] and x["positions"] >= x["tokens"]


@pytest.mark.parametrize("attn", ["varlen", "sdpa"])
def test_activation_checkpointing_changes_nothing_but_memory(scale_tiny_model, tmp_path, attn):
    """Recomputing activations in the backward pass gives the same losses (packed rows: the sample
    boundaries reach the recomputed attention too)."""
    plain = stage(scale_tiny_model, tmp_path / "plain", attn_implementation=attn)
    ckpt = stage(scale_tiny_model, tmp_path / "ckpt", attn_implementation=attn, gradient_checkpointing=True)
    train_stage(plain)
    train_stage(ckpt)
    a, b = history(plain), history(ckpt)
    assert [h["loss"] for h in b] == pytest.approx([h["loss"] for h in a], rel=1e-5)
    assert a[1]["loss"] != pytest.approx(a[0]["loss"], rel=1e-3)  # it trained: step 2 differs from step 1


def test_progressive_resolution(scale_tiny_model, tmp_path):
    vlm = load(scale_tiny_model / "model")
    data = ConversationDataset(vlm, [(scale_tiny_model / "data.json", None)], 512)
    vision = vlm.model.config.vision_config
    half = vision.image_size // 2
    s, _ = data[1, half]  # half the size: a quarter of the patches
    native, _ = data[1]
    image_id = vlm.model.config.image_token_id
    n_native, n_half = (vision.image_size // vision.patch_size) ** 2, (half // vision.patch_size) ** 2
    assert native.input_ids.count(image_id) == n_native and s.input_ids.count(image_id) == n_half
    assert len(native.input_ids) - len(s.input_ids) == n_native - n_half
    assert data.lengths()[1] - data.lengths(half)[1] == n_native - n_half

    schedule = [{"until_step": 1, "size": half}, {"size": vision.image_size}]
    cfg = stage(scale_tiny_model, tmp_path / "prog", resolution_schedule=schedule)
    train_stage(cfg)
    h = history(cfg)
    order = GlobalBatchSampler(len(data), 4, 2, 1, 0, cfg.seed, 2)  # the batches the stage saw
    assert h[0]["tokens"] == sum(data.lengths(half)[i] for i in order.global_batches(0))
    assert h[1]["tokens"] == sum(data.lengths()[i] for i in order.global_batches(1))
    with pytest.raises(ValueError, match=f"ends at {half}px"):
        train_stage(stage(scale_tiny_model, tmp_path / "bad", resolution_schedule=[{"size": half}]))
    with pytest.raises(ValueError, match="until_step"):
        stage(
            scale_tiny_model,
            tmp_path / "bad2",
            resolution_schedule=[{"size": half}, {"size": vision.image_size}],
        )


def test_loader_processes_build_the_same_batches(scale_tiny_model, tmp_path):
    """Batches built in DataLoader worker processes (as on a GPU machine) are the batches the loop
    builds itself: same losses and token counts, with the image size changing mid-stage."""
    size = load(scale_tiny_model / "model").model.config.vision_config.image_size
    schedule = [{"until_step": 1, "size": size // 2}, {"size": size}]
    runs = {
        n: stage(scale_tiny_model, tmp_path / f"w{n}", num_workers=n, resolution_schedule=schedule)
        for n in (0, 2)
    }
    for cfg in runs.values():
        train_stage(cfg)
    a, b = history(runs[0]), history(runs[2])
    assert [h["tokens"] for h in b] == [h["tokens"] for h in a]
    assert [h["loss"] for h in b] == pytest.approx([h["loss"] for h in a], rel=1e-6)


def test_lora_merges_into_plain_checkpoint(scale_tiny_model, tmp_path):
    cfg = stage(
        scale_tiny_model,
        tmp_path / "lora",
        lr=5e-2,
        lora={"llm": {"r": 4, "alpha": 8}, "vision": {"r": 2, "alpha": 4}},
        freeze={"llm": False, "projector": True, "vision": False},
    )
    final = train_stage(cfg)
    merged = LlavaForConditionalGeneration.from_pretrained(final)  # stock transformers, no peft
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base = load(scale_tiny_model / "model").model
    sd, bd = merged.state_dict(), base.state_dict()
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    v = "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(sd[q], bd[q]) and not torch.equal(sd[v], bd[v])  # adapters merged in
    for name in (
        "lm_head.weight",
        "model.multi_modal_projector.linear_1.weight",
        "model.language_model.norm.weight",
    ):
        assert torch.equal(sd[name], bd[name])  # frozen, or not adapted under LoRA


def test_qlora_needs_a_gpu(scale_tiny_model, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU error")
    cfg = stage(scale_tiny_model, tmp_path / "q", lora={"llm": {"r": 4}, "quantize_4bit": True})
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        train_stage(cfg)


def test_lora_config_errors(scale_tiny_model, tmp_path):
    with pytest.raises(ValueError, match="freeze.llm is true"):
        stage(
            scale_tiny_model,
            tmp_path / "e",
            lora={"llm": {"r": 4}},
            freeze={"llm": True, "projector": False, "vision": True},
        )


@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_unread_vision_parameters_are_exactly_those_without_gradient(scale_tiny_model, feature_layer):
    """The vision parameters medvl keeps out of the optimizer are exactly those a real backward pass
    on image samples leaves without gradient (FSDP/ZeRO checkpoints need state for all the others)."""
    from medvl.data.conversations import Collator
    from medvl.train.loop import model_inputs, unread_vision_parameters

    vlm = load(scale_tiny_model / "model")
    model = vlm.model
    model.config.vision_feature_layer = feature_layer
    data = ConversationDataset(vlm, [(scale_tiny_model / "data.json", None)], 512)
    batch = Collator(vlm)([data[i] for i in (1, 2, 3)])  # samples 1-3 have images
    assert "pixel_values" in batch
    model(**model_inputs(batch), labels=batch["labels"]).loss.backward()
    no_grad = {n for n, p in model.model.vision_tower.named_parameters() if p.grad is None}
    unread = unread_vision_parameters(model)
    assert no_grad == {n for n, p in model.model.vision_tower.named_parameters() if p in unread}
    assert no_grad  # the final norm at least
