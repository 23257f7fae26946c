"""Soft packing and batch planning: packed rows keep every sample to itself (loss and gradients equal
the unpacked batch's), loss normalisations, length-grouped rank-balanced micro-batches."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch
from PIL import Image

from medvl.data.conversations import Collator, ConversationDataset
from medvl.data.packing import PackedCollator, balanced_bins, pack_rows, plan_micro_batches
from medvl.model.attention import register_varlen
from medvl.model.build import build_preset, load
from medvl.model.tokenizer import train_tokenizer
from medvl.train.loop import loss_sum, model_inputs
from medvl.train.sampler import GlobalBatchSampler

LINES = [
    f"The {m} shows a {f} in the {r} region."
    for m in ("CT", "MRI", "X-ray", "ultrasound")
    for f in ("mass", "nodule", "effusion", "fracture", "lesion")
    for r in ("left", "right", "upper", "lower", "central")
]


def make_corpus(root, n: int, seed: int = 0) -> None:
    """n LLaVA records of varied lengths, 4 in 5 with a small random image."""
    rng = random.Random(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        answer = " ".join(rng.choice(LINES) for _ in range(rng.randint(1, 4)))
        rec = {
            "id": str(i),
            "conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": answer}],
        }
        if i % 5:
            pixels = torch.randint(
                0, 255, (24, 24, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8
            )
            Image.fromarray(pixels.numpy()).save(root / "img" / f"{i}.png")
            rec["image"] = f"img/{i}.png"
        records.append(rec)
    (root / "data.json").write_text(json.dumps(records))


def make_scale_root(tmp_path_factory):
    """A tiny random-weight model and a small mixed-length corpus (images + text-only)."""
    root = tmp_path_factory.mktemp("scale")
    tok = train_tokenizer(LINES * 4, vocab_size=512)
    build_preset("tiny", tokenizer=tok).save(root / "model")
    make_corpus(root, 16)
    return root


def stage_keys(root, **keys) -> dict:
    """A short packed stage on `make_scale_root`'s model and corpus, every part training."""
    return {
        "stage": "t",
        "model": str(root / "model"),
        "data": [{"path": str(root / "data.json")}],
        "freeze": {"llm": False, "projector": False, "vision": False},
        "lr": 1e-3,
        "global_batch_size": 4,
        "micro_batch_size": 2,
        "max_length": 512,
        "max_steps": 2,
        "packing": "soft",
        "log_every": 1,
    } | keys


@pytest.fixture(scope="session")
def scale_tiny_model(tmp_path_factory):
    return make_scale_root(tmp_path_factory)


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = loss_sum(model, batch) / batch["loss_units"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_head_only_at_labelled_positions_changes_nothing(scale_tiny_model):
    """`loss_sum` runs the LM head only where the next token is labelled; the loss and gradients are
    those of the plain way (logits everywhere, shifted cross-entropy)."""
    vlm = load(scale_tiny_model / "model")
    model = vlm.model
    data = ConversationDataset(vlm, [(scale_tiny_model / "data.json", None)], 512)
    batch = Collator(vlm)([data[i] for i in range(6)])
    loss, grads = _loss_and_grads(model, batch)
    n_logits = batch["head_positions"].numel() * batch["input_ids"].shape[0]
    assert 0 < n_logits < batch["input_ids"].numel() / 2  # most positions skip the head

    model.zero_grad()
    logits = model(**model_inputs(batch)).logits
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), reduction="none"
    )
    plain = (ce * batch["loss_weights"][:, 1:].reshape(-1)).sum() / batch["loss_units"]
    plain.backward()
    torch.testing.assert_close(loss, plain.detach())
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)


