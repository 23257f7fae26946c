"""The OpenAI-compatible server, end to end: a real uvicorn server on a loopback port, called with the
official `openai` client (and raw httpx for what a client library would refuse to send)."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import http.server
import io
import itertools
import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import openai
import pydicom
import pytest
import torch
import uvicorn
from PIL import Image
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from medvl import RESEARCH_ONLY
from medvl.imaging import read_image
from medvl.model.build import VLM, build_preset, load
from medvl.model.decode import Completion, generate, user_turn
from medvl.model.tokenizer import train_tokenizer
from medvl.serve.api import ServeSettings, create_app
from medvl.serve.limits import PromptCounter

KEY = "test-key"
SETTINGS = ServeSettings(
    model_name="tiny",
    api_key=KEY,
    max_request_bytes=4 * 2**20,
    max_image_bytes=2**20,
    max_image_pixels=1_000_000,
    max_images=2,
    max_tokens=64,
)
DICOMS = {"CT": "CT_small.dcm", "MR": "MR_small.dcm", "US": "US1_UNCR.dcm"}


def _corpus() -> list[str]:
    organs = ["liver", "lung", "heart", "kidney", "brain", "spleen", "bladder", "colon", "bone", "chest"]
    findings = ["a nodule", "an effusion", "a mass", "no abnormality", "a fracture", "edema", "a cyst"]
    modalities = ["CT", "MRI", "X-ray", "ultrasound"]
    lines = [f"The {m} of the {o} shows {f}." for m, o, f in itertools.product(modalities, organs, findings)]
    return lines + [
        f"Is there {f} in the {o}? Yes, the {o} has {f}." for o, f in itertools.product(organs, findings)
    ]


def build_tiny_model(folder: Path) -> Path:
    """The tiny preset with random weights, re-drawn wider (std 0.1) than the stock initialisation:
    stock random weights answer every prompt with the same repeated byte, which would make the
    batched-equals-alone and streamed-equals-whole tests pass trivially. With these, greedy answers
    depend on the question and the image, and some end early (finish_reason "stop")."""
    vlm = build_preset("tiny", tokenizer=train_tokenizer(_corpus(), vocab_size=512))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in vlm.model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
    vlm.save(folder)
    return folder


@pytest.fixture(scope="module")
def varied_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture(scope="module")
def vlm(varied_model_dir) -> VLM:
    return load(varied_model_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BATCHERS: dict = {}  # base URL -> the server's batcher, whose batch sizes a test inspects


@contextmanager
def serving(app) -> Iterator[str]:
    """A real uvicorn server for an ASGI app on a loopback port, in a background thread; yields its
    base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "server failed to start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def running(vlm: VLM, settings: ServeSettings) -> Iterator[str]:
    """`medvl serve`'s app on a loopback port; yields its base URL."""
    app = create_app(vlm, settings)
    with serving(app) as url:
        BATCHERS[url] = app.state.batcher
        yield url


@pytest.fixture(scope="module")
def server(vlm) -> Iterator[str]:
    with running(vlm, SETTINGS) as url:
        yield url


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def ask(question: str, url: str | None = None) -> list[dict]:
    content: list[dict] = [{"type": "image_url", "image_url": {"url": url}}] if url else []
    return [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]


def direct(vlm: VLM, question: str, image: Image.Image | None, **kw) -> Completion:
    """What the model answers when called in-process, for the server's answers to be compared with."""
    return generate(vlm, [user_turn(question, image)], **kw)[0]


def post(url: str, body: dict | list | bytes, key: str = KEY) -> httpx.Response:
    """Raw HTTP, for requests a client library would refuse to build (bytes are sent as they are)."""
    payload = {"content": body} if isinstance(body, bytes) else {"json": body}
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=120, **payload)


