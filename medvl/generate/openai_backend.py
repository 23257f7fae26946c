"""The `openai` generation backend: an LLM behind any OpenAI-compatible endpoint (GPT-4o, a vLLM server,
`medvl serve`) phrases the samples; code decides everything that can be checked.

Per (fact sheet, format, language) the backend
1. plans in code what the sample is about (which box, which instruction kind, how many dialogue turns
   and whether one asks about a verified absent finding, the multiple-choice options, gold and letter);
2. builds one chat request: the system prompt and the format's task (versioned YAML files shipped in
   `medvl/generate/prompts/`), the fact sheet as JSON, the format's JSON schema, and the image as a PNG
   data URL (for a region caption, with the region outlined on a copy; the stored image is never
   touched; text-only Q&A is sent no image);
3. sends it through `medvl.llm.LLMClient` (concurrency limit, retries, on-disk cache);
4. checks the reply: JSON, the format's schema (jsonschema), then `medvl.samples.validate` on the
   assembled sample. A reply that fails gets one repair request (the rejected reply and the reason sent
   back); a second failure is a rejected sample with its reason, never a silently kept one.

Requests are deterministic: the sampling seed sent with each request is drawn from the generator the
pipeline passes (seeded by run seed, record id and format), and the LLMClient caches by the whole
request (endpoint, model, messages with image and prompt text, temperature, max_tokens, seed). So the
cache key covers record, format, language, prompt version, model, parameters and seed, and an identical
re-run sends nothing.

A Chinese sample is a translation of its English original (same plan, so the same English request,
answered by the cache), which keeps option letters, numbers and boxes identical.

The pipeline asks one sample at a time; `prepare` (run by `medvl generate` before the job) answers the
job's requests first in concurrent rounds (`--concurrency` in flight), counts and prices them without
sending anything (`--dry-run`), or writes them as an OpenAI Batch file (`medvl.generate.batch`) for the
Batch API or `vllm run-batch` and reads the results back into the cache (`--batch-out`, `--batch-in`).
"""

from __future__ import annotations

import base64
import copy
import functools
import io
import json
import math
import re
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml
from PIL import Image, ImageDraw

from medvl.errors import InputError
from medvl.generate import template
from medvl.generate.backend import Backend, seeded
from medvl.generate.batch import Request, load_results, write_requests
from medvl.llm import LLMClient, LLMError, Price, Reply, image_data_url
from medvl.prompts import OPTION_LETTERS, build_prompt, format_box, lettered, mc_answer, with_image
from medvl.samples import FORMATS, FactSheet, validate, zh

if TYPE_CHECKING:
    from .pipeline import GenerateStep

NAME = "openai"
LANGUAGES = {"en": "English", "zh": "Simplified Chinese (zh-Hans)"}
# US dollars per million tokens: OpenAI's list prices for its standard API (the Batch API charges half)
# as published in 2025; check them before relying on an estimate. A model not listed gets an unknown
# cost, never 0 (pass `prices` for others).
PRICES: dict[str, Price] = {
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
}
# Statuses after which every further request would fail the same way: stop the job instead of
# rejecting every sample (a wrong key, a wrong model name, a wrong URL).
FATAL_STATUSES = frozenset({401, 403, 404})
REGION_OUTLINE = (255, 0, 0)
_LOADING = threading.Lock()


# ---------------------------------------------------------------- prompt files


@dataclass(frozen=True)
class Prompts:
    """The packaged prompt files: `system` (system prompt and repair message), `translate` (English to
    Chinese) and one per format."""

    system: dict
    translate: dict
    formats: dict[str, dict]

    def version(self, fmt: str, lang: str = "en") -> str:
        """The prompt version a sample records, e.g. "system@1+caption@1" (+ "+translate@1" in Chinese)."""
        v = f"system@{self.system['prompt_version']}+{fmt}@{self.formats[fmt]['prompt_version']}"
        return v if lang == "en" else f"{v}+translate@{self.translate['prompt_version']}"

    @property
    def versions(self) -> str:
        """All files' versions: the backend's `prompt_version`."""
        files = {"system": self.system, "translate": self.translate, **self.formats}
        return "+".join(f"{name}@{spec['prompt_version']}" for name, spec in files.items())


