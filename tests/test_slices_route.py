"""The `slices` (2.5D) route: a stored volume -> K slabs -> a multi-image sample of stock
`LlavaForConditionalGeneration`, mixed with 2D samples in packed batches; a stage's `volume_tokens` and
`volume_specs`, saved with the model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SPEC, stage_config

from medvl.data.conversations import ConversationDataset
from medvl.data.packing import PackedCollator
from medvl.imaging import slab_count, slab_mode, volume_slabs
from medvl.model.build import VOLUMES_FILE, VolumePreprocessing, load, load_volumes
from medvl.train.config import load_config
from medvl.train.loop import StageRecipe, loss_sum


def test_slab_count_from_the_token_budget():
    assert slab_count(32, 16, 64) == 4
    assert slab_count(32, 16, 70) == 4  # the budget's remainder buys no partial image
    assert slab_count(32, 576, 4096) == 7
    assert slab_count(5, 16, 4096) == 5  # never more slabs than slices
    with pytest.raises(ValueError, match="does not pay for one image"):
        slab_count(32, 576, 500)


def test_windows_as_channels_average_each_slab():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 10, 6, 5), dtype=np.uint8)
    slabs = volume_slabs(a, 3)  # slabs of slices [0, 3), [3, 6), [6, 10)
    assert slab_mode(3) == "windows" and len(slabs) == 3
    for im, (lo, hi) in zip(slabs, [(0, 3), (3, 6), (6, 10)], strict=True):
        assert im.mode == "RGB" and im.size == (5, 6)  # (L, P): columns wide, rows high
        px = np.asarray(im)
        for c in range(3):
            for y in range(6):
                for x in range(5):
                    want = sum(int(a[c, z, y, x]) for z in range(lo, hi)) / (hi - lo)
                    assert abs(int(px[y, x, c]) - want) <= 0.5


def test_adjacent_slices_as_channels_when_not_three_windows():
    """One channel (MR) or two windows: the slab's first, middle and last third of the first channel."""
    a = np.zeros((2, 9, 2, 2), np.uint8)
    a[0] = (np.arange(9) * 20)[:, None, None]  # slice z has value 20 z
    a[1] = 255  # the second window is not used on this route
    assert slab_mode(2) == slab_mode(1) == "adjacent slices"
    first, second, third = (np.asarray(im)[0, 0].tolist() for im in volume_slabs(a, 3))
    assert first == [0, 20, 40] and second == [60, 80, 100] and third == [120, 140, 160]
    # A slab of one slice shows that slice in every channel; every slice in exactly one slab.
    one = volume_slabs(a[:1], 9)
    assert [np.asarray(im)[0, 0].tolist() for im in one] == [[20 * z] * 3 for z in range(9)]
    with pytest.raises(ValueError, match="need 1 <= k <= 9"):
        volume_slabs(a, 10)


def test_mixed_2d_and_3d_batch_trains_one_step(tiny_model_dir, mixed_data):
    vlm = load(tiny_model_dir)
    cfg = vlm.model.config
    per_image = cfg.image_seq_length  # 16 for the tiny preset (64 px, 16 px patches)
    budget = 4 * per_image + 5  # four slabs; the remainder pays for no fifth
    data = ConversationDataset(vlm, [(mixed_data / "data.json", None)], max_length=1024, volume_tokens=budget)
    by_id = {s.id: s for s in data.samples}
    k = slab_count(SPEC.size[0], per_image, budget)
    assert k == 4
    for sid, images in (("vol0", k), ("vol1", k), ("img0", 1), ("img1", 1), ("text", 0)):
        s = by_id[sid]
        assert s.input_ids.count(cfg.image_token_id) == images * per_image
        assert s.n_images == images
    # The training prompt of a volume is the prompt chat and the server build for K image parts.
    s = by_id["vol0"]
    served = vlm.processor.apply_chat_template(
        [
            {
                "role": "user",
                "content": [{"type": "image"}] * k
                + [{"type": "text", "text": "Which organs does this CT show?"}],
            }
        ],
        add_generation_prompt=True,
    )
    served_ids = vlm.processor(text=served, images=volume_slabs(np.load(s.volume), k))["input_ids"][0]
    assert s.input_ids[: len(served_ids)] == list(served_ids)

    batch = [data[i] for i in range(len(data))]
    assert [len(images) for _, images in batch] == [k, k, 1, 1, 0]
    packed = PackedCollator(vlm, 256)(batch)
    assert packed["pixel_values"].shape[0] == 2 * k + 2
    assert int((packed["input_ids"] == cfg.image_token_id).sum()) == (2 * k + 2) * per_image
    model = vlm.model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.model.multi_modal_projector.linear_1.weight.detach().clone()
    loss = loss_sum(model, packed) / packed["loss_units"]
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.model.vision_tower.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    optimizer.step()
    assert not torch.equal(before, model.model.multi_modal_projector.linear_1.weight)
    assert torch.isfinite(loss_sum(model, packed))


