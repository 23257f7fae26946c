"""medvl.llm's client against real loopback servers: `medvl serve` with the tiny model (its 429 when
the queue is full, its API key check), and conftest's scripted OpenAI-style fixture server (the
`endpoint` fixture) for what a real model server does not do on demand (500s, slow answers,
Retry-After, chosen token counts), which also counts the requests it gets."""

from __future__ import annotations

import base64
import io
import logging
import time
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from test_serve import KEY, SETTINGS, build_tiny_model, direct, free_port, serving

from medvl.llm import LLMClient, LLMError, Price, image_data_url


def fast(url: str, **kw) -> LLMClient:
    """A client whose back-off is short enough for tests."""
    return LLMClient(url, **{"backoff": 0.02, "max_backoff": 0.2, "timeout": 10.0, **kw})


def say(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------- retries


def test_server_errors_are_retried_until_an_answer(endpoint):
    endpoint.script = [{"status": 500}, {"status": 503}, {"status": 502}]
    llm = fast(endpoint.url)
    reply = llm.complete("m", say("hello"))
    assert reply.text == "echo: hello" and reply.retries == 3 and not reply.cached
    assert len(endpoint.requests) == 4
    assert (llm.usage.requests, llm.usage.retries, llm.usage.paid) == (4, 3, 1)


def test_backoff_doubles_with_jitter(endpoint):
    """Delays drawn from [d/2, d] with d = 0.2, 0.4, 0.8 s: each gap between the fixture's arrivals
    is at least its half and the gaps grow."""
    endpoint.script = [{"status": 500}] * 3
    llm = LLMClient(endpoint.url, backoff=0.2, max_backoff=10)
    assert llm.complete("m", say("x")).retries == 3
    arrivals = [r["time"] for r in endpoint.requests]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert [g >= 0.2 * 2**i / 2 for i, g in enumerate(gaps)] == [True] * 3, gaps
    assert gaps[2] > gaps[0], gaps


def test_retry_after_is_waited(endpoint):
    endpoint.script = [{"status": 429, "headers": {"Retry-After": "1"}}]
    llm = fast(endpoint.url)
    start = time.monotonic()
    assert llm.complete("m", say("x")).retries == 1
    assert time.monotonic() - start >= 1.0  # the server's 1 s, not the client's 0.02 s back-off


def test_exhausted_retries_give_one_line_naming_endpoint_and_status(endpoint, caplog):
    endpoint.script = [{"status": 503}] * 10
    secret = "sk-test-0123456789"
    llm = fast(endpoint.url, api_key=secret, max_retries=2)
    with caplog.at_level(logging.DEBUG), pytest.raises(LLMError) as caught:
        llm.complete("gpt-test", say("x"))
    message = str(caught.value)
    assert caught.value.status == 503 and caught.value.retries == 2
    assert len(endpoint.requests) == 3 and llm.usage.requests == 3
    assert "\n" not in message and endpoint.url in message and "HTTP 503" in message
    assert "gpt-test" in message and "after 2 retries" in message
    assert "scripted failure" in message and "***" in message  # the server's words, the key masked
    assert secret not in message and secret not in caplog.text and secret not in repr(llm)
    assert [r.levelname for r in caplog.records if r.name == "medvl.llm"] == ["WARNING"] * 2  # per retry


def test_client_errors_are_not_retried(endpoint):
    endpoint.script = [{"status": 400}, {"status": 401}]
    llm = fast(endpoint.url)
    for status in (400, 401):
        with pytest.raises(LLMError) as caught:
            llm.complete("m", say("x"))
        assert caught.value.status == status and caught.value.retries == 0
    assert len(endpoint.requests) == 2


def test_timeout_is_retried_then_reported(endpoint):
    endpoint.script = [{"delay": 3.0}]
    llm = fast(endpoint.url, timeout=0.5)
    start = time.monotonic()
    reply = llm.complete("m", say("slow"))
    assert reply.text == "echo: slow" and reply.retries == 1 and len(endpoint.requests) == 2
    assert time.monotonic() - start < 2.5  # the client gave up on the slow answer
    endpoint.default = {"delay": 3.0}
    with pytest.raises(LLMError) as caught:
        fast(endpoint.url, timeout=0.5, max_retries=1).complete("m", say("slow"))
    assert caught.value.status is None and "no answer within 0.5 s" in str(caught.value)
    assert "after 1 retries" in str(caught.value) and len(endpoint.requests) == 4


def test_connection_refused_is_retried_then_reported():
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    llm = fast(url, max_retries=2)
    with pytest.raises(LLMError) as caught:
        llm.complete("m", say("x"))
    assert caught.value.status is None and "connection failed" in str(caught.value)
    assert url in str(caught.value) and llm.usage.requests == 3


# ---------------------------------------------------------------- tokens and cost


def test_token_counts_and_cost(endpoint):
    prices = {"priced": Price(input=2.5, output=10.0)}
    llm = fast(endpoint.url, prices=prices)
    a = llm.complete("priced", say("first question"))
    b = llm.complete("priced", say("a second, longer question"))
    sent = endpoint.usages
    for reply, usage in zip((a, b), sent, strict=True):
        assert (reply.prompt_tokens, reply.completion_tokens) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )
        want = (usage["prompt_tokens"] * 2.5 + usage["completion_tokens"] * 10.0) / 1e6
        assert reply.cost == pytest.approx(want)
    assert llm.usage.prompt_tokens == sum(u["prompt_tokens"] for u in sent)
    assert llm.usage.completion_tokens == sum(u["completion_tokens"] for u in sent)
    assert llm.usage.cost == pytest.approx(a.cost + b.cost) and "$" in llm.usage.summary()

    # a model missing from the price table: its cost is unknown, and so is the total
    c = llm.complete("unpriced", say("third"))
    assert c.cost is None and c.prompt_tokens == endpoint.usages[-1]["prompt_tokens"]
    assert llm.usage.cost is None and llm.usage.unpriced == {"unpriced"}
    assert llm.usage.priced_cost == pytest.approx(a.cost + b.cost)
    assert "unknown" in llm.usage.summary() and "unpriced" in llm.usage.summary()

    # an answer without usage: tokens and cost unknown, not 0
    endpoint.script = [{"usage": None}]
    d = fast(endpoint.url, prices=prices).complete("priced", say("fourth"))
    assert (d.prompt_tokens, d.completion_tokens, d.cost) == (None, None, None)


