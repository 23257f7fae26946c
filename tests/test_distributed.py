"""Two CPU processes (gloo) reach the losses of one process with the same global batch (packed,
length-grouped batches): DDP under `torchrun`; FSDP2 and DeepSpeed ZeRO-2/3 under `accelerate launch`
with the shipped configs/accelerate/*.yaml; and the multi-node config on two launchers that play two
machines (four processes, hybrid sharding).

The tests check that the two processes really formed one group: without `cpu=True` accelerate runs
torchrun's processes as unrelated single processes, whose losses would match trivially; and that
FSDP really sharded the model (accelerate alone would run DDP on CPU processes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_packing import make_scale_root, stage_keys

from medvl.train.config import load_config
from medvl.train.loop import train_stage

BIN = Path(sys.executable).parent
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


@pytest.fixture(scope="module")
def single(setup):
    """The reference: one process, the same global batch."""
    root, cfg = setup
    train_stage(load_config(write(root, cfg, "single")))
    return losses(root, "single")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = make_scale_root(tmp_path_factory)
    cfg = stage_keys(root, stage="dist", warmup_ratio=0.0)
    return root, cfg


def write(root: Path, cfg: dict, name: str) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg | {"output_dir": str(root / name)}))
    return path


def losses(root: Path, name: str) -> list[float]:
    return [h["loss"] for h in json.loads((root / name / "history.json").read_text())]


def launch(root: Path, cfg: Path, *launcher, extra: tuple[str, ...] = ()) -> str:
    cmd = [*launcher, "-m", "medvl.cli", "train", "-c", str(cfg), *extra]
    if Path(launcher[0]).name == "accelerate":  # accelerate launch runs a script: medvl's CLI module
        cmd = [*launcher, "--module", "medvl.cli", "train", "-c", str(cfg), *extra]
    env = os.environ | {"OMP_NUM_THREADS": "1", "MASTER_PORT": "29533"}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    # on failure: every process's error lines (the first rank to fail is rarely the last to print)
    errors = [line for line in done.stderr.splitlines() if "Error" in line or "error:" in line]
    assert done.returncode == 0, "\n".join(errors[-40:]) + "\n...\n" + done.stderr[-2000:]
    return done.stdout + done.stderr


def test_ddp_matches_one_process(setup, single):
    root, cfg = setup
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
    assert losses(root, "ddp") == pytest.approx(single, rel=1e-4)
    assert_same_weights(root / "single" / "final", root / "ddp" / "final")


@pytest.mark.parametrize(
    ("config", "wrapped"),
    [
        ("fsdp.yaml", "FSDP: FSDPLlavaForConditionalGeneration"),  # fully_shard's class: really sharded
        ("zero2.yaml", "DEEPSPEED: DeepSpeedEngine"),
        ("zero3.yaml", "DEEPSPEED: DeepSpeedEngine"),
        # parameters and optimizer state in CPU memory, updated by DeepSpeed's CPU Adam (compiled
        # with g++ on first use, ~80 s here; cached under ~/.cache/torch_extensions after that)
        ("zero3-offload.yaml", "DEEPSPEED: DeepSpeedEngine"),
    ],
)
def test_sharded_matches_one_process(setup, single, config, wrapped):
    """The shipped launch configs, as a user runs them, on 2 CPU processes: FSDP2, DeepSpeed ZeRO-2,
    ZeRO-3 and ZeRO-3 with offload (optimizer state, gradients and, for FSDP and ZeRO-3, parameters
    sharded)."""
    root, cfg = setup
    name = config.removesuffix(".yaml")
    launcher = [
        str(BIN / "accelerate"),
        "launch",
        "--config_file",
        str(CONFIGS / config),
        "--num_processes",
        "2",
        "--main_process_port",
        "29534",
        "--mixed_precision",
        "no",
    ]
    log = launch(root, write(root, cfg | {"save_every": 1}, name), *launcher)
    assert "x 2 processes" in log
    assert wrapped in log
    assert losses(root, name) == pytest.approx(single, rel=1e-4)
    # the gathered full state dict is the model one process trained, as a plain checkpoint
    assert_same_weights(root / "single" / "final", root / name / "final")

    # Killed after step 1: the sharded checkpoint of step 1 (save_every: 1) is all that is left.
    # Resuming from it reaches the same final model.
    shutil.rmtree(root / name / "final")
    (root / name / "history.json").unlink()
    log = launch(root, root / f"{name}.yaml", *launcher, extra=("--resume",))
    assert "resumed from" in log and "step-00000001" in log
    assert losses(root, name) == pytest.approx(single, rel=1e-4)
    assert_same_weights(root / "single" / "final", root / name / "final")


def test_two_machines_match_one_process(setup, single):
    """configs/accelerate/multi-node.yaml launched the way slurm.sh launches it, on two "machines"
    that are two launchers on this host (machine ranks 0 and 1, rendezvous over loopback), two
    processes each: hybrid sharding (FSDP2 within a machine, replicas across machines) reaches the
    1-process losses and weights."""
    root, cfg = setup
    path = write(root, cfg | {"micro_batch_size": 1}, "nodes")  # the same global batch of 4 over 4
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    launchers = [
        subprocess.Popen(
            [
                str(BIN / "accelerate"),
                "launch",
                "--config_file",
                str(CONFIGS / "multi-node.yaml"),
                "--num_machines",
                "2",
                "--num_processes",
                "4",
                "--machine_rank",
                str(rank),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                "29535",
                "--parallelism_config_dp_replicate_size",
                "2",
                "--parallelism_config_dp_shard_size",
                "2",
                "--mixed_precision",
                "no",
                "--module",
                "medvl.cli",
                "train",
                "-c",
                str(path),
            ],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [p.communicate(timeout=600) for p in launchers]
    finally:
        for p in launchers:
            p.kill()
    for p, (_, err) in zip(launchers, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    log = "".join(out + err for out, err in outputs)
    assert "x 4 processes" in log and "FSDP: FSDPLlavaForConditionalGeneration" in log
    assert losses(root, "nodes") == pytest.approx(single, rel=1e-4)
    assert_same_weights(root / "single" / "final", root / "nodes" / "final")


def assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=atol, msg=k)


@pytest.mark.parametrize("route", ["slices", "native"])
def test_mixed_2d_and_3d_under_fsdp_match_one_process(route, mixed_data, tmp_path):
    """Volumes, 2D images and a text-only sample in one run under FSDP2 on 2 processes, on both 3D
    routes (the tiny CLIP tower given K slabs; the tiny-3d ViViT tower given one input of 8 slabs):
    micro-batches of one sample, so some rank's micro-batch holds no volume and no image and runs the
    sharded tower on the vision filler; losses and the final weights equal one process's."""
    from conftest import SPEC, TOKENIZER_TEXT

    from medvl.model.build import build_preset
    from medvl.model.tokenizer import train_tokenizer

    preset = "tiny" if route == "slices" else "tiny-3d"
    build_preset(preset, tokenizer=train_tokenizer(TOKENIZER_TEXT, vocab_size=400)).save(tmp_path / "model")
    cfg = {
        "stage": "mixed",
        "model": str(tmp_path / "model"),
        "data": [{"path": str(mixed_data / "data.json")}],
        "freeze": {"llm": False, "projector": False, "vision": False},
        "lr": 1e-3,
        "warmup_ratio": 0.0,
        "global_batch_size": 4,
        "micro_batch_size": 1,
        "max_length": 1024,
        "max_steps": 2,
        "packing": "soft",
        "log_every": 1,
        "volume_tokens": 64,  # slices: 4 slabs of 16 tokens; native: one input of 64 whatever the budget
        "volume_specs": [SPEC.model_dump(mode="json")],
    }
    train_stage(load_config(write(tmp_path, cfg, "single")))
    launcher = [
        str(BIN / "accelerate"),
        "launch",
        "--config_file",
        str(CONFIGS / "fsdp.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        "29535",
        "--mixed_precision",
        "no",
    ]
    log = launch(tmp_path, write(tmp_path, cfg, "fsdp"), *launcher)
    assert "x 2 processes" in log and "FSDP: FSDPLlavaForConditionalGeneration" in log
    assert losses(tmp_path, "fsdp") == pytest.approx(losses(tmp_path, "single"), rel=1e-4)
    # AdamW moves every weight by about lr (1e-3) a step whatever its gradient's size, so where a
    # gradient is near zero the summation order (two ranks' reduce vs one process's accumulation)
    # can move it differently: one element of 65,536 in an LM layer was 1.6e-5 apart in one CI run.
    # 1e-4 still catches a wrongly sharded or skipped update, which is off by a step's 1e-3.
    assert_same_weights(tmp_path / "single" / "final", tmp_path / "fsdp" / "final", atol=1e-4)