@functools.cache
def load_prompts() -> Prompts:
    folder = resources.files("medvl.generate") / "prompts"

    def read(name: str) -> dict:
        data = yaml.safe_load((folder / f"{name}.yaml").read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not str(data.get("prompt_version", "")).strip():
            raise ValueError(f"prompt file {name}.yaml has no prompt_version")
        return data

    return Prompts(read("system"), read("translate"), {fmt: read(fmt) for fmt in FORMATS})


# ---------------------------------------------------------------- what code decides


@dataclass
class Plan:
    """The code-chosen content of one sample; the LLM only phrases around it."""

    fmt: str
    lang: str
    seed: int  # the sampling seed sent with the request
    box: tuple[str, list[int]] | None = None  # region: (label, 0-1000 box), outlined on the image copy
    kind: str = ""  # instruction: its kind; perception: the kind of item
    names: dict[str, str] = field(default_factory=dict)  # what the task names: {a}, {b}, {box}
    turns: int = 0  # dialogue
    absent: str = ""  # dialogue: the verified absent finding one turn asks about
    options: list[str] = field(default_factory=list)  # perception, in letter order (English)
    answer: str = ""  # perception: the gold letter
    topic: str = ""  # text


def plan(facts: FactSheet, fmt: str, rng: np.random.Generator) -> Plan | None:
    """What the sample will be about, chosen in code from the fact sheet with the template backend's
    rules (which box, the instruction kinds a record supports, turn counts, multiple-choice items), so
    both backends make the same kinds of samples; None when the record cannot support the format. It
    draws the same numbers whatever the language, so a Chinese sample gets its English original's plan."""
    p = Plan(fmt, "en", seed=int(rng.integers(2**31)))
    if fmt == "region":
        if not facts.boxes:
            return None
        label, box = facts.boxes[int(rng.integers(len(facts.boxes)))]
        p.box = (label, list(box))
    elif fmt == "instruction":
        kinds = template.instruction_types(facts)
        p.kind = kinds[int(rng.integers(len(kinds)))]
        if p.kind in ("compare", "locate"):
            picked = template.choose(rng, template.located(facts), 2 if p.kind == "compare" else 1)
            p.names = dict(zip("ab", picked))
    elif fmt == "dialogue":
        low, high = template.DIALOGUE_TURNS
        p.turns = int(rng.integers(low, high + 1))
        if facts.negatives and rng.random() < 0.5:
            p.absent = facts.negatives[int(rng.integers(len(facts.negatives)))]
    elif fmt == "perception":
        items = template.perception_items(facts, rng)
        if not items:
            return None
        p.kind = list(items)[int(rng.integers(len(items)))]
        gold, pool, p.names = items[p.kind]
        options = [gold, *pool[: template.N_OPTIONS - 1]]
        p.options = [options[int(i)] for i in rng.permutation(len(options))]  # uniform gold letter
        p.answer = OPTION_LETTERS[p.options.index(gold)]
    elif fmt == "text":
        topics = list(dict.fromkeys([*facts.labels, facts.modality]))
        p.topic = topics[int(rng.integers(len(topics)))]
    return p


# ---------------------------------------------------------------- the request


def fact_json(facts: FactSheet) -> str:
    """The fact sheet as the writer sees it: what may be said, no ids or hashes."""
    shown = {
        "modality": facts.modality,
        "body_region": facts.body_region,
        "department": facts.department,
        "dataset": facts.source,
        "task": facts.clinical_task or facts.task,
        "present": list(facts.labels),
        "verified_absent": list(facts.negatives),
        "boxes": [{"finding": label, "box": format_box(box)} for label, box in facts.boxes],
        "regions": [
            {
                "finding": r.label,
                "area_share": round(r.area_share, 3),
                "image_quadrant": r.quadrant,  # in the image's frame: the viewer's left and right
                "image_third": r.vertical,
                "patient_side": r.side,
            }
            for r in facts.regions
        ],
        "laterality_convention": facts.convention,
    }
    return json.dumps(shown, ensure_ascii=False)


def schema_for(p: Plan) -> dict:
    schema = json.loads(json.dumps(load_prompts().formats[p.fmt]["schema"]))  # a deep copy
    if p.fmt == "dialogue":
        schema["properties"]["turns"].update(minItems=p.turns, maxItems=p.turns)
    return schema


def task_text(p: Plan) -> str:
    spec = load_prompts().formats[p.fmt]
    if p.fmt == "region":
        assert p.box is not None
        return spec["task"].format(box=format_box(p.box[1]), label=p.box[0])
    if p.fmt == "instruction":
        return spec["task"].format(kind=p.kind, kind_text=spec["kinds"][p.kind].format(**p.names))
    if p.fmt == "dialogue":
        absent = spec["absent_turn"].format(absent=p.absent) if p.absent else spec["no_absent_turn"]
        return spec["task"].format(turns=p.turns, absent=absent)
    if p.fmt == "perception":
        shown = lettered(option_texts(p))
        return spec["task"].format(
            target=spec["targets"][template.base_kind(p.kind)].format(**p.names),
            options="; ".join(f"{k}. {v}" for k, v in shown.items()),
            gold=shown[p.answer],
        )
    if p.fmt == "text":
        return spec["task"].format(topic=p.topic)
    return spec["task"]


def option_texts(p: Plan) -> list[str]:
    """The options as the sample shows them, in its language."""
    return [template.option_text(template.base_kind(p.kind), o, p.lang) for o in p.options]


def outlined(image: Image.Image, box: Sequence[int]) -> Image.Image:
    """A copy of `image` with a 0-1000 box outlined in red: what the writer sees for a region caption.
    The original is not modified (the training image has no outline)."""
    copy = image.convert("RGB")  # always a new image, even from RGB
    w, h = copy.size
    x0, y0, x1, y1 = (round(v * (w if i % 2 == 0 else h) / 1000) for i, v in enumerate(box))
    width = max(2, round(min(w, h) / 150))
    ImageDraw.Draw(copy).rectangle(
        [x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=REGION_OUTLINE, width=width
    )
    return copy


def messages(facts: FactSheet, p: Plan, image_url: str | None) -> list[dict]:
    """The request's messages: the system prompt, then the image (a data URL; none for text-only Q&A),
    the fact sheet and the task."""
    prompts = load_prompts()
    system = prompts.system["system"].format(
        language=LANGUAGES[p.lang], schema=json.dumps(schema_for(p), separators=(",", ":"))
    )
    text = f"Fact sheet:\n{fact_json(facts)}\n\n{task_text(p)}"
    if image_url is None:
        content: str | list[dict] = text
    else:
        content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}]
    return [{"role": "system", "content": system}, {"role": "user", "content": content}]


