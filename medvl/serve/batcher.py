"""Dynamic batching: one worker thread owns the model and runs queued requests in batches through
`medvl.model.decode.generate`, the same path as `medvl chat` and `medvl eval`.

Which requests share a batch:
- greedy requests (temperature 0) with the same stop strings, whatever their `max_tokens`: the batch
  runs to the largest, and each row is cut back to its own budget afterwards. Greedy decoding of a
  row does not depend on the other rows, so a batched answer equals the answer served alone;
- a sampling request (temperature > 0) runs alone, so that its `seed` gives the same text whatever
  else is queued.
Streaming requests batch like the others: a streamer hands each row's new text to its request as
the batch decodes. The queue is bounded; `submit` raises `QueueFull` when it is full (HTTP 429).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from medvl.model.build import VLM
from medvl.model.decode import Completion, Conversation, generate

log = logging.getLogger("medvl.serve")


class QueueFull(Exception):
    pass


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Job:
    """One request: the worker thread posts ("delta", text), then ("done", Completion) or
    ("error", message) onto `events`, which lives on the submitter's event loop."""

    conversation: Conversation
    sampling: Sampling
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    def post(self, kind: str, payload) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))

    async def results(self) -> AsyncIterator[tuple[str, object]]:
        """The events in order, ending with "done" or "error"."""
        while True:
            kind, payload = await self.events.get()
            yield kind, payload
            if kind != "delta":
                return


class Batcher:
    def __init__(self, vlm: VLM, max_batch_size: int = 16, max_queue: int = 64) -> None:
        self.vlm, self.max_batch_size = vlm, max_batch_size
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="medvl-model-worker", daemon=True)
        self.batch_sizes: Counter[int] = Counter()  # how many batches of each size ran (for tests, stats)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

    def submit(self, conversation: Conversation, sampling: Sampling, stream: bool = False) -> Job:
        """Queue a request (from a coroutine: results come back on its event loop)."""
        job = Job(conversation, sampling, stream, asyncio.get_running_loop())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        return job

    def _run(self) -> None:
        pending: deque[Job] = deque()
        while True:
            if not pending:
                job = self._queue.get()
                if job is None:
                    return
                pending.append(job)
            # Take whatever else is waiting, without waiting for more: requests that arrive while a
            # batch runs form the next batch.
            while len(pending) < self.max_batch_size:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    return
                pending.append(job)
            batch = _take_batch(pending, self.max_batch_size)
            self._generate(batch)

    def _generate(self, batch: list[Job]) -> None:
        first = batch[0].sampling
        budget = max(j.sampling.max_tokens for j in batch)
        streamer = _BatchStreamer(self.vlm.tokenizer, batch)
        self.batch_sizes[len(batch)] += 1
        try:
            completions = generate(
                self.vlm,
                [j.conversation for j in batch],
                max_new_tokens=budget,
                temperature=first.temperature,
                top_p=first.top_p,
                stop=list(first.stop) or None,
                seed=first.seed,
                streamer=streamer if any(j.stream for j in batch) else None,
            )
        except Exception as e:  # the worker must outlive any request; validation should make this rare
            if len(batch) > 1 and not any(j.stream for j in batch):
                for job in batch:  # one bad row must not fail the others: retry them alone
                    self._generate([job])
                return
            log.exception("generation failed")
            for job in batch:
                job.post("error", f"generation failed: {type(e).__name__}: {e}")
            return
        for job, completion, sent in zip(batch, completions, streamer.sent, strict=True):
            completion = _fit_budget(completion, job.sampling, budget, self.vlm.tokenizer)
            if job.stream and completion.text.startswith(sent) and len(completion.text) > len(sent):
                job.post("delta", completion.text[len(sent) :])
            job.post("done", completion)


def _batch_key(s: Sampling) -> tuple | None:
    """Jobs with the same non-None key may share a batch; sampling jobs (None) run alone."""
    return ("greedy", s.stop) if s.temperature == 0 else None


def _take_batch(pending: deque[Job], max_size: int) -> list[Job]:
    """The oldest job and the pending jobs that may share its batch, in arrival order."""
    head = pending.popleft()
    key = _batch_key(head.sampling)
    batch = [head]
    if key is not None:
        for job in list(pending):
            if len(batch) == max_size:
                break
            if _batch_key(job.sampling) == key:
                pending.remove(job)
                batch.append(job)
    return batch


def _fit_budget(c: Completion, s: Sampling, budget: int, tokenizer) -> Completion:
    """Cut a row that ran past its own `max_tokens` (the batch ran to the largest) back to what it
    would have been alone: its first `max_tokens` tokens, cut at a stop string, else "length"."""
    if s.max_tokens >= budget or len(c.token_ids) < s.max_tokens:
        return c
    ids = c.token_ids[: s.max_tokens]
    text, finish = tokenizer.decode(ids, skip_special_tokens=True), "length"
    for stop in s.stop:
        if stop in text:
            text, finish = text[: text.index(stop)], "stop"
    return Completion(text, ids, c.prompt_tokens, len(ids), finish)


class _BatchStreamer:
    """A transformers streamer for a whole batch: after each decoding step, hands each streaming
    row the text it can safely show. Held back: anything past the row's end or budget, a trailing
    incomplete UTF-8 character, and the last characters that could still turn into a stop string,
    so that the streamed text is always a prefix of the final answer."""

    def __init__(self, tokenizer, jobs: list[Job]) -> None:
        self.tokenizer, self.jobs = tokenizer, jobs
        self.ids: list[list[int]] = [[] for _ in jobs]
        self.ended = [False] * len(jobs)
        self.sent = [""] * len(jobs)
        self._prompt_seen = False
        self._end_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        for i, token in enumerate(value.reshape(-1).tolist()):
            job = self.jobs[i]
            if not job.stream or self.ended[i]:
                continue
            if token in self._end_ids:
                self.ended[i] = True
                continue
            self.ids[i].append(token)
            self.ended[i] = len(self.ids[i]) >= job.sampling.max_tokens
            text = self.tokenizer.decode(self.ids[i], skip_special_tokens=True)
            stops = job.sampling.stop
            hits = [text.index(s) for s in stops if s in text]
            if hits:
                text, self.ended[i] = text[: min(hits)], True
            elif stops:
                text = text[: max(0, len(text) - (max(map(len, stops)) - 1))]
            text = text.rstrip("\ufffd")
            if len(text) > len(self.sent[i]) and text.startswith(self.sent[i]):
                job.post("delta", text[len(self.sent[i]) :])
                self.sent[i] = text

    def end(self) -> None:
        pass
