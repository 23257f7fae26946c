"""The `native` 3D route: stock `LlavaForConditionalGeneration` with transformers' ViViT as its tower (a
Conv3d tubelet embedding), one input of T slabs per volume, 2D images as still volumes, mixed in packed
batches; saved checkpoints of both routes load in stock transformers and generate medvl's tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SPEC, TOKENIZER_TEXT, stage_config
from PIL import Image

from medvl.data.conversations import ConversationDataset
from medvl.data.packing import PackedCollator
from medvl.imaging import volume_slabs
from medvl.model.build import build_from_parts, build_preset, load, load_preset, native_frames
from medvl.model.decode import Conversation, generate
from medvl.model.tokenizer import train_tokenizer
from medvl.train.config import load_config
from medvl.train.loop import StageRecipe, loss_sum

QUESTION = "Which organs does this CT show?"


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny3d") / "model"
    build_preset("tiny-3d", tokenizer=train_tokenizer(TOKENIZER_TEXT, vocab_size=400), seed=0).save(folder)
    return folder


def test_the_tower_makes_the_tokens_the_config_counts(native_dir):
    """8 slabs of 64 px in 2 x 16 x 16 tubelets: 4 x 16 = 64 tokens per volume (CLS dropped), what the
    config's image_seq_length and the processor's count say."""
    vlm = load(native_dir)
    cfg = vlm.model.config
    assert type(vlm.model.model.vision_tower).__name__ == "VivitModel"
    assert native_frames(cfg) == 8 and cfg.image_seq_length == 64
    slabs = [Image.fromarray(np.full((40, 30, 3), 10 * i, np.uint8)) for i in range(8)]
    pixels = vlm.processor.image_processor([slabs], return_tensors="pt")["pixel_values"]
    assert list(pixels.shape) == [1, 8, 3, 64, 64]
    with torch.no_grad():
        feats = vlm.model.model.get_image_features(pixel_values=pixels).pooler_output
    assert sum(f.shape[0] for f in feats) == cfg.image_seq_length
    # The processor's own count per input agrees (a stock user expanding `<image>` with it gets 64).
    p = vlm.processor
    assert (64 // p.patch_size) ** 2 + p.num_additional_image_tokens - 1 == cfg.image_seq_length
    # A slab is normalised as the 2D route's processor normalises that image.
    from medvl.model.build import square_image_processor

    flat = square_image_processor(64)(slabs[3], return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(pixels[0, 3], flat, atol=1e-5)


def test_mixed_2d_and_3d_batch_on_the_native_route(native_dir, mixed_data):
    """A volume is one input of 8 slabs behind its one `<image>` (64 tokens, whatever the budget); a 2D
    image is a still volume of 8 copies; text-only samples need none. One packed batch trains the tower."""
    vlm = load(native_dir)
    cfg = vlm.model.config
    data = ConversationDataset(vlm, [(mixed_data / "data.json", None)], max_length=1024, volume_tokens=16)
    by_id = {s.id: s for s in data.samples}
    for sid, inputs in (("vol0", 1), ("vol1", 1), ("img0", 1), ("img1", 1), ("text", 0)):
        assert by_id[sid].input_ids.count(cfg.image_token_id) == inputs * 64
        assert by_id[sid].n_images == inputs
    batch = [data[i] for i in range(len(data))]
    vol, img = batch[0][1], batch[2][1]
    assert len(vol) == 1 and len(vol[0]) == 8 and len(img) == 1 and len(img[0]) == 8
    array = np.load(by_id["vol0"].volume)
    assert [np.asarray(a).tolist() for a in vol[0]] == [
        np.asarray(a).tolist() for a in volume_slabs(array, 8)
    ]
    assert all(im is img[0][0] for im in img[0])  # the same image in every slab
    packed = PackedCollator(vlm, 512)(batch)
    assert list(packed["pixel_values"].shape) == [4, 8, 3, 64, 64]
    assert int((packed["input_ids"] == cfg.image_token_id).sum()) == 4 * 64
    model = vlm.model.train()
    loss = loss_sum(model, packed) / packed["loss_units"]
    loss.backward()
    conv3d = model.model.vision_tower.embeddings.patch_embeddings.projection
    assert isinstance(conv3d, torch.nn.Conv3d) and conv3d.weight.grad.abs().sum() > 0
    # Only text in a micro-batch: the vision filler is a black still volume, so a sharded tower runs.
    text_only = PackedCollator(vlm, 512, vision_filler=True)([batch[4]])
    assert list(text_only["pixel_values"].shape) == [1, 8, 3, 64, 64]


STOCK_SCRIPT = r"""
import json, sys
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration
folder, route, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
slabs = [Image.open(f"slab{i}.png") for i in range(n)]
model = LlavaForConditionalGeneration.from_pretrained(folder)
content = [{"type": "image"}] * (n if route == "slices" else 1) + [{"type": "text", "text": sys.argv[4]}]
messages = [{"role": "user", "content": content}]
if route == "slices":  # K images through the stock processor
    processor = AutoProcessor.from_pretrained(folder)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=slabs, return_tensors="pt")