def test_bad_volume_samples_name_the_sample(tiny_model_dir, mixed_data, tmp_path):
    vlm = load(tiny_model_dir)
    conv = [{"from": "human", "value": "What is shown?"}, {"from": "gpt", "value": "A CT."}]
    cases = [
        ({"volume": "volumes/v0.npy", "image": "img/0.png"}, "in a sample without 'image'"),
        ({"volume": "volumes/none.npy"}, "volume file not found"),
        ({"volume": "img/0.png"}, "is unreadable"),
    ]
    for extra, problem in cases:
        (tmp_path / "d.json").write_text(json.dumps([{"id": "bad", "conversations": conv, **extra}]))
        with pytest.raises((ValueError, FileNotFoundError), match=problem) as e:
            ConversationDataset(vlm, [(tmp_path / "d.json", mixed_data)], 1024)
        assert "sample id bad" in str(e.value)


def test_stage_volume_tokens_set_the_slabs_and_the_model_keeps_them(tiny_model_dir, mixed_data, tmp_path):
    """`volume_tokens` of a stage config: K = budget // image_seq_length slabs per volume in the batches
    the loader gives; the final model records the budget and the stage's volume spec (volumes.json),
    and the next stage keeps them when its config names none."""
    per_image = load(tiny_model_dir).model.config.image_seq_length
    budget = 3 * per_image + 7
    spec = [SPEC.model_dump(mode="json")]
    cfg = load_config(
        stage_config(tmp_path, tiny_model_dir, mixed_data, "s1", volume_tokens=budget, volume_specs=spec)
    )
    assert cfg.volume_tokens == budget and cfg.volume_specs == [SPEC]
    recipe = StageRecipe(cfg)
    recipe.setup()
    k = budget // per_image
    assert k == 3 and {s.id: s.n_images for s in recipe.dataset.samples} == {
        "vol0": k,
        "vol1": k,
        "img0": 1,
        "img1": 1,
        "text": 0,
    }
    batch = next(iter(recipe.loader))
    image_id = recipe.base.config.image_token_id
    assert batch["pixel_values"].shape[0] == 2 * k + 2
    assert int((batch["input_ids"] == image_id).sum()) == (2 * k + 2) * per_image
    final = recipe.save(recipe.train())
    saved = VolumePreprocessing(volume_tokens=budget, specs=(SPEC,))
    assert load_volumes(final) == saved and load(final).volumes == saved
    assert json.loads((final / VOLUMES_FILE).read_text())["volume_tokens"] == budget
    # The next stage starts from that model and keeps both.
    nxt = StageRecipe(load_config(stage_config(tmp_path, final, mixed_data, "s2")))
    nxt.load_model()
    assert nxt.vlm.volumes == saved


def test_stage_volumes_must_match_the_models_spec(tiny_model_dir, mixed_data, tmp_path):
    """Volumes stored by a spec the model does not record would be served otherwise than trained: the
    stage stops naming the sample. A budget that pays for no image stops it too."""
    recipe = StageRecipe(load_config(stage_config(tmp_path, tiny_model_dir, mixed_data, "nospec")))
    with pytest.raises(
        ValueError, match=r"sample id vol0: volume .*v0\.npy is \[3, 32, 64, 64\].*volume_specs"
    ):
        recipe.setup()
    per_image = load(tiny_model_dir).model.config.image_seq_length
    small = stage_config(tmp_path, tiny_model_dir, mixed_data, "small", volume_tokens=per_image - 1)
    with pytest.raises(ValueError, match="does not pay for one image"):
        StageRecipe(load_config(small)).load_model()
    two_ct = stage_config(
        tmp_path, tiny_model_dir, mixed_data, "two", volume_specs=[SPEC.model_dump(mode="json")] * 2
    )
    with pytest.raises(ValueError, match=r"two\.yaml.*volume_specs.*at most one CT spec"):
        load_config(two_ct)


def test_pretrain_3d_trains_a_2d_tower_over_slabs_for_the_slices_route(mixed_data, tmp_path):
    """`pretrain_volume_text` with the `tiny` preset's 2D CLIP tower: each volume as 4 slabs, each slab
    through the tower alone, their tokens pooled together (as the slices route gives them to the model).
    The loss starts at chance (ln 2 for two pairs) and falls; the saved tower is a stock CLIP vision
    model that `build_from_parts` puts in the model unchanged."""
    import math

    from transformers import CLIPVisionModel

    from medvl.model.build import build_from_parts, load_preset
    from medvl.train.pretrain import pretrain_llm, pretrain_volume_text

    pairs = [
        {"volume": "volumes/v0.npy", "text": "CT of the chest. no lesion. Also heart, lung."},
        {"volume": "volumes/v1.npy", "text": "CT of the abdomen. lesion: the patient's left. Also liver."},
    ]
    spec = load_preset("tiny")
    losses = pretrain_volume_text(
        spec, pairs, mixed_data, tmp_path / "tower", steps=30, batch_size=2, slabs=4, log=lambda *_: None
    )
    assert abs(losses[0] - math.log(2)) < 0.2 and sum(losses[-5:]) / 5 < losses[0] - 0.3
    tower = CLIPVisionModel.from_pretrained(tmp_path / "tower")
    from medvl.model.tokenizer import train_tokenizer

    tok = train_tokenizer([p["text"] for p in pairs] * 4, spec.tokenizer_vocab_size)
    pretrain_llm(spec, tok, [p["text"] for p in pairs] * 40, tmp_path / "llm", steps=1, log=lambda *_: None)
    vlm = build_from_parts(str(tmp_path / "tower"), str(tmp_path / "llm"))
    for (k, a), (_, b) in zip(tower.state_dict().items(), vlm.model.model.vision_tower.state_dict().items()):
        assert torch.equal(a, b), k