# ---------------------------------------------------------------- the reply


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


def parse_reply(text: str, schema: dict) -> tuple[dict | None, str]:
    """(the reply's JSON object, "") or (None, why it is unusable), the reason on one line."""
    import jsonschema

    fenced = _FENCE.match(text)
    try:
        data = json.loads(fenced.group(1) if fenced else text)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg} at character {e.pos})"
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(data))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "the object"
        return None, f"does not match the schema at {where}: {' '.join(error.message.split())[:200]}"
    return data, ""


def assemble(p: Plan, data: dict, image: str | None) -> dict:
    """The LLaVA sample from the writer's JSON and the plan."""
    if p.fmt == "dialogue":
        pairs = [(t["question"], t["answer"]) for t in data["turns"]]
    elif p.fmt == "perception":
        options = lettered(option_texts(p))
        pairs = [(build_prompt(data["question"], options), mc_answer(p.answer, options[p.answer]))]
    else:
        pairs = [(data["question"], data["answer"])]
    conversations = []
    for i, (question, answer) in enumerate(pairs):
        question = question.strip()
        if i == 0 and p.fmt != "text":
            question = with_image(question)
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer.strip()}]
    sample: dict = {"conversations": conversations, "format": p.fmt, "lang": p.lang}
    if p.fmt != "text" and image is not None:
        sample["image"] = image
    if p.fmt == "perception":
        sample["options"], sample["answer"], sample["kind"] = list(options.values()), p.answer, p.kind
    if p.fmt == "region":
        assert p.box is not None
        sample["box"] = list(p.box[1])
    return sample