@pytest.mark.parametrize(("norm", "attn"), [("token", "sdpa"), ("sample", "sdpa"), ("token", "varlen")])
def test_packed_batch_equals_unpacked(scale_tiny_model, norm, attn):
    """sdpa: transformers' block-diagonal mask from position_ids; varlen: medvl's per-sample attention
    (what `packing: soft` trains with by default). The unpacked reference always runs stock sdpa."""
    vlm = load(scale_tiny_model / "model")
    model = vlm.model
    model.config.text_config.use_cache = False
    data = ConversationDataset(vlm, [(scale_tiny_model / "data.json", None)], 512)
    items = [data[i] for i in range(8)]
    unpacked = Collator(vlm, norm)(items)
    # varlen trains with the whole micro-batch in one row; the masked path with rows of <= 256 tokens
    packed = PackedCollator(vlm, None if attn == "varlen" else 256, norm)(items)
    assert packed["input_ids"].shape[0] < unpacked["input_ids"].shape[0]  # rows really hold several samples
    assert int(packed["num_tokens"]) == int(unpacked["attention_mask"].sum())
    assert int(packed["loss_units"]) == int(unpacked["loss_units"])

    loss_u, grads_u = _loss_and_grads(model, unpacked)
    register_varlen()  # as the training loop does where it selects varlen
    model.set_attn_implementation({"text_config": attn, "vision_config": "sdpa"})
    loss_p, grads_p = _loss_and_grads(model, packed)
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=1e-6)
    assert grads_p.keys() == grads_u.keys()
    scale = max(g.abs().max() for g in grads_u.values())
    for name in grads_u:  # k-projection biases have zero true gradient: compare against the global scale
        torch.testing.assert_close(grads_p[name], grads_u[name], rtol=1e-4, atol=1e-6 * scale, msg=name)

    # Control: the same packed rows with an all-ones attention mask (and no boundaries) let samples
    # see each other, and the loss changes, so the equality above is not vacuous.
    model.set_attn_implementation("sdpa")
    leaky = {k: v for k, v in packed.items() if k != "cu_seq_lens"}
    leaky["attention_mask"] = torch.ones_like(packed["input_ids"])
    leaky_loss, _ = _loss_and_grads(model, leaky)
    assert abs(leaky_loss - loss_u) > 1e-3


@pytest.mark.parametrize("kind", ["padded", "sdpa", "varlen"])
def test_vision_filler_changes_no_loss_or_gradient(scale_tiny_model, kind):
    """A micro-batch of text-only samples gets the collator's vision filler (one black image, one label
    of weight 0), so that the vision tower and projector run in every micro-batch: sharded training
    needs it (tests/test_distributed.py::test_two_machines_match_one_process failed without it). The
    loss and the language model's gradients are those without it, the vision tower's and projector's
    gradients exist and are exactly zero, and the counts leave it out."""
    vlm = load(scale_tiny_model / "model")
    model = vlm.model
    model.config.text_config.use_cache = False
    data = ConversationDataset(vlm, [(scale_tiny_model / "data.json", None)], 512)
    items = [data[i] for i in (0, 5, 10)]  # make_corpus: every fifth sample is text-only
    assert not any(images for _, images in items)
    make = {
        "padded": lambda filler: Collator(vlm, "token", filler),
        "sdpa": lambda filler: PackedCollator(vlm, 256, "token", filler),
        "varlen": lambda filler: PackedCollator(vlm, None, "token", filler),
    }[kind]
    plain, filled = make(False)(items), make(True)(items)
    assert "pixel_values" not in plain and filled["pixel_values"].shape[0] == 1
    assert int(filled["num_tokens"]) == int(plain["num_tokens"])
    assert int(filled["loss_units"]) == int(plain["loss_units"])
    image_id = model.config.image_token_id
    assert int((plain["input_ids"] == image_id).sum()) == 0
    assert int((filled["input_ids"] == image_id).sum()) == model.config.image_seq_length
    if kind != "padded":
        register_varlen()
        model.set_attn_implementation({"text_config": kind, "vision_config": "sdpa"})
    loss_p, grads_p = _loss_and_grads(model, plain)
    loss_f, grads_f = _loss_and_grads(model, filled)
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-6, atol=0)
    vision = {n for n in grads_f if ".vision_tower." in n or ".multi_modal_projector." in n}
    assert vision and not vision & grads_p.keys()  # without the filler these parts get no gradient
    assert all(torch.count_nonzero(grads_f[n]) == 0 for n in vision)
    assert grads_f.keys() - vision == grads_p.keys()
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-5, atol=1e-7, msg=name)


