"""Two CPU processes (gloo) under `torchrun` (DDP through accelerate) reach the losses of one process
with the same global batch (packed, length-grouped batches).

The test checks that the two processes really formed one group (accelerate's MULTI_CPU): without
`cpu=True` accelerate runs torchrun's processes as unrelated single processes, whose losses would
match trivially. FSDP is not tested here: accelerate applies FSDP only to GPU-class process groups,
not to MULTI_CPU, so it cannot run on the CPU-only CI machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_packing import make_scale_root

from medvl.train.config import load_config
from medvl.train.loop import train_stage

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = make_scale_root(tmp_path_factory)
    cfg = {
        "stage": "dist",
        "model": str(root / "model"),
        "data": [{"path": str(root / "data.json")}],
        "freeze": {"llm": False, "projector": False, "vision": False},
        "lr": 1e-3,
        "warmup_ratio": 0.0,
        "global_batch_size": 4,
        "micro_batch_size": 2,
        "max_length": 512,
        "max_steps": 2,
        "packing": "soft",
        "log_every": 1,
    }
    return root, cfg


def write(root: Path, cfg: dict, name: str) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg | {"output_dir": str(root / name)}))
    return path


def losses(root: Path, name: str) -> list[float]:
    return [h["loss"] for h in json.loads((root / name / "history.json").read_text())]


def launch(root: Path, cfg: Path, *launcher) -> str:
    cmd = [*launcher, "-m", "medvl.cli", "train", "-c", str(cfg)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "MASTER_PORT": "29533"}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_ddp_matches_one_process(setup):
    root, cfg = setup
    train_stage(load_config(write(root, cfg, "single")))
    reference = losses(root, "single")
    # DDP through torchrun (accelerate picks up its environment; gloo on CPU)
    log = launch(
        root,
        write(root, cfg, "ddp"),
        str(BIN / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
    )
    assert "x 2 processes" in log  # one process group of two, each with half of every global batch
    assert losses(root, "ddp") == pytest.approx(reference, rel=1e-4)
    assert (root / "ddp" / "final" / "model.safetensors").exists()
