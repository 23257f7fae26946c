"""Pretrained 3D encoders into a stock transformers class, so the `native` route (docs/3d.md) can start
from them: M3D's 3D ViT (M3D-CLIP's `vision_encoder`, M3D-LaMed's vision tower) -> `VivitModel`.

M3D's encoder is MONAI's ViT with `classification=True` and `pos_embed="perceptron"`: a volume
[B, C, D, H, W] is cut into (p1, p2, p3) patches, each flattened in (p1 p2 p3 c) order through one Linear;
learnt position embeddings are added to the patches only; a CLS token (without a position embedding) is
prepended; pre-norm blocks (LayerNorm eps 1e-5, exact GELU, qkv without bias) and a final LayerNorm.
ViViT is the same computation with other names: its Conv3d over (t, h, w) tubelets is that Linear with
its weight reshaped, its position embedding covers the CLS token too (set to zero here), and a ViViT
input is [B, T, C, H, W] with T the D axis. tests/test_native_route.py checks every layer's output
against MONAI's own ViT on a randomly initialised encoder of the same shape.

The weights are read from safetensors only (M3D-CLIP ships model.safetensors); MONAI is not needed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import VivitConfig, VivitImageProcessor, VivitModel

from medvl.errors import InputError
from medvl.model.build import volume_image_processor

# M3D's published encoder: 32 x 256 x 256 single-channel volumes in 4 x 16 x 16 patches (2,048 tokens),
# 768 wide, 12 layers, 12 heads (the head count is not in the weights).
M3D_IMAGE = (32, 256, 256)
M3D_PATCH = (4, 16, 16)
M3D_CHANNELS = 1
M3D_HEADS = 12
POSITION_KEY = "patch_embedding.position_embeddings"


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file, or a folder's *.safetensors files (sharded checkpoints) merged."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or any(f.suffix != ".safetensors" for f in files):
        raise InputError(str(path), "weights", "expected a .safetensors file or a folder of them")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return state


def m3d_vit_to_vivit(
    state: dict[str, torch.Tensor],
    *,
    image_size: tuple[int, int, int] = M3D_IMAGE,
    patch_size: tuple[int, int, int] = M3D_PATCH,
    in_channels: int = M3D_CHANNELS,
    num_heads: int = M3D_HEADS,
    where: str = "<state dict>",
) -> VivitModel:
    """The ViT whose keys end in `patch_embedding.position_embeddings` (any prefix: `vision_encoder.` in
    M3D-CLIP, `model.vision_tower.vision_tower.` in M3D-LaMed) as a `VivitModel` computing the same."""
    found = [k for k in state if k.endswith(POSITION_KEY)]
    if len(found) != 1:
        raise InputError(where, POSITION_KEY, f"expected one such key, found {len(found)}")
    prefix = found[0][: -len(POSITION_KEY)]

    def get(name: str) -> torch.Tensor:
        key = prefix + name
        if key not in state:
            raise InputError(where, key, "missing")
        return state[key]

    pos = get(POSITION_KEY)
    hidden = pos.shape[-1]
    d, h, w = image_size
    p1, p2, p3 = patch_size
    if h != w or d % p1 or h % p2 or w % p3:
        raise ValueError(f"image size {image_size} must be D x S x S and divisible by the patch {patch_size}")
    n_patches = (d // p1) * (h // p2) * (w // p3)
    if pos.shape[1] != n_patches:
        raise InputError(
            where,
            found[0],
            f"{pos.shape[1]} positions; image {image_size} in patches {patch_size} makes {n_patches}",
        )
    if prefix + "cls_token" not in state:
        raise InputError(where, prefix + "cls_token", "missing: ViViT always has a CLS token")
    n_layers = sum(1 for k in state if k.startswith(prefix + "blocks.") and k.endswith(".norm1.weight"))
    qkv_bias = prefix + "blocks.0.attn.qkv.bias" in state
    config = VivitConfig(
        image_size=h,
        num_frames=d,
        tubelet_size=[p1, p2, p3],
        num_channels=in_channels,
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=num_heads,
        intermediate_size=get("blocks.0.mlp.linear1.weight").shape[0],
        hidden_act="gelu",  # MONAI's MLP block: nn.GELU, exact
        layer_norm_eps=1e-5,  # nn.LayerNorm's default, which MONAI uses
        qkv_bias=qkv_bias,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if "patch_embedding.patch_embeddings.1.weight" in [k[len(prefix) :] for k in state]:
        # perceptron: Linear over patches flattened as (p1 p2 p3 c) -> Conv3d weight [out, c, p1, p2, p3]
        lin = get("patch_embedding.patch_embeddings.1.weight")
        if lin.shape[1] != p1 * p2 * p3 * in_channels:
            raise InputError(
                where, "patch_embeddings.1.weight", f"{lin.shape[1]} inputs, not {p1}x{p2}x{p3}x{in_channels}"
            )
        conv = lin.reshape(hidden, p1, p2, p3, in_channels).permute(0, 4, 1, 2, 3)
        conv_bias = get("patch_embedding.patch_embeddings.1.bias")
    else:  # MONAI's "conv" patch embedding is already a Conv3d
        conv, conv_bias = (
            get("patch_embedding.patch_embeddings.weight"),
            get("patch_embedding.patch_embeddings.bias"),
        )
    new = {
        "embeddings.cls_token": get("cls_token"),
        # MONAI adds positions to the patches only: the CLS token's is zero
        "embeddings.position_embeddings": torch.cat([torch.zeros(1, 1, hidden, dtype=pos.dtype), pos], 1),
        "embeddings.patch_embeddings.projection.weight": conv.contiguous(),
        "embeddings.patch_embeddings.projection.bias": conv_bias,
        "layernorm.weight": get("norm.weight"),
        "layernorm.bias": get("norm.bias"),
    }
    for i in range(n_layers):
        b, o = f"blocks.{i}.", f"layers.{i}."
        # MONAI's qkv output is laid out (qkv, heads, head_dim): q, k and v are its thirds
        for name, part in zip(("q", "k", "v"), get(b + "attn.qkv.weight").chunk(3), strict=True):
            new[o + f"attention.{name}_proj.weight"] = part
        if qkv_bias:
            for name, part in zip(("q", "k", "v"), get(b + "attn.qkv.bias").chunk(3), strict=True):
                new[o + f"attention.{name}_proj.bias"] = part
        pairs = {
            "attn.out_proj": "attention.o_proj",
            "norm1": "layernorm_before",
            "norm2": "layernorm_after",
            "mlp.linear1": "mlp.fc1",
            "mlp.linear2": "mlp.fc2",
        }
        for src, dst in pairs.items():
            new[o + dst + ".weight"] = get(b + src + ".weight")
            new[o + dst + ".bias"] = get(b + src + ".bias")
    model = VivitModel(config)
    missing, unexpected = model.load_state_dict(new, strict=False)
    # the pooler (dense + tanh on CLS) is ViViT's own, unused by LLaVA: it keeps its initialisation
    assert not unexpected and all(k.startswith("pooler.") for k in missing), (missing, unexpected)
    return model.eval()


def m3d_image_processor(model: VivitModel) -> VivitImageProcessor:
    """M3D's input scaling: each slice in [0, 1] (its volumes are min-max normalised), no mean or std."""
    channels = model.config.num_channels
    return volume_image_processor(model.config.image_size, [0.0] * channels, [1.0] * channels)


def convert_m3d(
    source: Path,
    out: Path,
    *,
    image_size: tuple[int, int, int] = M3D_IMAGE,
    patch_size: tuple[int, int, int] = M3D_PATCH,
    in_channels: int = M3D_CHANNELS,
    num_heads: int = M3D_HEADS,
) -> VivitModel:
    """An M3D checkpoint (safetensors) -> a stock ViViT folder (weights, config, image processor) that
    `medvl build --vision <folder> --llm ...` and transformers' `AutoModel` load."""
    model = m3d_vit_to_vivit(
        read_safetensors(source),
        image_size=image_size,
        patch_size=patch_size,
        in_channels=in_channels,
        num_heads=num_heads,
        where=str(source),
    )
    model.save_pretrained(out, safe_serialization=True)
    m3d_image_processor(model).save_pretrained(out)
    return model
