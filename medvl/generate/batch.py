"""Batch files for the `openai` backend: its requests as an OpenAI Batch API input file, and a results
file read back into the backend's answer cache.

Input lines (what https://platform.openai.com/docs/guides/batch and `vllm run-batch` read)::

    {"custom_id": "<cache key>", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

Output lines (what both write)::

    {"id": ..., "custom_id": ..., "response": {"status_code": 200, "request_id": ..., "body": {...}},
     "error": null}

The custom id is the request's `medvl.llm.LLMClient` cache key (a hash of endpoint, model, messages and
parameters), so reading a results file stores each answer exactly where the online path looks for it:
the generation run that follows finds every answered request in the cache, sends none of them, and
validates the answers through the same code as answers fetched online. Keys include the endpoint, so
write and read with the same `--base-url`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from medvl.errors import InputError
from medvl.jobs import atomic_write
from medvl.llm import LLMClient
from medvl.records import read_rows

ENDPOINT = "/v1/chat/completions"


@dataclass(frozen=True)
class Request:
    """One chat-completion request: its cache key and the body that would be sent."""

    key: str
    body: dict  # {"model", "messages", **params}
    fmt: str  # the sample format it asks for (not sent; token estimates use it)

    def batch_line(self) -> dict:
        return {"custom_id": self.key, "method": "POST", "url": ENDPOINT, "body": self.body}


def write_requests(path: str | Path, requests: Iterable[Request]) -> int:
    """Write a Batch API input file (one request per custom id, first occurrence kept); returns the
    number of lines written. The file appears whole or not at all."""
    seen: set[str] = set()
    lines: list[str] = []
    for r in requests:
        if r.key not in seen:
            seen.add(r.key)
            lines.append(json.dumps(r.batch_line(), ensure_ascii=False, separators=(",", ":")))

    def write(tmp: Path) -> None:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
    return len(lines)


@dataclass(frozen=True)
class Loaded:
    answered: set[str]  # custom ids whose answers are now in the cache
    failed: dict[str, str]  # custom id -> why it has no answer (the request stays unanswered)


def load_results(path: str | Path, llm: LLMClient) -> Loaded:
    """Store every successful answer of a Batch API / `vllm run-batch` results file in `llm`'s cache
    (which must have a cache folder). A line with an error or a non-200 status is reported in
    `failed`, not stored: the generation run asks it again (online) or writes it to the next batch."""
    if llm.cache_dir is None:
        raise ValueError("reading batch results needs an LLMClient with a cache folder")
    answered: set[str] = set()
    failed: dict[str, str] = {}
    for i, row in enumerate(read_rows(path), 1):
        key = row.get("custom_id")
        if not isinstance(key, str) or len(key) != 64:
            raise InputError(str(path), f"line {i}: custom_id", "missing or not a medvl request key")
        response = row.get("response") or {}
        body = response.get("body") if isinstance(response, dict) else None
        status = response.get("status_code") if isinstance(response, dict) else None
        if row.get("error") or status != 200 or not isinstance(body, dict) or not body.get("choices"):
            error = row.get("error") or {}
            message = error.get("message") if isinstance(error, dict) else str(error)
            failed[key] = " ".join(str(message or f"HTTP {status}").split())[:200]
            continue
        # The cache's own writer (atomic, keyed as the online path keys it): an answer read back here
        # is indistinguishable from one fetched online.
        llm._write_cache(key, body)
        answered.add(key)
    return Loaded(answered, failed)