def assert_error_shape(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# ---- the API, through the official client ----


def test_models_and_api_key(server):
    assert [m.id for m in client(server).models.list()] == ["tiny"]
    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong").models.list()
    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong").chat.completions.create(model="tiny", messages=ask("hi"), max_tokens=2)
    assert assert_error_shape(post(server, {"model": "tiny"}, key="nope"), 401)["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("header", "status", "says"),
    [
        (None, 401, "missing API key"),
        (KEY, 401, "must read 'Bearer <key>'"),  # the bare key, without the scheme
        (f"Basic {KEY}", 401, "must read 'Bearer <key>'"),
        ("Bearer", 401, "incorrect API key"),
        (f"Bearer {KEY}x", 401, "incorrect API key"),
        (f"Bearer {KEY}", 200, None),
        (f"bearer {KEY}", 200, None),  # the scheme is case-insensitive (RFC 9110)
    ],
)
def test_authorization_header_must_be_bearer(server, header, status, says):
    r = httpx.get(f"{server}/v1/models", headers={"Authorization": header} if header else {})
    assert r.status_code == status, r.text
    if says:
        error = assert_error_shape(r, 401)
        assert says in error["message"] and r.headers["www-authenticate"] == "Bearer"


def test_completion_equals_in_process_generate(server, vlm):
    image = noise(80, 60)
    r = client(server).chat.completions.create(
        model="tiny", messages=ask("What does the CT show?", data_url(png(image))), max_tokens=12
    )
    want = direct(vlm, "What does the CT show?", image, max_new_tokens=12)
    assert r.object == "chat.completion" and r.model == "tiny" and len(r.choices) == 1
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, want.completion_tokens)
    assert r.usage.total_tokens == want.prompt_tokens + want.completion_tokens
    # the image's tokens are counted: the same question without it is shorter by the image's tokens
    text_only = client(server).chat.completions.create(
        model="tiny", messages=ask("What does the CT show?"), max_tokens=1
    )
    assert r.usage.prompt_tokens - text_only.usage.prompt_tokens > vlm.model.config.image_seq_length
    # the count the server checks the context length with, before queueing, is the model's own
    assert PromptCounter(vlm).count(user_turn("What does the CT show?", image)) == want.prompt_tokens