else:  # one volume: `<image>` stands for config.image_seq_length tokens; slabs by the image processor
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = prompt.replace("<image>", "<image>" * model.config.image_seq_length)
    inputs = dict(tokenizer([prompt], return_tensors="pt"))
    inputs |= AutoImageProcessor.from_pretrained(folder)([slabs], return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
assert "medvl" not in sys.modules, "the stock path must not import medvl"
print(json.dumps(out[0, inputs["input_ids"].shape[1]:].tolist()))
"""


@pytest.mark.parametrize("route", ["slices", "native"])
def test_trained_checkpoints_of_both_routes_generate_identically_in_stock_transformers(
    route, tiny_model_dir, native_dir, mixed_data, tmp_path
):
    """A stage on mixed 2D + 3D data (packed), saved; stock transformers (no medvl imported) loads it and
    generates, from the same slabs, the tokens medvl's `generate` gives: K images on the slices route,
    one [8, 3, 64, 64] volume on the native one."""
    start = tiny_model_dir if route == "slices" else native_dir
    spec = [SPEC.model_dump(mode="json")]
    budget = 4 * load(start).model.config.image_seq_length if route == "slices" else 4096
    cfg = load_config(
        stage_config(tmp_path, start, mixed_data, route, volume_tokens=budget, volume_specs=spec, lr=5e-3)
    )
    recipe = StageRecipe(cfg)
    recipe.setup()
    final = recipe.save(recipe.train())
    vlm = load(final)
    with torch.no_grad():  # a strong, non-degenerate output, so that equal tokens mean something
        vlm.model.lm_head.weight.normal_(0, 0.5)
    vlm.save(final)
    frames = native_frames(vlm.model.config)
    k = frames or 4
    slabs = volume_slabs(np.load(mixed_data / "volumes" / "v0.npy"), k)
    for i, im in enumerate(slabs):
        im.save(tmp_path / f"slab{i}.png")  # lossless: the stock side reads the very same pixels
    parts = [{"type": "image"}] * (1 if frames else k) + [{"type": "text", "text": QUESTION}]
    conv = Conversation([{"role": "user", "content": parts}], [slabs] if frames else slabs)
    ours = generate(vlm, [conv], max_new_tokens=12)[0]
    res = subprocess.run(
        [sys.executable, "-c", STOCK_SCRIPT, str(final), route, str(k), QUESTION],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    stock = json.loads(res.stdout.strip().splitlines()[-1])
    eos = vlm.tokenizer.eos_token_id
    stock = stock[: stock.index(eos)] if eos in stock else stock
    assert len(ours.token_ids) > 0 and stock == ours.token_ids
    # A 2D image on the native route is a still volume: the same answer as its 8 copies given as slabs.
    if frames:
        img = Image.open(mixed_data / "img" / "1.png")
        one = Conversation([{"role": "user", "content": parts}], [img])
        copies = Conversation([{"role": "user", "content": parts}], [[img] * frames])
        assert (
            generate(vlm, [one], max_new_tokens=8)[0].token_ids
            == generate(vlm, [copies], max_new_tokens=8)[0].token_ids
        )


def test_native_route_refuses_what_it_cannot_read(native_dir, mixed_data, tmp_path):
    vlm = load(native_dir)
    parts = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    slabs = volume_slabs(np.load(mixed_data / "volumes" / "v0.npy"), 4)
    with pytest.raises(ValueError, match="a volume of 4 slabs; this model's 3D tower reads 8"):
        generate(vlm, [Conversation([{"role": "user", "content": parts}], [slabs])])
    schedule = stage_config(tmp_path, native_dir, mixed_data, "res", resolution_schedule=[{"size": 64}])
    with pytest.raises(ValueError, match="native"):
        StageRecipe(load_config(schedule)).setup()


def test_pretrain_3d_on_curated_phantoms_then_build(tmp_path, monkeypatch):
    """`medvl pretrain-3d <curated folder>`: the volume records captioned from their labels (modality,
    region, each structure's slice span), CLIP-style contrastive steps that lower the loss from its
    chance value, a stock ViViT folder that `build_from_parts` turns into a native-route model."""
    import math

    from test_model import _save_parts

    from medvl.curate.card import load_card
    from medvl.curate.pipeline import curate
    from medvl.synth.volumes import write_phantoms
    from medvl.train.pretrain import pretrain_volume_text, volume_text, volume_text_pairs

    write_phantoms(tmp_path / "ph", 9, shape=(16, 48, 48), seed=0)
    monkeypatch.setenv("MEDVL_SYNTH_3D", str(tmp_path / "ph"))
    curate([load_card(REPO / "configs" / "cards" / "synthetic-3d.yaml")], tmp_path / "cur", workers=1)
    pairs = volume_text_pairs(tmp_path / "cur")
    assert len(pairs) == 9 and all((tmp_path / "cur" / p["volume"]).is_file() for p in pairs)
    # 100 lesion voxels of 5 x 6.25 x 6.25 mm: a 33.4 mm sphere (medium); centroid column 45 of 64 (the
    # patient's left of the middle 31.5); slice 12.5 of 32: 3 x 13 / 32 = 1.22 (the middle third).
    measures = {
        "lesion": {"voxels": 100, "centroid": [12.5, 30.0, 45.0]},
        "liver": {"voxels": 5000, "centroid": [16.0, 30.0, 20.0]},
    }
    record = {
        "id": "hand",
        "modality": "CT",
        "body_region": "Abdomen",
        "labels": ["liver", "lesion"],
        "annotation": json.dumps(
            {
                "exhaustive": True,
                "label_space": ["lesion", "liver", "spleen"],
                "groups": {"lesion": "Disease Diagnosis"},
            }
        ),
        "volume": json.dumps(
            {"file": "v.npy", "shape": [3, 32, 64, 64], "spacing_mm": [5.0, 6.25, 6.25], "measures": measures}
        ),
    }
    assert volume_text(record) == (
        "CT of the abdomen. lesion: the patient's left, the middle third of the slices, medium (22-36 mm). "
        "Also liver."
    )
    healthy = json.loads(record["volume"])
    del healthy["measures"]["lesion"]
    assert (
        volume_text({**record, "volume": json.dumps(healthy)}) == "CT of the abdomen. no lesion. Also liver."
    )
    assert any("lesion: " in p["text"] for p in pairs) and any("no lesion." in p["text"] for p in pairs)

    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "medvl.cli",
            "pretrain-3d",
            str(tmp_path / "cur"),
            "--out",
            str(tmp_path / "t"),
        ]
        + ["--steps", "2", "--batch-size", "4"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "9 volume-text pairs" in res.stdout and (tmp_path / "t" / "model.safetensors").is_file()

    losses = pretrain_volume_text(
        load_preset("tiny-3d"), pairs, tmp_path / "cur", tmp_path / "tower", steps=40, batch_size=9, lr=1e-3
    )
    assert abs(sum(losses[:3]) / 3 - math.log(9)) < 0.3  # starts near chance: -log(1/9)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    _, llm_dir, _ = _save_parts(tmp_path)
    vlm = build_from_parts(str(tmp_path / "tower"), str(llm_dir))
    from transformers import VivitModel

    tower = VivitModel.from_pretrained(tmp_path / "tower")
    for (k, a), (_, b) in zip(tower.state_dict().items(), vlm.model.model.vision_tower.state_dict().items()):
        assert torch.equal(a, b), k
    assert native_frames(vlm.model.config) == 8 and vlm.model.config.image_seq_length == 64


@pytest.fixture(scope="module")
def wide_native(tmp_path_factory) -> Path:
    """tiny-3d with weights drawn wider (std 0.1) than the stock initialisation, whose greedy answer is
    the same repeated token whatever the input: here answers depend on the volume."""
    folder = tmp_path_factory.mktemp("wide3d") / "model"
    vlm = build_preset("tiny-3d", tokenizer=train_tokenizer(TOKENIZER_TEXT, vocab_size=400), seed=0)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in vlm.model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
    vlm.save(folder)
    return folder


def test_native_model_reads_a_scan_in_chat_the_server_and_eval(wide_native, tmp_path):
    """A NIfTI phantom through `medvl chat`, `medvl serve` (the official openai client, loopback) and
    `medvl eval`'s 3D benchmark harness: each gives the model the scan as one input of 8 slabs (the default
    CT spec's), and the chat and server answers equal the in-process answer to those slabs."""
    from test_serve import SETTINGS, client, data_url, running
    from typer.testing import CliRunner

    from medvl.cli import app
    from medvl.eval.harness import LocalModel, _images
    from medvl.model.build import load_volumes
    from medvl.synth.volumes import write_phantoms

    scan = write_phantoms(tmp_path / "ph", 2, shape=(16, 48, 48), seed=4)[1]
    vlm = load(wide_native)
    slabs = load_volumes(wide_native).slabs(scan, vlm.model.config.image_seq_length, frames=8)
    assert len(slabs) == 8
    parts = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    want = generate(vlm, [Conversation([{"role": "user", "content": parts}], [slabs])], max_new_tokens=6)[0]
    assert want.token_ids
    args = [
        "chat",
        "--model",
        str(wide_native),
        "--image",
        str(scan),
        "-q",
        QUESTION,
        "--max-new-tokens",
        "6",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"medvl> {want.text}".strip() in result.output
    with running(vlm, SETTINGS) as url:
        content = [
            {"type": "image_url", "image_url": {"url": data_url(scan.read_bytes(), "application/gzip")}},
            {"type": "text", "text": QUESTION},
        ]
        r = client(url).chat.completions.create(
            model=SETTINGS.model_name, messages=[{"role": "user", "content": content}], max_tokens=6
        )
    assert r.choices[0].message.content == want.text
    # One image part stands for the volume: 64 image tokens in the prompt, as in-process.
    assert r.usage.prompt_tokens == want.prompt_tokens
    # The eval harness asks a volume question with the same single input of 8 slabs.
    from medvl.eval.benchmarks import Item

    answerer = LocalModel(vlm, "tiny-3d")
    item = Item(id="q", question=QUESTION, kind="open", answer="liver", volume=scan)
    inputs = _images(item, "image", answerer.image_size, frames=answerer.frames, volumes=answerer.volumes)
    assert len(inputs) == 1 and [np.asarray(a).tolist() for a in inputs[0]] == [
        np.asarray(a).tolist() for a in slabs
    ]