def test_sample_normalisation_weighs_samples_equally(scale_tiny_model):
    vlm = load(scale_tiny_model / "model")
    data = ConversationDataset(vlm, [(scale_tiny_model / "data.json", None)], 512)
    b = Collator(vlm, "sample")([data[0], data[1], data[2]])
    per_sample = b["loss_weights"].sum(-1)
    torch.testing.assert_close(per_sample, torch.ones(3))
    assert int(b["loss_units"]) == 3
    t = Collator(vlm, "token")([data[0], data[1], data[2]])
    assert int(t["loss_units"]) == int(t["loss_weights"].sum()) == int((t["labels"][:, 1:] != -100).sum())


def test_pack_rows_fills_rows_without_splitting():
    rng = random.Random(1)
    lengths = [rng.randint(20, 400) for _ in range(60)]
    rows = pack_rows(lengths, 1024)
    assert sorted(i for r in rows for i in r) == list(range(60))
    sums = [sum(lengths[i] for i in r) for r in rows]
    assert max(sums) <= 1024
    assert len(rows) <= -(-sum(lengths) // 1024) + 1
    assert sum(lengths) / (len(rows) * max(sums)) > 0.9  # padding to the longest row wastes < 10%
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([10, 2000], 1024)


def test_balanced_bins_are_deterministic_and_even():
    lengths = [random.Random(2).randint(1, 100) for _ in range(50)]
    a, b = balanced_bins(lengths, 4), balanced_bins(lengths, 4)
    assert a == b
    sums = [sum(lengths[i] for i in x) for x in a]
    assert max(sums) - min(sums) <= max(lengths)


@pytest.mark.parametrize("packed", [False, True])
def test_plan_balances_ranks_and_groups_lengths(packed):
    rng = random.Random(3)
    lengths = [rng.choice([30, 40, 600, 900]) + rng.randint(0, 20) for _ in range(64)]
    world, n_micro = 4, 16
    plan = plan_micro_batches(lengths, n_micro, world, packed=packed, group=True)
    assert sorted(i for m in plan for i in m) == list(range(64))
    if packed:  # tokens per rank
        cost = [sum(lengths[i] for i in m) for m in plan]
    else:  # padded: every micro-batch holds micro_bs samples, costed size x longest
        assert {len(m) for m in plan} == {4}
        cost = [len(m) * max(lengths[i] for i in m) for m in plan]
    per_rank = [sum(cost[j] for j in range(r, n_micro, world)) for r in range(world)]
    ungrouped = plan_micro_batches(lengths, n_micro, world, packed=packed, group=False)
    naive = [len(m) * max(lengths[i] for i in m) for m in ungrouped]
    naive_rank = [sum(naive[j] for j in range(r, n_micro, world)) for r in range(world)]
    assert max(per_rank) / min(per_rank) < (1.05 if packed else 1.2)
    if not packed:  # grouping by length cuts padding
        assert sum(cost) < 0.8 * sum(naive)
    assert max(per_rank) <= max(naive_rank)


def test_sampler_is_a_function_of_step():
    lengths = [random.Random(4).randint(5, 500) for _ in range(40)]
    kw = dict(lengths=lambda size: lengths, packed=True)
    full = GlobalBatchSampler(40, 8, 2, 2, 1, seed=5, total_steps=6, **kw)
    resumed = GlobalBatchSampler(40, 8, 2, 2, 1, seed=5, total_steps=6, start_step=3, **kw)
    assert list(full)[3 * full.accum :] == list(resumed)
    ranks = [list(GlobalBatchSampler(40, 8, 2, 2, r, seed=5, total_steps=1, **kw)) for r in range(2)]
    seen = sorted(i for rank in ranks for micro in rank for i, _ in micro)
    assert len(seen) == 8 and len(set(seen)) == 8


def test_varlen_is_registered_where_it_is_selected_not_at_import(scale_tiny_model, tmp_path):
    """Importing medvl registers nothing with transformers; a stage that selects varlen registers it
    (idempotently) before setting it on the model."""
    code = f"""
import medvl.data.packing, medvl.train.loop
from transformers import AttentionInterface
assert "varlen" not in AttentionInterface().valid_keys()
from medvl.model.build import load
from medvl.train.loop import prepare_model
from medvl.train.config import Freeze
for _ in range(2):
    model, _ = prepare_model(load({str(scale_tiny_model / "model")!r}), attn="varlen",
        freeze=Freeze(llm=False, projector=False, vision=False), lora=None, gradient_checkpointing=False,
        image_size=None, resolution_sizes=[])
    assert model.config.text_config._attn_implementation == "varlen"
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_varlen_attention_equals_block_masked_sdpa(kv_heads, device):
    """medvl's varlen attention against sdpa with an explicit block-diagonal causal mask, for plain
    and grouped-query heads, rows holding several samples and a padded tail. On a GPU in bf16 it runs
    PyTorch's flash varlen kernel, on the CPU one sdpa call per sample."""
    from medvl.model.attention import boundaries, varlen_attention_forward

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5, 0, 1, 0, 1]], device=device)
    b, s, heads, d = 2, 10, 4, 64
    g = torch.Generator().manual_seed(0)

    def rand(h):
        return torch.randn(b, h, s, d, generator=g).to(device, dtype).requires_grad_()

    q, k, v = rand(heads), rand(kv_heads), rand(kv_heads)
    cu, longest = boundaries(positions)
    assert cu.tolist() == [0, 4, 7, 9, 10, 16, 18, 20] and longest == 6
    module = torch.nn.Module()
    out, _ = varlen_attention_forward(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=longest)

    sample = (positions == 0).cumsum(-1)
    idx = torch.arange(s, device=device)
    mask = (sample[:, :, None] == sample[:, None, :]) & (idx[:, None] >= idx[None, :])
    # the reference runs in fp32 (on the GPU too, from the same bf16 values)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(
        q32, k32, v32, attn_mask=mask[:, None], enable_gqa=kv_heads != heads
    ).transpose(1, 2)

    def close(a, r):  # bf16 keeps ~3 significant digits
        tol = {"rtol": 0.05, "atol": 0.02 * float(r.abs().max())} if dtype == torch.bfloat16 else {}
        torch.testing.assert_close(a.float(), r, **tol)

    close(out, ref)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q32, k32, v32))
    for a, r in zip(grads, ref_grads, strict=True):
        close(a, r)
    # boundaries read from position_ids when none are passed
    again, _ = varlen_attention_forward(module, q, k, v, None, position_ids=positions)
    torch.testing.assert_close(again, out)