def test_streaming_equals_non_streaming(server):
    messages = ask("Describe the image.", data_url(png(noise(64, 64, seed=1))))
    full = client(server).chat.completions.create(model="tiny", messages=messages, max_tokens=16)
    chunks = list(
        client(server).chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    # without stream_options, no usage chunk (as OpenAI does)
    plain = list(
        client(server).chat.completions.create(model="tiny", messages=messages, max_tokens=4, stream=True)
    )
    assert all(c.usage is None and c.choices for c in plain)


def test_concurrent_requests_are_batched_and_equal_to_alone(server, vlm):
    """Greedy requests with different prompts, images and max_tokens, half of them streamed, sent at
    once: each answer equals the in-process answer for that request alone."""
    cases = [
        (f"Question {i} about the {organ}?", noise(64 + 8 * i, 64, seed=i), 4 + 3 * i)
        for i, organ in enumerate(["liver", "lung", "heart", "kidney", "brain", "spleen"])
    ]
    want = [direct(vlm, q, im, max_new_tokens=n) for q, im, n in cases]
    sizes_before = BATCHERS[server].batch_sizes.copy()

    def call(i: int) -> str:
        q, im, n = cases[i]
        kw = dict(model="tiny", messages=ask(q, data_url(png(im))), max_tokens=n)
        if i % 2:
            stream = client(server).chat.completions.create(**kw, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        return client(server).chat.completions.create(**kw).choices[0].message.content

    with cf.ThreadPoolExecutor(len(cases)) as pool:
        got = list(pool.map(call, range(len(cases))))
    assert got == [w.text for w in want]
    new = BATCHERS[server].batch_sizes - sizes_before
    assert max(new) > 1, f"requests sent together were never batched: {dict(new)}"


def test_seed_makes_sampling_reproducible(server):
    messages = ask("What organ is this?", data_url(png(noise(64, 64, seed=2))))

    def sample(seed: int) -> str:
        r = client(server).chat.completions.create(
            model="tiny", messages=messages, max_tokens=12, temperature=1.0, top_p=0.95, seed=seed
        )
        return r.choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


def _printable_pair(text: str) -> str | None:
    """A two-character piece of `text` after its start, free of undecodable bytes (the random-weight
    model emits many), to use as a stop string."""
    pairs = (text[i : i + 2] for i in range(1, len(text) - 1))
    return next((p for p in pairs if p.isprintable() and "\ufffd" not in p), None)


def test_stop_strings(server):
    """Sampled with a seed (greedy text from random weights repeats one byte): the same seed with a
    stop string gives the same text, cut where the stop first occurs."""
    messages = ask("Is there a nodule in the lung?")
    kw = dict(model="tiny", messages=messages, max_tokens=24, temperature=1.0)
    texts = (
        client(server).chat.completions.create(**kw, seed=s).choices[0].message.content for s in range(10)
    )
    seed, text = next((s, t) for s, t in enumerate(texts) if _printable_pair(t))
    stop = _printable_pair(text)
    want = text[: text.index(stop)]
    r = client(server).chat.completions.create(**kw, seed=seed, stop=[stop, "@@"])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    stream = client(server).chat.completions.create(**kw, seed=seed, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want


@pytest.mark.parametrize("modality", DICOMS)
def test_dicom_data_url(server, vlm, modality):
    path = get_testdata_file(DICOMS[modality])
    messages = ask("What does this scan show?", data_url(Path(path).read_bytes(), "application/dicom"))
    r = client(server).chat.completions.create(model="tiny", messages=messages, max_tokens=6)
    size = vlm.model.config.vision_config.image_size
    image = read_image(path, vlm.preprocessing, size=size)  # as the server reads it
    assert (
        r.choices[0].message.content == direct(vlm, "What does this scan show?", image, max_new_tokens=6).text
    )


def test_research_only_label(server):
    r = post(server, {"model": "tiny", "messages": ask("hi"), "max_tokens": 1})
    assert r.status_code == 200 and r.headers["x-medvl-notice"] == RESEARCH_ONLY


# ---- limits and malformed requests ----


def _dicom_bomb() -> bytes:
    """A real DICOM header that claims a 65535x65535 image."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows = ds.Columns = 65535
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def _png_bomb() -> bytes:
    """4 million pixels in a few kilobytes (the server's limit is 1 million)."""
    return png(Image.new("L", (2000, 2000)))


def test_limits(server):
    big_text = {"model": "tiny", "messages": ask("x" * (5 * 2**20))}
    assert assert_error_shape(post(server, big_text), 413)["code"] == "request_too_large"
    big_image = {"model": "tiny", "messages": ask("q", data_url(png(noise(800, 800))))}  # ~1.9 MB of noise
    assert assert_error_shape(post(server, big_image), 413)["code"] == "image_too_large"
    for bomb, mime in ((_png_bomb(), "image/png"), (_dicom_bomb(), "application/dicom")):
        error = assert_error_shape(
            post(server, {"model": "tiny", "messages": ask("q", data_url(bomb, mime))}), 400
        )
        assert "pixel limit" in error["message"] and error["param"] == "messages.0.content.0.image_url.url"
    three = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": data_url(png(noise(8, 8)))}}] * 3,
        }
    ]
    assert "images" in assert_error_shape(post(server, {"model": "tiny", "messages": three}), 400)["message"]
    over = {"model": "tiny", "messages": ask("q"), "max_tokens": 65}
    assert assert_error_shape(post(server, over), 400)["param"] == "max_tokens"
    long = {"model": "tiny", "messages": ask("lung " * 1100), "max_tokens": 8}
    assert assert_error_shape(post(server, long), 400)["code"] == "context_length_exceeded"


GOOD = ask("hi")
MALFORMED = {
    "bad JSON": b'{"model": "tiny", "messages": [',
    "not UTF-8": b'{"model": "\xff"}',
    "JSON array": [1, 2],
    "no messages": {"model": "tiny"},
    "empty messages": {"model": "tiny", "messages": []},
    "wrong role": {"model": "tiny", "messages": [{"role": "doctor", "content": "hi"}]},
    "missing content": {"model": "tiny", "messages": [{"role": "user"}]},
    "content not text": {"model": "tiny", "messages": [{"role": "user", "content": 5}]},
    "empty content": {"model": "tiny", "messages": [{"role": "user", "content": " "}]},
    "unknown part": {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
    "last from assistant": {"model": "tiny", "messages": [*GOOD, {"role": "assistant", "content": "x"}]},
    "image from assistant": {
        "model": "tiny",
        "messages": [
            {
                "role": "assistant",
                "content": [{"type": "image_url", "image_url": {"url": data_url(png(noise(8, 8)))}}],
            },
            *GOOD,
        ],
    },
    "not an image": {"model": "tiny", "messages": ask("q", data_url(b"hello, not a picture"))},
    "truncated DICOM": {
        "model": "tiny",
        "messages": ask(
            "q", data_url(Path(get_testdata_file("MR_truncated.dcm")).read_bytes(), "application/dicom")
        ),
    },
    "GIF": {"model": "tiny", "messages": ask("q", data_url(b"GIF89a", "image/gif"))},
    "BMP sent as PNG": {"model": "tiny", "messages": ask("q", data_url(b"BM" + b"\0" * 60))},
    "not base64": {"model": "tiny", "messages": ask("q", "data:image/png;base64,@@@")},
    "data URL without base64": {"model": "tiny", "messages": ask("q", "data:image/png,abc")},
    "unknown parameter": {"model": "tiny", "messages": GOOD, "tools": []},
    "n > 1": {"model": "tiny", "messages": GOOD, "n": 2},
    "temperature 5": {"model": "tiny", "messages": GOOD, "temperature": 5},
    "max_tokens 0": {"model": "tiny", "messages": GOOD, "max_tokens": 0},
    "five stops": {"model": "tiny", "messages": GOOD, "stop": ["a", "b", "c", "d", "e"]},
    "empty stop": {"model": "tiny", "messages": GOOD, "stop": [""]},
    "seed not int": {"model": "tiny", "messages": GOOD, "seed": "abc"},
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_request_gets_400(server, case):
    assert_error_shape(post(server, MALFORMED[case]), 400)


def test_unknown_model_and_route_get_404(server):
    assert (
        assert_error_shape(post(server, {"model": "gpt-4o", "messages": GOOD}), 404)["code"]
        == "model_not_found"
    )
    assert_error_shape(httpx.get(f"{server}/v1/nothing"), 404)
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="gpt-4o", messages=GOOD)


# ---- no SSRF, no path traversal ----


class _Canary(http.server.BaseHTTPRequestHandler):
    """A loopback web server that records every request it gets."""

    hits: list[str] = []
    image = png(noise(32, 32, seed=9))
    redirect_to = ""

    def do_GET(self) -> None:
        type(self).hits.append(self.path)
        if self.path.startswith("/images/redirect"):
            self.send_response(302)
            self.send_header("Location", self.redirect_to)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(self.image)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def canary() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Canary)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    _Canary.hits = []
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


def test_urls_and_paths_are_refused_by_default(server, canary, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(png(noise(8, 8)))
    for url in (
        f"{canary}/images/x.png",
        f"file://{secret}",
        str(secret),
        "../../etc/passwd",
        "ftp://127.0.0.1/x.png",
        "http://169.254.169.254/latest/meta-data/",
    ):
        error = assert_error_shape(post(server, {"model": "tiny", "messages": ask("q", url)}), 400)
        assert error["param"] == "messages.0.content.0.image_url.url"
    assert _Canary.hits == []  # the server never connected


def test_allow_lists(vlm, canary, tmp_path):
    """An operator's allow-lists open exactly what they name, and redirects are never followed."""
    other = f"http://localhost:{canary.rsplit(':', 1)[1]}"  # same canary, another host name
    _Canary.redirect_to = f"{other}/images/x.png"
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "ok.png").write_bytes(png(noise(16, 16)))
    (tmp_path / "outside.png").write_bytes(png(noise(16, 16)))
    (allowed / "escape.png").symlink_to(tmp_path / "outside.png")
    settings = replace(SETTINGS, allow_url_prefixes=(f"{canary}/images/",), allow_dirs=(allowed,))
    with running(vlm, settings) as url:

        def status(image_url: str) -> int:
            return post(url, {"model": "tiny", "messages": ask("q", image_url), "max_tokens": 1}).status_code

        assert status(f"{canary}/images/x.png") == 200
        assert status(f"file://{allowed / 'ok.png'}") == 200
        assert _Canary.hits == ["/images/x.png"]
        assert status(f"{canary}/images/redirect") == 400  # to another host: not followed
        assert status(f"{canary}/secret.png") == 400  # outside the prefix
        assert status(f"{canary}/images/../secret.png") == 400
        assert status(f"{canary}/images/%2e%2e/secret.png") == 400
        assert status(f"{canary.replace('http://', 'http://user@')}/images/x.png") == 400
        assert status(f"{canary}.evil.example/images/x.png") == 400
        assert _Canary.hits == ["/images/x.png", "/images/redirect"]
        assert status(f"file://{allowed / 'escape.png'}") == 400  # a symlink out of the folder
        assert status(f"file://{allowed}/../outside.png") == 400
        assert status(f"file://localhost{allowed / 'ok.png'}") == 200
        assert status(f"file://otherhost{allowed / 'ok.png'}") == 400


# ---- queue and load ----


def test_full_queue_answers_429(vlm):
    settings = replace(SETTINGS, max_queue=1, max_batch_size=1)
    body = {"model": "tiny", "messages": ask("Describe the liver."), "max_tokens": 24}
    with running(vlm, settings) as url, cf.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: post(url, body), range(12)))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 429}, codes
    assert_error_shape(next(r for r in responses if r.status_code == 429), 429)


