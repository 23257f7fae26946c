"""Shared fixtures and helpers: a tiny random-weights model saved as a plain Hugging Face folder, small
LLaVA-format training data with real PNG files, the kill -9 of a job mid-run, and OpenAI-style
fixture servers on loopback."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
import yaml
from PIL import Image

from medvl.imaging.volume_spec import VolumeSpec
from medvl.prompts import IMAGE_TOKEN

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


# ---------------------------------------------------------------- OpenAI-style fixture servers


def chat_completion(
    model: str,
    content: str | None,
    *,
    finish_reason: str = "stop",
    usage: dict | None = None,
    refusal: str | None = None,
    id: str = "chatcmpl-fixture",
) -> dict:
    """The body of an OpenAI `chat.completion` answer with one choice. `usage`: prompt and completion
    tokens (their total is added); None leaves the field out."""
    message = {"role": "assistant", "content": content, **({"refusal": refusal} if refusal else {})}
    answer = {
        "id": id,
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
    }
    if usage is not None:
        answer["usage"] = {**usage, "total_tokens": sum(usage.values())}
    return answer


def chat_error(message: str, kind: str = "server_error") -> dict:
    """The body of an OpenAI error answer."""
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


class ChatFixtureServer(http.server.ThreadingHTTPServer):
    """TEST FIXTURE, not an implementation of anything: a loopback HTTP server answering
    `POST /v1/chat/completions`. A subclass's `reply(body, headers)` gives the answer: (HTTP status,
    JSON body, extra response headers). Run it with `serve_in_thread`."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ChatHandler)
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def reply(self, body: dict, headers) -> tuple[int, dict, dict]:
        raise NotImplementedError


class _ChatHandler(http.server.BaseHTTPRequestHandler):
    server: ChatFixtureServer

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        status, answer, headers = self.server.reply(body, self.headers)
        payload = json.dumps(answer).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


Server = TypeVar("Server", bound=http.server.HTTPServer)


@contextmanager
def serve_in_thread(server: Server) -> Iterator[Server]:
    """`server` serving from a daemon thread until the block ends, then shut down and closed."""
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


class FixtureEndpoint(ChatFixtureServer):
    """A scripted endpoint for what a real model server does not do on demand (errors, slow answers,
    Retry-After, chosen token counts). Each request takes the next entry of `script` (keys: status,
    delay in seconds, headers, usage; absent keys: a 200 answer at once); when the script is used up,
    `default`. The answer's text is "echo: " + the last message's text, and its usage says the
    request's length in bytes as prompt tokens and the text's length as completion tokens. It records
    every request (arrival time, body, Authorization header) and the most requests it held at once."""

    def __init__(self) -> None:
        super().__init__()
        self.script: list[dict] = []
        self.default: dict = {}
        self.requests: list[dict] = []
        self.usages: list[dict | None] = []  # the usage each 200 answer carried
        self.in_flight = self.max_in_flight = 0

    def handle_error(self, request, client_address) -> None:
        pass  # a client that timed out and hung up is part of the script, not an error

    def reply(self, body: dict, headers) -> tuple[int, dict, dict]:
        with self.lock:
            step = self.script.pop(0) if self.script else self.default
            self.requests.append(
                {"time": time.monotonic(), "body": body, "auth": headers.get("Authorization")}
            )
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(step.get("delay", 0))
            status, extra = step.get("status", 200), step.get("headers", {})
            if status != 200:
                # The message quotes the key it was sent, so that the client's masking is tested.
                return status, chat_error(f"scripted failure (sent {headers.get('Authorization')})"), extra
            last = body["messages"][-1]["content"]
            text = "echo: " + (last if isinstance(last, str) else last[-1]["text"])
            usage = step.get(
                "usage", {"prompt_tokens": len(json.dumps(body)), "completion_tokens": len(text)}
            )
            with self.lock:
                self.usages.append(usage)
            answer = chat_completion(body["model"], text, usage=usage, id=f"chatcmpl-{len(self.requests)}")
            return 200, answer, extra
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.fixture
def endpoint() -> Iterator[FixtureEndpoint]:
    with serve_in_thread(FixtureEndpoint()) as srv:
        yield srv


# ---- volumes: 3D and 2D samples in one file (the slices and native routes' tests) ----

# The synthetic-3d card's spec (configs/cards/synthetic-3d.yaml): three windows, 32 slices.
SPEC = VolumeSpec(
    spacing=(5.0, 6.25, 6.25), size=(32, 64, 64), windows=("abdomen", "lung", "bone"), crop_foreground=True
)


@pytest.fixture(scope="session")
def mixed_data(tmp_path_factory) -> Path:
    """Two phantom volumes (written as NIfTI, read back and preprocessed by the card's spec, stored as
    curation stores them) and two 2D images, in one LLaVA file: two 3D samples, two 2D, one text."""
    from medvl.imaging import read_volume
    from medvl.synth.volumes import write_phantoms

    root = tmp_path_factory.mktemp("mixed")
    records = []
    for i, path in enumerate(write_phantoms(root / "nifti", 2, shape=(16, 48, 48), seed=3)):
        array = SPEC.apply(read_volume(path, path.name)).array
        (root / "volumes").mkdir(exist_ok=True)
        np.save(root / "volumes" / f"v{i}.npy", array, allow_pickle=False)
        records.append(
            {
                "id": f"vol{i}",
                "volume": f"volumes/v{i}.npy",
                "conversations": [
                    {"from": "human", "value": f"{IMAGE_TOKEN}\nWhich organs does this CT show?"},
                    {"from": "gpt", "value": "The liver and the spleen."},
                ],
            }
        )
    (root / "img").mkdir()
    for i in range(2):
        Image.fromarray(np.full((24, 24, 3), 60 + 100 * i, np.uint8)).save(root / "img" / f"{i}.png")
        records.append(
            {
                "id": f"img{i}",
                "image": f"img/{i}.png",
                "conversations": [
                    {"from": "human", "value": "Is the image bright?"},
                    {"from": "gpt", "value": "yes" if i else "no"},
                ],
            }
        )
    records.append(
        {
            "id": "text",
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}],
        }
    )
    (root / "data.json").write_text(json.dumps(records))
    return root


def stage_config(tmp_path: Path, model: Path, data: Path, name: str, **keys) -> Path:
    """A stage over the mixed data: one global batch of all five samples, packed into one row."""
    cfg = {
        "stage": name,
        "model": str(model),
        "output_dir": str(tmp_path / name),
        "data": [{"path": str(data / "data.json")}],
        "freeze": {"llm": False, "projector": False, "vision": False},
        "packing": "soft",
        "lr": 1e-3,
        "global_batch_size": 5,
        "micro_batch_size": 5,
        "max_length": 1024,
        "max_steps": 1,
        "warmup_ratio": 0.0,
        **keys,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