def test_varlen_picks_the_flash_kernel_under_mixed_precision(scale_tiny_model):
    """bf16 mixed precision (autocast over fp32 weights) hands attention fp32 queries and keys (the
    rotary embedding's fp32 cos/sin) and a bf16 value. varlen must still choose the bf16 flash kernel:
    it once checked the query's own dtype and, on a GPU, would have fallen back to its per-sample loop
    in every bf16 run. Checked here with CPU autocast: what each language-model layer receives, and
    the dtype `flash_dtype` picks for it; with no autocast (fp32 training) there is no flash dtype."""
    from transformers import AttentionInterface

    from medvl.model.attention import flash_dtype, varlen_attention_forward

    seen = []

    def probe(module, query, key, value, attention_mask, **kwargs):
        seen.append((query.dtype, value.dtype, flash_dtype(query)))
        return varlen_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("varlen_probe", probe)
    vlm = load(scale_tiny_model / "model")
    model = vlm.model
    model.config.text_config.use_cache = False
    model.set_attn_implementation({"text_config": "varlen_probe", "vision_config": "sdpa"})
    ids = torch.randint(5, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, position_ids=positions)
    layers = model.config.text_config.num_hidden_layers
    assert seen == [(torch.float32, torch.bfloat16, torch.bfloat16)] * layers
    seen.clear()
    model(input_ids=ids, position_ids=positions)
    assert seen == [(torch.float32, torch.float32, None)] * layers