def test_load_many_clients_some_bad(vlm):
    """32 concurrent clients, 120 requests, a quarter of them malformed: every good request is
    answered, every bad one gets a 4xx, and nothing gets a 5xx."""
    rng = random.Random(0)
    bad = list(MALFORMED.values())
    jobs = []
    for i in range(120):
        if i % 4 == 3:
            jobs.append((False, rng.choice(bad)))
        else:
            stream = i % 8 == 1
            jobs.append(
                (
                    True,
                    {
                        "model": "tiny",
                        "messages": ask(f"Is there a mass in case {i}?"),
                        "max_tokens": rng.randint(1, 6),
                        "stream": stream,
                    },
                )
            )
    settings = replace(SETTINGS, max_queue=64)
    with running(vlm, settings) as url, cf.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda job: (job[0], post(url, job[1])), jobs))
    for good, r in results:
        assert r.status_code < 500, r.text
        if good:
            assert r.status_code == 200, r.text
            if "text/event-stream" in r.headers["content-type"]:
                assert r.text.rstrip().endswith("data: [DONE]") and '"finish_reason": "' in r.text
            else:
                assert r.json()["choices"][0]["message"]["role"] == "assistant"
        else:
            assert 400 <= r.status_code < 500


# ---- a request body that stops arriving ----


