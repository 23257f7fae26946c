"""Shared fixtures and helpers: a tiny random-weights model saved as a plain Hugging Face folder, small
LLaVA-format training data with real PNG files, and the kill -9 of a job mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("MEDVL_SHARED_DATA", REPO.parent / "shared" / "data"))

TOKENIZER_TEXT = [
    "What imaging modality is this? It is a CT image of the chest.",
    "Describe the image. An MR image of the brain with a bright tumour in the upper left.",
    "A chest X-ray with a nodule in the right lung, grade 2. No finding. Yes. No.",
    "Answer with the option's letter from the given choices directly. A. CT B. MR C. X-ray D. Ultrasound",
] * 20


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from medvl.model.tokenizer import train_tokenizer

    return train_tokenizer(TOKENIZER_TEXT, vocab_size=400)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    from medvl.model.build import build_preset

    folder = tmp_path_factory.mktemp("tiny") / "model"
    build_preset("tiny", tokenizer=tiny_tokenizer, seed=0).save(folder)
    return folder


def write_training_data(root: Path, n: int = 32, seed: int = 0) -> Path:
    """n samples: images that are bright or dark, multi-turn conversations, and every 4th sample
    text-only, so image and text-only samples share batches."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        bright = i % 2 == 0
        if i % 4 == 3:
            records.append(
                {
                    "id": f"t{i}",
                    "conversations": [
                        {"from": "human", "value": "What is CT?"},
                        {"from": "gpt", "value": "Computed tomography."},
                    ],
                }
            )
            continue
        arr = rng.integers(0, 40, (48, 40, 3)) + (180 if bright else 0)
        Image.fromarray(arr.astype(np.uint8)).save(root / "img" / f"{i}.png")
        records.append(
            {
                "id": f"s{i}",
                "image": f"img/{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nIs the image bright?"},
                    {"from": "gpt", "value": "Yes." if bright else "No."},
                    {"from": "human", "value": "What modality is it?"},
                    {"from": "gpt", "value": "An X-ray."},
                ],
            }
        )
    path = root / "train.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture
def train_data(tmp_path) -> Path:
    return write_training_data(tmp_path / "data")


def kill_9_after_commits(
    cmd: list[str], job: Path, commits: int = 1, timeout: float = 300, **popen
) -> list[str]:
    """Start `cmd` (a command running a medvl.jobs job into folder `job`) in a process group of its own,
    SIGKILL the group (pool workers included) once `commits` parts are committed, and return the ids of
    the committed items in commit order. Fails unless the command died of that kill (it did not finish
    first): the test is then of a job stopped mid-run, possibly with a part half written."""
    parts = job / "parts"
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a chatty job never blocks on it
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=err, **popen)
        try:
            deadline = time.monotonic() + timeout
            while (
                len(list(parts.glob("part-*.json"))) < commits
                and proc.poll() is None
                and time.monotonic() < deadline
            ):
                time.sleep(0.01)
            if proc.poll() is None:  # one that ended by itself is reported below
                os.killpg(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
        err.seek(0)
        assert proc.returncode == -signal.SIGKILL, err.read().decode(errors="replace")[-2000:]
    return committed_items(job)


def committed_items(job: Path) -> list[str]:
    """The ids of the items a medvl.jobs job folder has committed, in commit order."""
    parts = sorted((job / "parts").glob("part-*.json"))
    return [k for p in parts for k in json.loads(p.read_text())["items"]]