# ---------------------------------------------------------------- cache and concurrency


def _noise(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8))


def _with_image(text: str, image: Image.Image) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(image)}},
                {"type": "text", "text": text},
            ],
        }
    ]


def test_cache_means_a_rerun_sends_nothing(endpoint, tmp_path):
    cache = tmp_path / "cache"
    conversations = [_with_image(f"question {i}", _noise(i)) for i in range(6)]
    conversations.append(conversations[2])  # the same request twice in one batch is paid once
    first = fast(endpoint.url, cache_dir=cache).complete_many("m", conversations, temperature=0)
    assert len(endpoint.requests) == 6
    assert [r.text for r in first] == [f"echo: question {i}" for i in (0, 1, 2, 3, 4, 5, 2)]

    again = fast(endpoint.url, cache_dir=cache)  # a new run: a new client on the same folder
    second = again.complete_many("m", conversations, temperature=0)
    assert len(endpoint.requests) == 6  # zero requests
    assert [r.text for r in second] == [r.text for r in first] and all(r.cached for r in second)
    assert [r.prompt_tokens for r in second] == [r.prompt_tokens for r in first]
    assert (again.usage.requests, again.usage.cached, again.usage.prompt_tokens) == (0, 7, 0)

    # anything else in the request is another request: the image's pixels, a parameter, the model,
    # the endpoint (another spelling of the same server counts as another endpoint)
    other_pixel = np.array(_noise(0))
    other_pixel[0, 0, 0] ^= 1
    again.complete("m", _with_image("question 0", Image.fromarray(other_pixel)), temperature=0)
    again.complete("m", conversations[0], temperature=0.5)
    again.complete("m2", conversations[0], temperature=0)
    fast(endpoint.url.replace("127.0.0.1", "localhost"), cache_dir=cache).complete(
        "m", conversations[0], temperature=0
    )
    assert len(endpoint.requests) == 10
    again.complete("m", conversations[0], temperature=0, cache=False)  # asked past the cache
    assert len(endpoint.requests) == 11
    files = list(cache.rglob("*"))
    assert sum(f.suffix == ".json" for f in files) == 10 and not [f for f in files if ".tmp" in f.name]