# ---------------------------------------------------------------- the backend


class Unanswered(Exception):
    """A request the cache cannot answer while sending is off (dry run, batch file)."""

    def __init__(self, request: Request) -> None:
        super().__init__(request.key)
        self.request = request


@dataclass(frozen=True)
class Estimate:
    """What sending the pending requests would take: counts, estimated tokens and cost."""

    model: str
    requests: int  # requests that can be sent now
    translations: int  # Chinese translations that follow once their English answers are in
    prompt_tokens: int  # both kinds together
    completion_tokens: int
    cost: float | None  # US dollars; None: no price known for the model

    def summary(self) -> str:
        cost = f"${self.cost:.4f}" if self.cost is not None else f"unknown (no price for {self.model!r})"
        later = f" + {self.translations} translations after them" if self.translations else ""
        return (
            f"{self.requests} requests{later} to {self.model}: about {self.prompt_tokens} prompt + "
            f"{self.completion_tokens} completion tokens, estimated cost {cost}; a reply that fails its "
            "checks adds one repair request"
        )


def estimate_tokens(request: Request) -> tuple[int, int]:
    """(prompt, completion) tokens, estimated without a tokenizer: text at 4 characters a token
    (OpenAI's rule of thumb for English; Chinese text is nearer 1 a character, counted so), an image
    as GPT-4o counts it (85 + 170 per 512-pixel tile after fitting into 2048 and a 768 shortest side),
    the completion as the format's typical reply (`completion_tokens` in its prompt file)."""
    prompt = 0
    for message in request.body["messages"]:
        parts = (
            message["content"]
            if isinstance(message["content"], list)
            else [{"type": "text", "text": message["content"]}]
        )
        for part in parts:
            if part["type"] == "text":
                text = part["text"]
                cjk = sum(1 for c in text if "\u4e00" <= c <= "\u9fff")
                prompt += cjk + math.ceil((len(text) - cjk) / 4)
            else:
                prompt += _image_tokens(part["image_url"]["url"])
    return prompt, int(load_prompts().formats[request.fmt]["completion_tokens"])


def estimate_translation(fmt: str) -> tuple[int, int]:
    """(prompt, completion) tokens of a translation not yet built: the translate prompt and the English
    reply in, the Chinese reply out (GPT-4o's tokenizer spends about 1.5 times the English reply's
    tokens on its Chinese version)."""
    english = int(load_prompts().formats[fmt]["completion_tokens"])
    system = len(load_prompts().translate["system"]) // 4 + 150  # + the schema and the glossary
    return system + english, math.ceil(1.5 * english)


def _image_tokens(url: str) -> int:
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
        w, h = im.size
    scale = min(1.0, 2048 / max(w, h))
    w, h = w * scale, h * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)


