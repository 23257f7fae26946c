"""One client for OpenAI-compatible chat endpoints (OpenAI, vLLM, `medvl serve`), for every medvl
stage that asks an LLM: eval's API models and judge, the instruction-data generator.

- At most `max_concurrency` requests in flight per client (threads; `complete_many` keeps order).
- Retries with exponential back-off and jitter on 408/409/429/5xx, time-outs and connection errors;
  the `openai` client's own retries are off, so `Reply.retries` and `Usage.retries` are what happened.
- An on-disk cache (`cache_dir`, one JSON file per request) keyed by a hash of the whole request:
  endpoint, model, messages (image data included) and sampling parameters. A re-run never pays for
  an answer it already has; sampled answers are cached too, so a re-run reproduces them.
- Token counts per call (the endpoint's `usage`), running totals, and a cost estimate from a price
  table the caller sets; a model without a price (or an answer without usage) makes the cost unknown
  (None), never 0.
- The API key is given directly or read from an environment variable the caller names; it is never
  logged and is masked in error messages. Failures raise :class:`LLMError`, one line naming the
  endpoint, the model and the HTTP status.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import random
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger("medvl.llm")

# Statuses worth asking again (as the openai client's own retry rule): the server may answer later.
RETRY_STATUSES = frozenset({408, 409, 429})
# A server's `Retry-After` is waited up to this many seconds (the openai client's own cap).
MAX_RETRY_AFTER = 60.0
CACHE_VERSION = 1  # part of every cache key: a change of what is stored starts a fresh cache


@dataclass(frozen=True)
class Price:
    """US dollars per million tokens."""

    input: float
    output: float


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str | None
    prompt_tokens: int | None  # None: the endpoint sent no usage
    completion_tokens: int | None
    cost: float | None  # US dollars; None: unknown (no price for the model, or no usage)
    cached: bool  # read from the cache: nothing was sent, nothing paid
    retries: int  # requests this answer needed beyond the first (0 from the cache)
    response: dict  # the endpoint's whole answer (a `chat.completion` object as JSON)


@dataclass
class Usage:
    """Running totals of one client. Tokens and cost count answers paid for, not cache hits."""

    requests: int = 0  # HTTP requests sent, retries included
    paid: int = 0  # answers received from the endpoint
    cached: int = 0  # answers read from the cache
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    priced_cost: float = 0.0  # of the answers with a price and usage
    unpriced: set[str] = field(default_factory=set)  # models whose answers have no known cost

    @property
    def cost(self) -> float | None:
        """US dollars spent, or None when some answer's cost is unknown."""
        return None if self.unpriced else self.priced_cost

    def summary(self) -> str:
        cost = (
            f"cost ${self.priced_cost:.4f}"
            if not self.unpriced
            else f"cost unknown (no price or usage for {', '.join(sorted(self.unpriced))})"
        )
        return (
            f"{self.paid} answers paid, {self.cached} from cache, {self.requests} requests "
            f"({self.retries} retries), {self.prompt_tokens} prompt + {self.completion_tokens} "
            f"completion tokens, {cost}"
        )


class LLMError(RuntimeError):
    """A request that failed for good: `endpoint: model 'm': HTTP 503 (...) after 5 retries`."""

    def __init__(self, base_url: str, model: str, status: int | None, problem: str, retries: int) -> None:
        what = f"HTTP {status}: {problem}" if status is not None else problem
        tail = f" after {retries} retries" if retries else ""
        super().__init__(f"{base_url}: model {model!r}: {what}{tail}")
        self.base_url, self.model, self.status, self.retries = base_url, model, status, retries


def image_data_url(image: Image.Image) -> str:
    """An image as a base64 PNG `data:` URL, the form OpenAI-compatible endpoints accept."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class LLMClient:
    """Chat completions from one OpenAI-compatible endpoint (`base_url`, e.g. http://host:8000/v1).

    `api_key` is used as given; else the variable named by `api_key_env` is read; local servers
    without a key need neither. `prices` maps a model name to its :class:`Price`. `timeout` is the
    limit for one request, in seconds; `backoff` the first retry's delay, doubled each retry up to
    `max_backoff` (each delay drawn between half and all of it, so that clients refused together do
    not come back together); a `Retry-After` header (in seconds, up to a minute) is waited at least."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        api_key_env: str | None = None,
        max_concurrency: int = 16,
        max_retries: int = 5,
        timeout: float = 120.0,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        cache_dir: str | Path | None = None,
        prices: Mapping[str, Price] | None = None,
    ) -> None:
        from openai import OpenAI

        if max_concurrency < 1 or max_retries < 0:
            raise ValueError("max_concurrency must be >= 1 and max_retries >= 0")
        key = api_key or (os.environ.get(api_key_env) if api_key_env else None)
        # The openai client insists on some key; a server without auth accepts any.
        self._client = OpenAI(base_url=base_url, api_key=key or "none", max_retries=0, timeout=timeout)
        self._secret = key
        self.base_url = str(self._client.base_url).rstrip("/")
        self.max_concurrency, self.max_retries, self.timeout = max_concurrency, max_retries, timeout
        self.backoff, self.max_backoff = backoff, max_backoff
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.prices = dict(prices or {})
        self.usage = Usage()
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}

    def __repr__(self) -> str:
        return f"LLMClient({self.base_url!r}, max_concurrency={self.max_concurrency})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- asking ----

    def complete(self, model: str, messages: list[dict], *, cache: bool = True, **params: Any) -> Reply:
        """One chat completion. `params` are the request's other fields (temperature, max_tokens,
        seed, stop, ...), sent as given. `cache=False` asks the endpoint even when the cache holds an
        answer (and does not store the new one)."""
        use_cache = cache and self.cache_dir is not None
        if not use_cache:
            return self._ask(model, messages, params)
        key = self.cache_key(model, messages, params)
        # One request per key at a time: the same request twice in one batch is paid for once.
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            stored = self._read_cache(key)
            if stored is not None:
                with self._lock:
                    self.usage.cached += 1
                return self._reply(model, stored, cached=True, retries=0)
            reply = self._ask(model, messages, params)
            self._write_cache(key, reply.response)
            return reply

    def complete_many(
        self, model: str, conversations: Iterable[list[dict]], *, cache: bool = True, **params: Any
    ) -> list[Reply]:
        """One completion per conversation (as :meth:`complete`), at most `max_concurrency` in
        flight, replies in order. The first failure is raised once the requests already running
        finish (with a cache, their answers are kept); requests not yet started are dropped."""
        conversations = list(conversations)
        if not conversations:
            return []
        failed = threading.Event()

        def one(conversation: list[dict]) -> Reply | None:
            if failed.is_set():
                return None  # started after a failure (so later in order than it): dropped
            try:
                return self.complete(model, conversation, cache=cache, **params)
            except BaseException:
                failed.set()
                raise

        with ThreadPoolExecutor(min(self.max_concurrency, len(conversations))) as pool:
            # Tasks start in order, so the first failure in order comes before any dropped task.
            return [f.result() for f in [pool.submit(one, c) for c in conversations]]

    def cache_key(self, model: str, messages: list[dict], params: Mapping[str, Any]) -> str:
        request = {
            "version": CACHE_VERSION,
            "base_url": self.base_url,
            "model": model,
            "messages": messages,
            "params": dict(params),
        }
        text = json.dumps(request, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    # ---- the request, with retries ----

    def _ask(self, model: str, messages: list[dict], params: Mapping[str, Any]) -> Reply:
        import openai

        retries = 0
        with self._slots:
            while True:
                with self._lock:
                    self.usage.requests += 1
                try:
                    response = self._client.chat.completions.create(model=model, messages=messages, **params)
                    break
                except openai.APIError as e:
                    status = getattr(e, "status_code", None)
                    retryable = isinstance(e, openai.APIConnectionError) or (
                        status is not None and (status in RETRY_STATUSES or status >= 500)
                    )
                    problem = self._problem(e)
                    if not retryable or retries >= self.max_retries:
                        raise LLMError(self.base_url, model, status, problem, retries) from None
                    delay = self._delay(retries, e)
                    log.warning(
                        "%s: %s; retry %d of %d in %.1f s",
                        self.base_url,
                        f"HTTP {status}" if status else problem,
                        retries + 1,
                        self.max_retries,
                        delay,
                    )
                    time.sleep(delay)
                    retries += 1
        body = response.model_dump(mode="json")
        if not body.get("choices"):
            raise LLMError(self.base_url, model, None, "answer has no choices", retries)
        reply = self._reply(model, body, cached=False, retries=retries)
        with self._lock:
            u = self.usage
            u.paid += 1
            u.retries += retries
            u.prompt_tokens += reply.prompt_tokens or 0
            u.completion_tokens += reply.completion_tokens or 0
            if reply.cost is None:
                u.unpriced.add(model)
            else:
                u.priced_cost += reply.cost
        return reply

    def _delay(self, retries: int, error: Exception) -> float:
        delay = min(self.max_backoff, self.backoff * 2**retries) * random.uniform(0.5, 1.0)
        response = getattr(error, "response", None)
        after = response.headers.get("retry-after", "") if response is not None else ""
        try:
            return max(delay, min(float(after), MAX_RETRY_AFTER))
        except ValueError:  # absent, or an HTTP date: the back-off alone
            return delay

    def _problem(self, e: Exception) -> str:
        """The server's own message, on one line, with the key masked."""
        import openai

        if isinstance(e, openai.APITimeoutError):
            problem = f"no answer within {self.timeout:g} s"
        elif isinstance(e, openai.APIConnectionError):
            cause = e.__cause__
            problem = f"connection failed ({type(cause).__name__ if cause else e.message})"
        else:
            body = getattr(e, "body", None)
            message = body.get("message") if isinstance(body, dict) else None
            problem = str(message or getattr(e, "message", e))
        problem = " ".join(problem.split())[:300]
        return problem.replace(self._secret, "***") if self._secret else problem

    def _reply(self, model: str, body: dict, *, cached: bool, retries: int) -> Reply:
        choice = body["choices"][0]
        usage = body.get("usage") or {}
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        price = self.prices.get(model)
        cost = (
            (prompt * price.input + completion * price.output) / 1e6
            if price is not None and prompt is not None and completion is not None
            else None
        )
        return Reply(
            text=(choice.get("message") or {}).get("content") or "",
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=prompt,
            completion_tokens=completion,
            cost=cost,
            cached=cached,
            retries=retries,
            response=body,
        )

    # ---- the cache: one file per key, written whole or not at all ----

    def _cache_path(self, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / key[:2] / f"{key}.json"

    def _read_cache(self, key: str) -> dict | None:
        path = self._cache_path(key)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("%s: unreadable cache entry, asking again", path)
            return None

    def _write_cache(self, key: str, body: dict) -> None:
        path = self._cache_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A temporary file in the same folder, renamed over the target: a reader (another thread or
        # process) sees the old state or the whole new file, never half of it.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:8]}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(body, f, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
