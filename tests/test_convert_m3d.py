"""M3D's 3D ViT -> transformers' ViViT (`medvl convert-m3d`): every layer equal to MONAI's own ViT (the
class M3D's encoder is) on a randomly initialised encoder of M3D's layout, then a native-route model
assembled from the converted tower."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_model import _save_parts

from medvl.model.build import build_from_parts, load, native_frames
from medvl.model.decode import Conversation, generate

monai_nets = pytest.importorskip("monai.networks.nets")

IMAGE, PATCH, HEADS = (8, 32, 32), (2, 16, 16), 4


def m3d_encoder(qkv_bias: bool = False) -> torch.nn.Module:
    """M3D's `vision_encoder` at test size: MONAI's ViT with perceptron patches and a CLS token (its
    classification head is unused by M3D and dropped from the checkpoint below)."""
    torch.manual_seed(0)
    vit = monai_nets.ViT(
        in_channels=1,
        img_size=IMAGE,
        patch_size=PATCH,
        hidden_size=48,
        mlp_dim=96,
        num_layers=3,
        num_heads=HEADS,
        proj_type="perceptron",
        classification=True,
        spatial_dims=3,
        qkv_bias=qkv_bias,
    ).eval()
    with torch.no_grad():  # MONAI starts the CLS token at zero: give it values so that its path is tested
        vit.cls_token.normal_(0, 1)
        for block in vit.blocks:
            block.norm1.weight.normal_(1, 0.1)
            block.norm2.bias.normal_(0, 0.1)
    return vit


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_converted_encoder_equals_monai_vit_layer_by_layer(tmp_path, qkv_bias):
    vit = m3d_encoder(qkv_bias)
    # M3D-CLIP's layout: the encoder under `vision_encoder.`, beside its projections.
    state = {f"vision_encoder.{k}": v for k, v in vit.state_dict().items() if "classification_head" not in k}
    state["mm_vision_proj.weight"] = torch.zeros(48, 48)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    out = tmp_path / "vivit"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "medvl.cli",
            "convert-m3d",
            str(tmp_path / "model.safetensors"),
            "--out",
            str(out),
        ]
        + ["--image-size", *map(str, IMAGE), "--patch-size", *map(str, PATCH), "--heads", str(HEADS)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert "3 layers" in res.stdout

    from transformers import AutoImageProcessor, AutoModel

    vivit = AutoModel.from_pretrained(out).eval()  # stock transformers, no medvl code
    assert type(vivit).__name__ == "VivitModel" and vivit.config.num_frames == 8
    x = torch.randn(2, 1, *IMAGE)  # MONAI: [B, C, D, H, W]
    with torch.no_grad():
        _, monai_hidden = vit(x)
        ours = vivit(pixel_values=x.transpose(1, 2), output_hidden_states=True)  # ViViT: [B, T, C, H, W]
        final = vit.norm(monai_hidden[-1])
    assert len(ours.hidden_states) == len(monai_hidden) + 1  # the embeddings come first
    for i, ref in enumerate(monai_hidden):
        torch.testing.assert_close(ours.hidden_states[i + 1], ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ours.last_hidden_state, final, atol=2e-5, rtol=1e-4)
    # M3D's scaling: a slice's grey values to [0, 1], one channel (grey slabs as [H, W, 1] arrays).
    proc = AutoImageProcessor.from_pretrained(out)
    slabs = [np.full((40, 40, 1), min(51 * i, 255), np.uint8) for i in range(8)]
    pixels = proc([slabs], return_tensors="pt")["pixel_values"]
    assert list(pixels.shape) == [1, 8, 1, 32, 32]
    assert pixels[0, :, 0, 0, 0].tolist() == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1, 1, 1], abs=1e-6)


def test_a_native_model_from_the_converted_tower(tmp_path):
    """`build_from_parts` with the converted folder: a ViViT tower of M3D's layout, one volume = 4 x 2 x 2
    = 16 image tokens, slabs read in grey; saved and loaded, it answers a volume question."""
    vit = m3d_encoder()
    state = {k: v.contiguous() for k, v in vit.state_dict().items() if "classification_head" not in k}
    save_file(state, tmp_path / "m3d.safetensors")
    from medvl.model.convert import convert_m3d

    convert_m3d(
        tmp_path / "m3d.safetensors", tmp_path / "vivit", image_size=IMAGE, patch_size=PATCH, num_heads=HEADS
    )
    _, llm_dir, _ = _save_parts(tmp_path)
    vlm = build_from_parts(str(tmp_path / "vivit"), str(llm_dir))
    assert native_frames(vlm.model.config) == 8 and vlm.model.config.image_seq_length == 16
    vlm.save(tmp_path / "model")
    vlm = load(tmp_path / "model")
    slabs = [Image.fromarray(np.full((40, 40, 3), 20 * i, np.uint8)) for i in range(8)]
    parts = [{"type": "image"}, {"type": "text", "text": "hello"}]
    out = generate(vlm, [Conversation([{"role": "user", "content": parts}], [slabs])], max_new_tokens=3)[0]
    assert out.prompt_tokens > 16 and out.completion_tokens > 0


def test_a_checkpoint_that_is_not_m3d_names_the_problem(tmp_path):
    from medvl.errors import InputError
    from medvl.model.convert import m3d_vit_to_vivit

    state = {k: v for k, v in m3d_encoder().state_dict().items() if k != "cls_token"}
    with pytest.raises(InputError, match="cls_token.*ViViT always has a CLS token"):
        m3d_vit_to_vivit(state, image_size=IMAGE, patch_size=PATCH, num_heads=HEADS)
    with pytest.raises(InputError, match="positions; image"):
        m3d_vit_to_vivit(
            m3d_encoder().state_dict(), image_size=(16, 32, 32), patch_size=PATCH, num_heads=HEADS
        )
    (tmp_path / "model.bin").write_bytes(b"pickle")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "medvl.cli",
            "convert-m3d",
            str(tmp_path / "model.bin"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1 and "expected a .safetensors file" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
