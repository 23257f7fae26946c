"""The model: presets, building from pretrained parts, and the Hugging Face round trip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from medvl.model.build import build_from_parts, list_presets, load, load_preset
from medvl.model.decode import generate, user_turn
from medvl.prompts import IMAGE_TOKEN

REPO = Path(__file__).resolve().parent.parent


def _image(seed: int = 0, size=(90, 70)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def test_presets_are_valid_and_name_the_reference_recipe():
    assert {"tiny", "gmai-vl-7b", "siglip-qwen2.5-1.5b"} <= set(list_presets())
    gmai = load_preset("gmai-vl-7b")
    assert gmai.vision == "openai/clip-vit-large-patch14-336" and gmai.image_size == 336
    assert gmai.llm == "internlm/internlm2_5-7b-chat"
    small = load_preset("siglip-qwen2.5-1.5b")
    assert small.vision_feature_select_strategy == "full"  # SigLIP has no CLS token to drop


def test_tiny_model_structure(tiny_model_dir):
    vlm = load(tiny_model_dir)
    m = vlm.model
    assert type(m).__name__ == "LlavaForConditionalGeneration"
    proj = m.model.multi_modal_projector
    assert isinstance(proj.act, torch.nn.GELU) or "gelu" in type(proj.act).__name__.lower()
    assert proj.linear_1.in_features == m.config.vision_config.hidden_size
    assert proj.linear_2.out_features == m.config.text_config.hidden_size
    assert m.config.image_token_id == vlm.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    # The processor expands one <image> into exactly the number of features the tower produces.
    enc = vlm.processor(text=["<image>\nhi"], images=[_image()], return_tensors="pt")
    n_tokens = int((enc["input_ids"] == m.config.image_token_id).sum())
    with torch.no_grad():
        feats = m.model.get_image_features(pixel_values=enc["pixel_values"])
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    n_feats = (
        sum(f.shape[0] for f in feats)
        if isinstance(feats, (list, tuple))
        else feats.shape[0] * feats.shape[1]
    )
    assert n_tokens == n_feats == m.config.image_seq_length
    assert not list(tiny_model_dir.glob("*.bin")) and (tiny_model_dir / "model.safetensors").exists()


STOCK_SCRIPT = r"""
import json, sys
import numpy as np
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
folder = sys.argv[1]
model = LlavaForConditionalGeneration.from_pretrained(folder)
processor = AutoProcessor.from_pretrained(folder)
img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 70, 3), dtype=np.uint8))
content = [{"type": "image"}, {"type": "text", "text": "What modality is this?"}]
messages = [{"role": "user", "content": content}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=[prompt], images=[img], return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
assert "medvl" not in sys.modules, "the stock path must not import medvl"
print(json.dumps({"prompt": prompt, "ids": out[0, inputs["input_ids"].shape[1]:].tolist()}))
"""


def test_checkpoint_loads_and_generates_identically_in_stock_transformers(tiny_model_dir, tmp_path):
    # Give the random model a strong, non-degenerate output so that identical tokens mean something.
    vlm = load(tiny_model_dir)
    with torch.no_grad():
        vlm.model.lm_head.weight.normal_(0, 0.5)
    vlm.save(tmp_path / "m")
    ours = generate(vlm, [user_turn("What modality is this?", _image(0))], max_new_tokens=12)[0]
    res = subprocess.run(
        [sys.executable, "-c", STOCK_SCRIPT, str(tmp_path / "m")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    stock = json.loads(res.stdout.strip().splitlines()[-1])
    assert (
        "<|im_start|>user\n<image>\nWhat modality is this?<|im_end|>\n<|im_start|>assistant\n"
        in stock["prompt"]
    )
    eos = vlm.tokenizer.eos_token_id
    stock_ids = stock["ids"][: stock["ids"].index(eos)] if eos in stock["ids"] else stock["ids"]
    assert len(ours.token_ids) > 0
    assert stock_ids == ours.token_ids


def test_batched_generation_matches_one_at_a_time(tiny_model_dir):
    vlm = load(tiny_model_dir)
    convs = [
        user_turn("Describe the image.", _image(1)),
        user_turn("What is CT?"),
        user_turn("A longer question about the modality of this image?", _image(2, (40, 120))),
    ]
    batched = generate(vlm, convs, max_new_tokens=8)
    single = [generate(vlm, [c], max_new_tokens=8)[0] for c in convs]
    assert [b.token_ids for b in batched] == [s.token_ids for s in single]
    assert all(b.prompt_tokens == s.prompt_tokens for b, s in zip(batched, single))


def test_stop_strings_end_each_row_at_its_first_stop(tiny_model_dir):
    """A row ends at the token that completes a stop string (one spanning a token boundary here), and
    its text is cut before the stop string; the other rows of the batch go on as without it. Sampled
    with a seed (greedy text from random weights is the same for every prompt), so the rows differ."""
    vlm = load(tiny_model_dir)
    with torch.no_grad():  # a non-degenerate output, as above
        vlm.model.lm_head.weight.normal_(0, 0.5)
    convs = [user_turn("Describe the image.", _image(1)), user_turn("What is CT?")]
    kw = dict(max_new_tokens=16, temperature=1.0, seed=0)
    free = generate(vlm, convs, **kw)
    ids, text = free[0].token_ids, free[0].text
    # a two-character stop string across the boundary between two of row 0's tokens, first there
    stop = None
    for i in range(2, len(ids) - 1):
        b = len(vlm.tokenizer.decode(ids[:i], skip_special_tokens=True))
        cand = text[b - 1 : b + 1]
        if len(cand) == 2 and cand.isprintable() and "\ufffd" not in cand and text.index(cand) == b - 1:
            stop = cand
            break
    assert stop is not None, text
    got = generate(vlm, convs, stop=["@@", stop], **kw)
    for f, g in zip(free, got, strict=True):
        if stop not in f.text:
            assert (g.text, g.token_ids, g.finish_reason) == (f.text, f.token_ids, f.finish_reason)
            continue
        n = next(k for k in range(1, len(f.token_ids) + 1) if stop in vlm.tokenizer.decode(f.token_ids[:k]))
        assert g.token_ids == f.token_ids[:n] and n < len(f.token_ids)  # stopped there, early
        assert g.text == f.text[: f.text.index(stop)] and g.finish_reason == "stop"
    assert got[0].finish_reason == "stop"


def _save_parts(root: Path, full_clip: bool = False, siglip: bool = False) -> tuple[Path, Path, Path]:
    """Small pretrained-looking parts saved the way hub checkpoints are."""
    torch.manual_seed(0)
    vis_dir, llm_dir = root / "vision", root / "llm"
    vcfg = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    if siglip:
        SiglipVisionModel(SiglipVisionConfig(**vcfg)).save_pretrained(vis_dir)
    elif full_clip:
        CLIPModel(
            CLIPConfig(
                vision_config=vcfg,
                text_config=dict(
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    vocab_size=99,
                ),
                projection_dim=16,
            )
        ).save_pretrained(vis_dir)
    else:
        CLIPVisionModel(CLIPVisionConfig(**vcfg)).save_pretrained(vis_dir)
    # A plain LLM tokenizer without medvl's tokens: the build must add them.
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        ["hello world, a pretrained model"] * 10,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    base_tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>")
    assert IMAGE_TOKEN not in base_tok.get_vocab()
    base_tok.save_pretrained(llm_dir)
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(base_tok),
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    llm.save_pretrained(llm_dir)
    return vis_dir, llm_dir, root


@pytest.mark.parametrize("kind", ["clip-vision", "clip-full", "siglip"])
def test_build_from_pretrained_parts(tmp_path, kind):
    vis_dir, llm_dir, _ = _save_parts(tmp_path, full_clip=kind == "clip-full", siglip=kind == "siglip")
    strategy = "full" if kind == "siglip" else "default"
    vlm = build_from_parts(str(vis_dir), str(llm_dir), vision_feature_select_strategy=strategy)
    m = vlm.model
    # Vision weights arrive unchanged.
    ref_vision = (SiglipVisionModel if kind == "siglip" else CLIPVisionModel).from_pretrained(vis_dir)
    for (k, a), (_, b) in zip(ref_vision.state_dict().items(), m.model.vision_tower.state_dict().items()):
        assert torch.equal(a, b), k
    # LLM weights arrive unchanged; the embeddings grew by the added tokens only.
    ref_llm = LlamaForCausalLM.from_pretrained(llm_dir)
    old_vocab = ref_llm.config.vocab_size
    emb = m.get_input_embeddings().weight
    assert emb.shape[0] == len(vlm.tokenizer) > old_vocab
    assert torch.equal(emb[:old_vocab], ref_llm.get_input_embeddings().weight)
    assert torch.equal(
        m.model.language_model.layers[1].mlp.up_proj.weight, ref_llm.model.layers[1].mlp.up_proj.weight
    )
    assert m.config.image_token_id == vlm.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) >= old_vocab
    assert not any(p.is_meta for p in m.parameters())
    # It runs, and the image token count matches the tower: 16 patches (+ CLS dropped by "default").
    out = generate(vlm, [user_turn("hello", _image())], max_new_tokens=3)[0]
    assert out.prompt_tokens > 16 and m.config.image_seq_length == 16
    vlm.save(tmp_path / "built")
    again = load(tmp_path / "built")
    assert AutoTokenizer.from_pretrained(tmp_path / "built").chat_template == again.tokenizer.chat_template


def test_load_refuses_pickle_weights(tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="safetensors only"):
        load(folder)


def test_cli_lists_the_pipeline_and_commands_name_a_missing_argument():
    res = subprocess.run([sys.executable, "-m", "medvl.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    for cmd in (
        "curate",
        "generate",
        "quality",
        "mix",
        "build",
        "train",
        "pipeline",
        "eval",
        "serve",
        "ui",
        "chat",
        "quickstart",
        "synth",
    ):
        assert cmd in res.stdout
    res = subprocess.run([sys.executable, "-m", "medvl.cli", "quality"], capture_output=True, text=True)
    assert res.returncode != 0 and "Missing argument" in res.stderr


def test_build_trains_its_tokenizer_on_the_turns_of_llava_samples(tmp_path: Path):
    """`medvl build --corpus` reads `medvl quality`'s kept.jsonl (or a mix's JSON) as well as a text file:
    every turn is a line of the corpus and the image token is not part of the text."""
    from medvl.model.cli import corpus_texts

    rows = [
        {
            "id": "a",
            "image": "x.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhich organ is shown?"},
                {"from": "gpt", "value": "The liver."},
            ],
        },
        {
            "id": "b",
            "conversations": [
                {"from": "human", "value": "What is a CT?"},
                {"from": "gpt", "value": "A scan."},
            ],
        },
    ]
    jsonl = tmp_path / "kept.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    as_json = tmp_path / "mix.json"
    as_json.write_text(json.dumps(rows), encoding="utf-8")
    want = ["Which organ is shown?", "The liver.", "What is a CT?", "A scan."]
    assert corpus_texts(jsonl) == want
    assert corpus_texts(as_json) == want
    text = tmp_path / "corpus.txt"
    text.write_text("one line\n<image> kept as written\n", encoding="utf-8")
    assert corpus_texts(text) == ["one line", "<image> kept as written"]