def _raw_exchange(url: str, body: bytes, pieces: list[tuple[float, bytes]]) -> tuple[bytes, float]:
    """Over a plain socket: the request's headers (announcing `body`'s length), then each piece after
    its pause; then everything the server sends until it closes the connection, and the seconds that
    took after the last piece."""
    host, port = url.removeprefix("http://").split(":")
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\n"
        f"Host: {host}\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head)
        for pause, piece in pieces:
            time.sleep(pause)
            sock.sendall(piece)
        start, answer = time.monotonic(), b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer, time.monotonic() - start


def _status_and_json(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_stalled_body_gets_408(vlm):
    """Headers and half the body, then nothing: a 408 in OpenAI's error shape once the configured
    time has passed, and the server closes the connection; the server keeps serving."""
    body = json.dumps({"model": "tiny", "messages": ask("Describe the liver."), "max_tokens": 2}).encode()
    with running(vlm, replace(SETTINGS, body_timeout_s=1.0)) as url:
        answer, waited = _raw_exchange(url, body, [(0, body[: len(body) // 2])])
        assert post(url, {"model": "tiny", "messages": ask("hi"), "max_tokens": 1}).status_code == 200
    status, error = _status_and_json(answer)
    assert status == 408 and error["error"]["code"] == "request_timeout", answer
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert 1.0 <= waited < 5.0, waited  # the wait ends with the answer and the closed connection


def test_slow_but_steady_body_is_read(vlm):
    """The limit is on a pause, not on the whole body: pieces 0.6 s apart under a 1 s limit, 2.4 s in
    all, make a normal request."""
    body = json.dumps({"model": "tiny", "messages": ask("Describe the liver."), "max_tokens": 2}).encode()
    quarter = len(body) // 4 + 1
    pieces = [(0.6, body[i : i + quarter]) for i in range(0, len(body), quarter)]
    with running(vlm, replace(SETTINGS, body_timeout_s=1.0)) as url:
        answer, _ = _raw_exchange(url, body, pieces)
    status, completion = _status_and_json(answer)
    assert status == 200 and completion["object"] == "chat.completion", answer


def test_stream_outlasting_the_body_limit_is_not_cut(vlm):
    """Once the body is in, the limit is off: a streamed answer that takes longer than it (the
    response waits on `receive` for a disconnect all along) arrives whole. The tiny model answers in
    as little as 0.15 s on a fast machine, so each forward of its language model is held back by
    more than the limit (a hook, removed after): even a one-token answer outlasts it."""
    limit = 0.15
    hook = vlm.model.model.language_model.register_forward_pre_hook(lambda *_: time.sleep(limit + 0.05))
    try:
        with running(vlm, replace(SETTINGS, body_timeout_s=limit)) as url:
            start = time.monotonic()
            stream = client(url).chat.completions.create(
                model="tiny", messages=ask("Describe the liver."), max_tokens=16, stream=True
            )
            finishes = [c.choices[0].finish_reason for c in stream if c.choices]
            finishes = [f for f in finishes if f]
            took = time.monotonic() - start
    finally:
        hook.remove()
    assert len(finishes) == 1
    assert took > limit, f"the answer took {took:.2f} s: too quick to test the limit"


# ---- medvl chat ----


def test_chat_cli_reads_dicom(varied_model_dir):
    from medvl.cli import app

    result = CliRunner().invoke(
        app,
        [
            "chat",
            "--model",
            str(varied_model_dir),
            "--image",
            get_testdata_file("CT_small.dcm"),
            "-q",
            "Findings?",
            "--max-new-tokens",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert RESEARCH_ONLY in result.output and "medvl>" in result.output


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    noise(64, 64).save(buf, "JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


@pytest.mark.parametrize(
    ("name", "data"),
    [("truncated.jpg", _truncated_jpeg()), ("empty.png", b""), ("notes.png", b"not an image, just text\n")],
)
def test_chat_unreadable_image_is_one_line(varied_model_dir, tmp_path, name, data):
    """The installed command on a bad image: exit status 1 and one line on stderr naming the file,
    before the model's weights load (so no progress bar either), no traceback."""
    path = tmp_path / name
    path.write_bytes(data)
    medvl = Path(sys.executable).with_name("medvl")
    args = [medvl, "chat", "--model", varied_model_dir, "--image", path, "-q", "Findings?"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout
