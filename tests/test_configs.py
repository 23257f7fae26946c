"""Every shipped YAML config loads through the reader that uses it: stage configs (the quickstart's,
shipped as package data, and GMAI-VL's), stage mixtures, quality thresholds, model presets, accelerate
launch configs. Unknown keys and wrong types fail in every reader, so a config that drifted from its
schema fails here."""

from __future__ import annotations

from pathlib import Path

import pytest

from medvl.data.mix import load_mix
from medvl.model.build import PRESET_DIR, load_preset
from medvl.quality.config import load_thresholds
from medvl.quickstart import CONFIG_DIR
from medvl.train.config import load_config

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted(CONFIG_DIR.parent.rglob("*.yaml"))
MIXES = [p for p in SHIPPED if p.name.startswith("mix_")] + sorted((REPO / "configs" / "mix").glob("*.yaml"))
THRESHOLDS = [p for p in SHIPPED if p.name == "quality.yaml"]
CARDS = [p for p in SHIPPED if p.name == "card.yaml"]
STAGES = [p for p in SHIPPED if p not in MIXES + THRESHOLDS + CARDS] + sorted(
    (REPO / "configs" / "gmai-vl").glob("*.yaml")
)
PRESETS = sorted(PRESET_DIR.glob("*.yaml"))
LAUNCH = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))


def test_the_configs_are_found():
    assert len(STAGES) >= 6 and len(PRESETS) >= 3 and len(LAUNCH) >= 7
    assert len(MIXES) >= 6 and len(THRESHOLDS) == 1 and len(CARDS) == 1


@pytest.mark.parametrize("path", CARDS, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_card_loads(path):
    from medvl.curate.card import load_card

    card = load_card(path)
    assert card.name and card.exhaustive_labels


@pytest.mark.parametrize("path", MIXES, ids=lambda p: str(p.relative_to(REPO)))
def test_mix_config_loads(path):
    mix = load_mix(path)
    assert mix.sources and all(s.path for s in mix.sources)


@pytest.mark.parametrize("path", THRESHOLDS, ids=lambda p: str(p.relative_to(REPO)))
def test_quality_overlay_loads(path):
    assert load_thresholds(path) != load_thresholds()  # it changes something of the shipped defaults


@pytest.mark.parametrize("path", STAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_stage_config_loads(path, tmp_path):
    cfg = load_config(path, base_dir=tmp_path)
    assert cfg.stage and cfg.data and cfg.global_batch_size % cfg.micro_batch_size == 0


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_preset_loads(path):
    spec = load_preset(str(path))
    assert spec.name == path.stem
    assert (spec.vision and spec.llm) or (spec.vision_config and spec.llm_config)


@pytest.mark.parametrize("path", LAUNCH, ids=lambda p: p.name)
def test_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.distributed_type.value in ("MULTI_GPU", "FSDP", "DEEPSPEED")