class OpenAIBackend(Backend):
    """Samples phrased by a model behind an OpenAI-compatible endpoint (see the module docstring).

    `cache_dir` holds every answer (a re-run sends nothing already answered, and a Chinese sample finds
    its English original's answer there); `concurrency` is the most requests in flight (`write_many`);
    `temperature` and `max_tokens` (a cap on each format's own limit) are sent with every request, with
    a seed drawn per sample. `write` reads the image from `image_root/images/<sha256>.png` (where the
    pipeline stores it) when it is not given one."""

    name = NAME

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = None,
        api_key: str | None = None,
        cache_dir: str | Path,
        concurrency: int = 8,
        image_root: str | Path | None = None,
        temperature: float = 0.7,
        max_tokens: int | None = None,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        prices: Mapping[str, Price] | None = None,
    ) -> None:
        self.model = model
        self.prompt_version = load_prompts().versions
        self.temperature, self.max_tokens = temperature, max_tokens
        self.image_root = Path(image_root) if image_root is not None else None
        self._client_args = {
            "base_url": base_url,
            "api_key": api_key,
            "api_key_env": api_key_env,
            "max_concurrency": concurrency,
            "max_retries": max_retries,
            "timeout": timeout,
            "backoff": backoff,
            "cache_dir": cache_dir,
            "prices": {**PRICES, **(prices or {})},
        }
        self._llm: LLMClient | None = None
        # While not None, `write` sends nothing: it notes (record id, format, language, request) of each
        # request the cache cannot answer and returns no sample (see `pending`).
        self._pending: list[tuple[str, str, str, Request]] | None = None
        self._looked_up: set[str] | None = None  # while not None: every key looked for in the cache

    def setup(self) -> None:
        """The client is built once per worker process (it holds threads' locks and a connection pool,
        which do not travel to worker processes)."""
        if self._llm is None:
            self._llm = LLMClient(**self._client_args)

    @property
    def llm(self) -> LLMClient:
        self.setup()
        assert self._llm is not None
        return self._llm

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_llm": None}

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()

    def config(self) -> dict:
        """Everything about the backend that changes its output (part of the job's fingerprint)."""
        return {
            **super().config(),
            "base_url": self._client_args["base_url"],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

    # ---- writing

    def write(
        self, facts: FactSheet, fmt: str, lang: str, rng: Any, image: Image.Image | None = None
    ) -> list[dict]:
        """The sample(s) for one (fact sheet, format, language): [] when the record cannot support the
        format; otherwise one sample, which on failure carries `error` (why) and `reply` (the last
        answer) and fails `medvl.samples.validate` with the reason "schema" (unusable JSON, no answer)
        or the validator's own reason."""
        if self._pending is None:
            return self._write(facts, fmt, lang, rng, image, send=True)
        try:
            return self._write(facts, fmt, lang, rng, image, send=False)
        except Unanswered as e:
            self._pending.append((facts.record_id, fmt, lang, e.request))
            return []

    def write_many(self, jobs: Sequence[tuple]) -> list[list[dict]]:
        """`write` for many (facts, fmt, lang, rng[, image]) at once, `concurrency` in flight, in order.
        Each job draws from its own generator, so the result does not depend on thread timing."""
        from concurrent.futures import ThreadPoolExecutor

        if not jobs:
            return []
        with ThreadPoolExecutor(min(self.llm.max_concurrency, len(jobs))) as pool:
            return list(pool.map(lambda job: self.write(*job), jobs))

    def requests(
        self, facts: FactSheet, fmt: str, lang: str, rng: Any, image: Image.Image | None = None
    ) -> list[Request]:
        """The requests `write` would send now for this sample, sending nothing: [] when the cache
        answers it already (or the record cannot support the format). After answers were read back
        from a batch file, these are the repair requests still owed."""
        try:
            self._write(facts, fmt, lang, rng, image, send=False)
        except Unanswered as pending:
            return [pending.request]
        return []

    # ---- whole jobs: dry run, batch files, concurrent rounds

    def pending(self, step: GenerateStep, items: Sequence[dict]) -> tuple[list[Request], list[str]]:
        """The requests a generation job over `items` would send now (each once), found by running the
        job's own step with sending off, so they are exactly the requests of the real run; and the
        formats of the Chinese translations that will follow once their English answers are in. Bad
        records are skipped here (the real run quarantines them)."""
        requests, translations, _ = self._scan(step, items)
        return requests, translations

    def _scan(self, step: GenerateStep, items: Sequence[dict]) -> tuple[list[Request], list[str], list[dict]]:
        """`pending`, and the items that wait on a request (the others are answered in full)."""
        self._pending, translations, waiting = [], [], []
        try:
            for item in items:
                start = len(self._pending)
                try:
                    for _ in step(item):
                        pass
                except InputError:
                    continue
                if len(self._pending) > start:
                    waiting.append(item)
                for rid, fmt, lang, _ in self._pending[start:]:
                    # An English sample still waiting: its translation follows, if the step's own rule
                    # gives this (record, format) a Chinese sample too.
                    if lang == "en" and seeded(step.seed, rid, fmt, "zh").random() < step.zh_share:
                        translations.append(fmt)
            found = list({r.key: r for *_, r in self._pending}.values())
        finally:
            self._pending = None
        return found, translations, waiting

    def asks_any(self, step: GenerateStep, items: Sequence[dict], keys: set[str]) -> bool:
        """Whether the job asks (now) any of the requests `keys`: run with sending off, record by
        record, stopping at the first that does."""
        self._pending, self._looked_up = [], set()
        try:
            for item in items:
                self._pending.clear()
                try:
                    for _ in step(item):
                        pass
                except InputError:
                    continue
                if self._looked_up & keys:
                    return True
                self._looked_up.clear()
            return False
        finally:
            self._pending = self._looked_up = None

    def send(self, requests: Sequence[Request]) -> int:
        """Send requests (`concurrency` in flight) so that their answers are in the cache; returns how
        many were answered. A request that fails for good is left unanswered: the job's own `write`
        asks it again and rejects the sample with the reason (an error that would fail every request,
        such as a wrong key, is raised)."""
        from concurrent.futures import ThreadPoolExecutor

        def one(r: Request) -> bool:
            body = dict(r.body)
            model, conversation = body.pop("model"), body.pop("messages")
            try:
                self.llm.complete(model, conversation, **body)
                return True
            except LLMError as e:
                if e.status in FATAL_STATUSES:
                    raise
                return False

        if not requests:
            return 0
        with ThreadPoolExecutor(min(self.llm.max_concurrency, len(requests))) as pool:
            return sum(pool.map(one, requests))

    def prefetch(self, step: GenerateStep, items: Sequence[dict], chunk: int = 256) -> None:
        """Answer a job's requests before it runs, in rounds of concurrent requests (first answers, then
        repairs and translations, then their repairs), `chunk` records at a time; the job then builds
        its samples from the cache. The pipeline asks one sample at a time, so without this a worker
        would have one request in flight, whatever `concurrency` says."""
        for start in range(0, len(items), chunk):
            part = items[start : start + chunk]
            for _ in range(4):  # answer, repair/translation, repair of the translation; + one spare
                # A record answered in full stays so: the next round looks again only at the others.
                requests, _, part = self._scan(step, part)
                if not requests or not self.send(requests):
                    break

    def estimate(self, requests: Sequence[Request], translations: Sequence[str] = ()) -> Estimate:
        """Tokens and cost of sending `requests` (each key once) and the translations (their formats)
        that follow them; the cost from the client's price table, unknown (None) for a model without
        a price, never 0."""
        unique = list({r.key: r for r in requests}.values())
        counts = [estimate_tokens(r) for r in unique] + [estimate_translation(f) for f in translations]
        prompt, completion = sum(c[0] for c in counts), sum(c[1] for c in counts)
        price = self.llm.prices.get(self.model)
        cost = (prompt * price.input + completion * price.output) / 1e6 if price is not None else None
        return Estimate(self.model, len(unique), len(translations), prompt, completion, cost)

    # ---- internals

    def _image_url(self, facts: FactSheet, image: Image.Image | None, box: Sequence[int] | None) -> str:
        """The image as a data URL, with `box` outlined on a copy. The stored PNG is sent as it is:
        encoding it again would give the same pixels at a cost (0.26 s an image on SLAKE's scans, 83% of
        a dry run's time, measured)."""
        if image is None:
            if self.image_root is None:
                raise ValueError("OpenAIBackend needs the image: pass it to write() or set image_root")
            path = self.image_root / self._image_path(facts)
            if box is None:
                return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
            with Image.open(path) as stored:
                return image_data_url(outlined(stored, box))
        with _LOADING:  # a lazily opened image decodes on first use, which is not thread-safe
            image.load()
        return image_data_url(outlined(image, box) if box is not None else image)

    @staticmethod
    def _image_path(facts: FactSheet) -> str:
        return f"images/{facts.image_sha256}.png"

    def _params(self, p: Plan) -> dict:
        # A Chinese translation may take up to twice the English reply's tokens.
        limit = int(load_prompts().formats[p.fmt]["max_tokens"]) * (2 if p.lang == "zh" else 1)
        return {
            "temperature": self.temperature,
            "max_tokens": min(limit, self.max_tokens) if self.max_tokens else limit,
            "seed": p.seed,
        }

    def _ask(self, conversation: list[dict], params: dict, fmt: str, send: bool) -> Reply:
        if not send:
            key = self.llm.cache_key(self.model, conversation, params)
            if self._looked_up is not None:
                self._looked_up.add(key)
            if self.llm._read_cache(key) is None:
                body = {"model": self.model, "messages": conversation, **params}
                raise Unanswered(Request(key, body, fmt))
        return self.llm.complete(self.model, conversation, **params)

    def _write(
        self, facts: FactSheet, fmt: str, lang: str, rng: Any, image: Image.Image | None, send: bool
    ) -> list[dict]:
        if fmt not in FORMATS or lang not in LANGUAGES:
            raise ValueError(f"unknown format {fmt!r} or language {lang!r}")
        p = plan(facts, fmt, rng)
        if p is None:
            return []
        english, data = self._english(facts, p, image, send)
        if lang == "en":
            return [english]
        # The Chinese sample translates the English one (same plan, same request, so answered by the
        # cache when the English sample was written first).
        p = replace(p, lang="zh")
        if data is None:
            failed = {"conversations": [], "format": fmt, "lang": "zh"}
            return [self._failed(failed, facts, p, f"the English original failed: {english['error']}", "")]
        return [self._chinese(facts, p, english, data, send)]

    def _english(
        self, facts: FactSheet, p: Plan, image: Image.Image | None, send: bool
    ) -> tuple[dict, dict | None]:
        url = None if p.fmt == "text" else self._image_url(facts, image, p.box[1] if p.box else None)
        conversation = messages(facts, p, url)
        path = None if p.fmt == "text" else self._image_path(facts)

        def build(data: dict) -> tuple[dict, list[str]]:
            sample = self._finish(assemble(p, data, path), facts, p)
            return sample, validate(sample, facts)

        return self._attempts(conversation, schema_for(p), build, facts, p, send)

    def _chinese(self, facts: FactSheet, p: Plan, english: dict, data: dict, send: bool) -> dict:
        spec = load_prompts().translate
        schema = schema_for(p)
        terms = dict.fromkeys([*facts.labels, *facts.negatives, facts.modality, facts.body_region])
        glossary = "; ".join(f"{t}: {zh(t)}" for t in terms if t and zh(t) != t)
        conversation = [
            {
                "role": "system",
                "content": spec["system"].format(schema=json.dumps(schema, separators=(",", ":"))),
            },
            {
                "role": "user",
                "content": spec["task"].format(
                    glossary=glossary or "-", source=json.dumps(data, ensure_ascii=False, indent=1)
                ),
            },
        ]

        def build(translated: dict) -> tuple[dict, list[str]]:
            sample = self._finish(assemble(p, translated, english.get("image")), facts, p)
            sample["pair_id"] = english["id"]
            return sample, validate(sample, facts, english)

        sample, _ = self._attempts(conversation, schema, build, facts, p, send)
        return sample

    def _attempts(
        self,
        conversation: list[dict],
        schema: dict,
        build: Callable[[dict], tuple[dict, list[str]]],
        facts: FactSheet,
        p: Plan,
        send: bool,
    ) -> tuple[dict, dict | None]:
        """Ask, check, and on failure ask once more with the reason: (the sample, the writer's JSON), or
        (the failed sample carrying `error` and `reply`, None)."""
        params = self._params(p)
        error, text, sample = "", "", None
        for attempt in range(2):  # the answer, then one repair
            sample = None
            if attempt:
                repair = load_prompts().system["repair"].format(error=error)
                conversation = conversation + [
                    {"role": "assistant", "content": text},
                    {"role": "user", "content": repair},
                ]
            try:
                reply = self._ask(conversation, params, p.fmt, send)
            except LLMError as e:
                if e.status in FATAL_STATUSES:
                    raise
                # No answer after the client's retries (time-outs, 5xx, 429): rejected with the
                # reason, and not cached, so a re-run asks again.
                error, text = f"no answer: {e}", ""
                break
            text = reply.text
            message = (reply.response.get("choices") or [{}])[0].get("message") or {}
            if message.get("refusal"):
                error = f"the model refused ({' '.join(str(message['refusal']).split())[:200]})"
                continue
            if reply.finish_reason == "length":
                error = f"the reply was cut off at max_tokens={params['max_tokens']}"
                continue
            data, error = parse_reply(text, schema)
            if data is None:
                continue
            sample, reasons = build(data)
            if not reasons:
                return sample, data
            checks = load_prompts().system["checks"]
            error = "it failed these checks: " + "; ".join(f"{r} ({checks.get(r, r)})" for r in reasons)
        failed = sample or {"conversations": [], "format": p.fmt, "lang": p.lang}
        return self._failed(failed, facts, p, error, text), None

    def _failed(self, sample: dict, facts: FactSheet, p: Plan, error: str, reply: str) -> dict:
        """A rejected sample: `medvl.samples.validate` fails it ("schema" when it has no conversation),
        and `error` says why in full."""
        return {**self._finish(sample, facts, p), "error": error, "reply": reply}

    def _finish(self, sample: dict, facts: FactSheet, p: Plan) -> dict:
        sample["id"] = f"{facts.record_id}#{p.fmt}-{p.lang}"
        sample["provenance"] = {
            "record_id": facts.record_id,
            "source": facts.source,
            "split": facts.split,
            "format": p.fmt,
            "lang": p.lang,
            "prompt_version": load_prompts().version(p.fmt, p.lang),
            "backend": self.name,
            "model": self.model,
            "seed": p.seed,
        }
        sample["facts"] = facts.to_json()
        return sample


def prepare(
    backend: OpenAIBackend,
    step: GenerateStep,
    items: Sequence[dict],
    *,
    dry_run: bool = False,
    batch_in: Path | None = None,
    batch_out: Path | None = None,
    echo: Callable[[str], None] = print,
) -> bool:
    """What `medvl generate --backend openai` does before (or instead of) the job: read a batch results
    file into the cache; then either print the dry run's counts and cost (writing nothing to the output
    folder), or write the requests still unanswered as a batch input file (the images go to the output
    folder, where the run that reads the results needs them), both sending nothing, after which the
    command stops (returns True); or answer every request in concurrent rounds so that the job runs
    from the cache (returns False)."""
    if batch_in is not None:
        loaded = load_results(batch_in, backend.llm)
        failed = f"; {len(loaded.failed)} failed and stay unanswered" if loaded.failed else ""
        echo(f"{batch_in}: {len(loaded.answered)} answers read into the cache{failed}")
        if loaded.answered and not backend.asks_any(step, items, loaded.answered):
            # Sending the job online now would pay again for every answer in the file.
            raise InputError(
                str(batch_in),
                "custom_id",
                "none of its answers is a request of this job (written with another --base-url, "
                "--model, --seed, format list or prompt version?)",
            )
    if dry_run and batch_out is None:
        # Requests carry the images, which the step writes where the backend reads them: a dry run
        # does both in a temporary folder and leaves the output folder as it was.
        with tempfile.TemporaryDirectory() as tmp:
            shadow = copy.copy(step)  # the same job, writing its images into the temporary folder
            shadow.images = Path(tmp) / "images"
            root, backend.image_root = backend.image_root, Path(tmp)
            try:
                echo(backend.estimate(*backend.pending(shadow, items)).summary())
            finally:
                backend.image_root = root
        return True
    if dry_run or batch_out is not None:
        requests, translations = backend.pending(step, items)
        if batch_out is not None:
            n = write_requests(batch_out, requests)
            echo(f"{batch_out}: {n} requests (OpenAI Batch API / vllm run-batch input); nothing sent")
        echo(backend.estimate(requests, translations).summary())
        return True
    backend.prefetch(step, items)
    return False
