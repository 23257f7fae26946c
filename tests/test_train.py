"""The three-stage trainer: configs, loss masking, freezing, logging, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from medvl.data.conversations import IGNORE, Collator, ConversationDataset, tokenize
from medvl.model.build import load
from medvl.train.config import load_config
from medvl.train.loop import train_stage

REPO = Path(__file__).resolve().parent.parent


def stage_yaml(tmp_path: Path, model: Path, data: Path, name: str, **kw) -> Path:
    cfg = {
        "stage": name,
        "model": str(model),
        "output_dir": str(tmp_path / name),
        "data": [{"path": str(data)}],
        "freeze": {"llm": True, "projector": False, "vision": True},
        "lr": 1e-3,
        "global_batch_size": 8,
        "micro_batch_size": 4,
        "max_length": 256,
        "log_every": 1,
        "warmup_ratio": 0.0,
    }
    cfg.update(kw)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_reference_stage_configs_follow_table_8():
    rows = {}
    for i in (1, 2, 3):
        cfg = load_config(REPO / "configs" / "gmai-vl" / f"stage{i}.yaml")
        rows[i] = (cfg.freeze.llm, cfg.freeze.projector, cfg.freeze.vision, cfg.lr)
        assert cfg.betas == (0.9, 0.999) and cfg.lr_schedule == "cosine" and cfg.image_size == 336
        assert cfg.global_batch_size == 512
    assert rows == {
        1: (True, False, True, 1e-3),
        2: (True, False, False, 1e-4),
        3: (False, False, False, 1e-5),
    }


def test_config_errors_name_the_key_and_the_file(tmp_path, tiny_model_dir, train_data):
    path = stage_yaml(tmp_path, tiny_model_dir, train_data, "bad", learning_rate=1e-3)
    with pytest.raises(ValueError, match=r"bad\.yaml.*unknown key 'learning_rate'"):
        load_config(path)
    path = stage_yaml(tmp_path, tiny_model_dir, train_data, "bad2", micro_batch_size="four")
    with pytest.raises(ValueError, match=r"bad2\.yaml.*key 'micro_batch_size'"):
        load_config(path)
    path = stage_yaml(tmp_path, tiny_model_dir, train_data, "bad3", freeze={"llm": True, "projector": True})
    with pytest.raises(ValueError, match=r"bad3\.yaml.*freeze\.vision"):
        load_config(path)


def test_loss_only_on_assistant_tokens_multi_turn(tiny_model_dir, train_data):
    vlm = load(tiny_model_dir)
    rec = json.loads(train_data.read_text())[0]
    s = tokenize(vlm, rec, train_data.parent, 512, "train.json[0]")
    learned = [t for t, lab in zip(s.input_ids, s.labels) if lab != IGNORE]
    assert vlm.tokenizer.decode(learned) == "Yes.<|im_end|>An X-ray.<|im_end|>"
    n_img = sum(t == vlm.model.config.image_token_id for t in s.input_ids)
    assert n_img == vlm.model.config.image_seq_length
    # Every prompt token (system, user turns, image tokens, role headers) is masked.
    for t, lab in zip(s.input_ids, s.labels):
        assert lab in (IGNORE, t)
    prompt_text = vlm.tokenizer.decode([t for t, lab in zip(s.input_ids, s.labels) if lab == IGNORE])
    assert "Is the image bright?" in prompt_text and "What modality is it?" in prompt_text


def test_text_only_and_image_samples_share_a_batch(tiny_model_dir, train_data):
    vlm = load(tiny_model_dir)
    ds = ConversationDataset(vlm, [(train_data, None)], 256)
    batch = Collator(vlm)([ds[i] for i in (0, 1, 2, 3)])  # sample 3 is text-only
    n_image_tokens = int((batch["input_ids"] == vlm.model.config.image_token_id).sum())
    assert batch["pixel_values"].shape[0] == 3 == n_image_tokens // vlm.model.config.image_seq_length
    out = vlm.model(**{k: v for k, v in batch.items() if k != "labels"})
    assert torch.isfinite(out.logits).all()


def _snapshot(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def _changed(before: dict, after: dict, prefix: str) -> tuple[int, int]:
    keys = [k for k in before if k.startswith(prefix)]
    return sum(not torch.equal(before[k], after[k]) for k in keys), len(keys)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_trains_exactly_its_components(tmp_path, tiny_model_dir, train_data, stage):
    freeze = {1: (True, False, True), 2: (True, False, False), 3: (False, False, False)}[stage]
    path = stage_yaml(
        tmp_path,
        tiny_model_dir,
        train_data,
        f"s{stage}",
        max_steps=2,
        freeze=dict(zip(("llm", "projector", "vision"), freeze)),
    )
    final = train_stage(load_config(path))
    before, after = _snapshot(tiny_model_dir), _snapshot(final)
    # Saved checkpoints use the original LLaVA key layout (what vLLM and older transformers read).
    for prefix, frozen in (
        ("language_model.model.", freeze[0]),
        ("language_model.lm_head.", freeze[0]),
        ("multi_modal_projector.", freeze[1]),
        ("vision_tower.", freeze[2]),
    ):
        n_changed, n = _changed(before, after, prefix)
        assert n > 0
        if frozen:
            assert n_changed == 0, f"{prefix} is frozen in stage {stage} but changed"
        else:
            # Every weight matrix that sees data moves (the CLIP pre-norm of an unused CLS path may not).
            assert n_changed >= n - 2, f"{prefix}: only {n_changed}/{n} tensors changed in stage {stage}"


def test_logs_loss_lr_tokens_and_mfu_to_tensorboard(tmp_path, tiny_model_dir, train_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = stage_yaml(tmp_path, tiny_model_dir, train_data, "tb", max_steps=3)
    cfg = load_config(path)
    train_stage(cfg)
    events = list(cfg.output_dir.rglob("events.out.tfevents*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "tokens_per_s", "mfu"} <= tags
    losses = [e.value for e in acc.Scalars("loss")]
    history = json.loads((cfg.output_dir / "history.json").read_text())
    assert len(losses) == 3 and losses == pytest.approx([h["loss"] for h in history], rel=1e-5)
    assert all(e.value > 0 for e in acc.Scalars("tokens_per_s"))


def test_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, train_data):
    kw = dict(
        max_steps=6,
        save_every=3,
        freeze={"llm": False, "projector": False, "vision": False},
        lr=5e-4,
        warmup_ratio=0.2,
    )
    full = load_config(stage_yaml(tmp_path, tiny_model_dir, train_data, "full", **kw))
    train_stage(full)
    ref = json.loads((full.output_dir / "history.json").read_text())

    cut = load_config(stage_yaml(tmp_path, tiny_model_dir, train_data, "cut", **kw))
    train_stage(cut, stop_after=3)
    assert not (cut.output_dir / "final").exists()
    ckpts = sorted((cut.output_dir / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step-00000003"]
    # A half-written checkpoint (as a kill during saving leaves) is never picked up.
    (cut.output_dir / "checkpoints" / ".tmp-step-00000005").mkdir()
    train_stage(cut, resume=True)
    resumed = json.loads((cut.output_dir / "history.json").read_text())
    assert [h["step"] for h in resumed] == [1, 2, 3, 4, 5, 6]
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in ref], rel=1e-6, abs=1e-7)
    assert [h["lr"] for h in resumed] == pytest.approx([h["lr"] for h in ref])
    a, b = _snapshot(full.output_dir / "final"), _snapshot(cut.output_dir / "final")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_missing_or_unreadable_image_names_file_and_sample(tmp_path, tiny_model_dir, train_data):
    vlm = load(tiny_model_dir)
    records = json.loads(train_data.read_text())
    records[1]["image"] = "img/does-not-exist.png"
    bad = train_data.parent / "bad.json"
    bad.write_text(json.dumps(records))
    with pytest.raises(FileNotFoundError, match=r"bad\.json\[1\] \(sample id s1\).*does-not-exist\.png"):
        ConversationDataset(vlm, [(bad, None)], 256)
    (train_data.parent / "img" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ds = ConversationDataset(vlm, [(train_data, None)], 256)
    with pytest.raises(ValueError, match=r"sample id s0.*0\.png.*unreadable"):
        ds[0]


def test_pipeline_cli_chains_stages_from_the_previous_final(tmp_path, tiny_model_dir, train_data):
    from typer.testing import CliRunner

    from medvl.cli import app

    s1 = stage_yaml(tmp_path, tiny_model_dir, train_data, "p1", max_steps=1)
    # Stage 2's own `model` points nowhere: the pipeline must start it from stage 1's final/.
    s2 = stage_yaml(
        tmp_path,
        tmp_path / "nowhere",
        train_data,
        "p2",
        max_steps=1,
        freeze={"llm": True, "projector": True, "vision": False},
    )
    res = CliRunner().invoke(app, ["pipeline", str(s1), str(s2)])
    assert res.exit_code == 0, res.output
    p1, p2 = _snapshot(tmp_path / "p1" / "final"), _snapshot(tmp_path / "p2" / "final")
    base = _snapshot(tiny_model_dir)
    proj = [k for k in base if k.startswith("multi_modal_projector.")]
    # Stage 2 froze the projector, so it carries stage 1's trained projector, not the base one.
    assert all(torch.equal(p1[k], p2[k]) and not torch.equal(base[k], p2[k]) for k in proj)
    # A bad config fails before the first stage trains.
    bad = stage_yaml(tmp_path, tiny_model_dir, train_data, "p3", epochs="many")
    res = CliRunner().invoke(app, ["pipeline", str(s1), str(bad)])
    assert res.exit_code != 0 and "p3.yaml" in str(res.exception)


def test_checkpoints_carry_the_preprocessing_they_were_trained_with(tmp_path, tiny_model_dir, train_data):
    from medvl.imaging import Preprocessing
    from medvl.model.build import load_preprocessing, save_preprocessing

    lung = Preprocessing(ct_window="lung", percentiles=(1.0, 99.0))
    assert lung != load_preprocessing(tiny_model_dir)
    save_preprocessing(lung, tmp_path)
    given = train_stage(
        load_config(stage_yaml(tmp_path, tiny_model_dir, train_data, "given", max_steps=1,
                               preprocessing=str(tmp_path / "preprocessing.json")))
    )
    assert load_preprocessing(given) == lung
    # Without one, the next stage keeps its starting model's, so a pipeline carries it to the end.
    kept = train_stage(load_config(stage_yaml(tmp_path, given, train_data, "kept", max_steps=1)))
    assert load_preprocessing(kept) == lung and (kept / "preprocessing.json").is_file()
    with pytest.raises(ValueError, match="absent.json: preprocessing: file not found"):
        train_stage(load_config(stage_yaml(tmp_path, given, train_data, "bad", max_steps=1,
                                           preprocessing=str(tmp_path / "absent.json"))))