def test_concurrency_limit_and_order(endpoint):
    endpoint.default = {"delay": 0.3}
    llm = fast(endpoint.url, max_concurrency=3)
    replies = llm.complete_many("m", [say(f"q{i}") for i in range(12)])
    assert [r.text for r in replies] == [f"echo: q{i}" for i in range(12)]
    assert endpoint.max_in_flight == 3


def test_a_failure_in_a_batch_is_raised(endpoint):
    endpoint.script = [{"status": 400}]
    with pytest.raises(LLMError):
        fast(endpoint.url, max_concurrency=1).complete_many("m", [say("a"), say("b"), say("c")])
    assert len(endpoint.requests) == 1  # the requests not yet started were dropped


def test_api_key_from_the_named_environment_variable(endpoint, monkeypatch):
    monkeypatch.setenv("MEDVL_TEST_LLM_KEY", "from-env")
    fast(endpoint.url, api_key_env="MEDVL_TEST_LLM_KEY").complete("m", say("x"))
    fast(endpoint.url, api_key="given", api_key_env="MEDVL_TEST_LLM_KEY").complete("m", say("x"))
    assert [r["auth"] for r in endpoint.requests] == ["Bearer from-env", "Bearer given"]


# ---------------------------------------------------------------- against `medvl serve`


class StatusCounter:
    """ASGI wrapper around the real app: counts the status of every response it sends."""

    def __init__(self, app) -> None:
        self.app, self.counts = app, Counter()

    async def __call__(self, scope, receive, send) -> None:
        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.counts[message["status"]] += 1
            await send(message)

        await self.app(scope, receive, counting_send)


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    from medvl.model.build import load

    return load(build_tiny_model(tmp_path_factory.mktemp("tiny") / "m"))


def test_backs_off_on_medvl_serve_429_until_every_answer_arrives(tiny_vlm):
    """A one-place queue and batches of one: most of 12 requests sent at once get a 429. Every
    request is answered in the end, each with the in-process answer, and the client's retry count
    is exactly the server's count of 429s."""
    from medvl.serve.api import create_app

    app = StatusCounter(create_app(tiny_vlm, replace(SETTINGS, max_queue=1, max_batch_size=1)))
    question = "Describe the liver."
    want = direct(tiny_vlm, question, None, max_new_tokens=24)
    with serving(app) as url:
        llm = LLMClient(
            f"{url}/v1", api_key=KEY, max_concurrency=12, max_retries=60, backoff=0.05, max_backoff=0.5
        )
        replies = llm.complete_many("tiny", [say(question)] * 12, max_tokens=24)
    assert [r.text for r in replies] == [want.text] * 12
    assert all(r.prompt_tokens == want.prompt_tokens for r in replies)
    assert app.counts[200] == 12 and app.counts[429] > 0, app.counts
    assert sum(r.retries for r in replies) == llm.usage.retries == app.counts[429]
    assert llm.usage.requests == 12 + app.counts[429]


def test_medvl_serve_wrong_key_is_one_line_and_not_retried(tiny_vlm):
    from medvl.serve.api import create_app

    app = StatusCounter(create_app(tiny_vlm, SETTINGS))
    with serving(app) as url:
        with pytest.raises(LLMError) as caught:
            LLMClient(f"{url}/v1", api_key="wrong-key").complete("tiny", say("hi"), max_tokens=2)
        ok = LLMClient(f"{url}/v1", api_key=KEY, prices={"tiny": Price(1.0, 2.0)})
        reply = ok.complete("tiny", say("hi"), max_tokens=2)
    assert caught.value.status == 401 and app.counts[401] == 1
    assert str(caught.value) == f"{url}/v1: model 'tiny': HTTP 401: incorrect API key"
    assert reply.cost == pytest.approx((reply.prompt_tokens * 1.0 + reply.completion_tokens * 2.0) / 1e6)
    assert 1 <= reply.completion_tokens <= 2


def test_image_data_url_round_trips():
    image = _noise(3)
    url = image_data_url(image)
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert np.array_equal(np.array(decoded), np.array(image))
