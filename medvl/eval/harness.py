"""Run a model over a benchmark and score it: `evaluate` for a model, `rescore` for a prediction file.

The questions are answered as a job on :mod:`medvl.jobs`: fixed chunks of `chunk` questions (the unit of
work a worker takes and of a commit) in benchmark order, sharded across `workers` processes
(`engine="local"`) or Ray actors (`engine="ray"`), committed to `<out>/jobs/<variant>/` as they finish.
A run killed at any point (kill -9 included) and started again with the same arguments continues
after the last committed chunk and writes the same files, byte for byte, as a run never stopped:
chunks and the local model's batches inside them are cut by the same rule every time. When the job
is done, its rows are written in benchmark order to `<out>/predictions.jsonl`, the file the scores
are computed from. The image-dependence check writes `predictions.blank.jsonl` (every image replaced
by a black one of the same size) and `predictions.shuffled.jsonl` (each question shown another
question's image) beside it.

API models ask through :class:`medvl.llm.LLMClient` with at most `max_concurrency` requests in flight
per worker, retries, and an on-disk cache (`<out>/llm-cache` unless the APIModel names its own): a
re-run, even of a chunk that was never committed, sends nothing already answered.
"""

from __future__ import annotations

import json
import os
import random
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import medvl
from medvl.eval.baselines import build_prior
from medvl.eval.benchmarks import (
    DEFAULT_TOKENS_PER_IMAGE,
    BenchmarkError,
    Item,
    default_train_split,
    load_benchmark,
    volume_images,
)
from medvl.eval.report import PRIMARY_BREAKDOWN, build_report, write_report
from medvl.eval.scoring import judge_unresolved, read_predictions
from medvl.imaging import DEFAULT_PREPROCESSING, Preprocessing
from medvl.jobs import ENGINES, Step, run
from medvl.llm import LLMClient, LLMError, image_data_url
from medvl.prompts import MC_INSTRUCTION, SHORT_INSTRUCTION

VARIANTS = ("blank", "shuffled")
DEFAULT_MAX_NEW_TOKENS = 32  # answers are a letter, a word or a phrase
# Questions per job item: a worker's unit of work and of a commit. A killed run redoes at most one
# chunk per worker (an API model's answers to it come from the cache); 64 keeps a benchmark of 100k
# questions at ~1,600 committed parts.
DEFAULT_CHUNK = 64
PRIOR_FILE = "prior.json"


class Answerer(Protocol):
    name: str
    image_size: int | None  # images are read at this size (medvl.imaging.read_image), None: as they are
    # Image tokens of one slab: with the volume budget, how many slabs a volume is shown as (an answerer
    # without it: DEFAULT_TOKENS_PER_IMAGE).
    tokens_per_image: int

    def answer(self, prompts: list[tuple[str, list[Image.Image]]], max_new_tokens: int) -> list[str]: ...


class LocalModel:
    """A medvl model folder (or a loaded VLM), batched greedy decoding through medvl's `generate`."""

    def __init__(self, vlm, name: str) -> None:
        self.vlm, self.name = vlm, name
        self.image_size = vlm.model.config.vision_config.image_size  # as in training
        self.tokens_per_image = vlm.model.config.image_seq_length
        from medvl.model.build import native_frames

        self.frames = native_frames(vlm.model.config)  # None: volumes as K slabs of a 2D tower
        self.volumes = vlm.volumes  # scans as the model reads them: its training volumes' spec and budget
        self.preprocessing = vlm.preprocessing  # DICOM files are read as the checkpoint says

    def answer(self, prompts: list[tuple[str, list[Image.Image]]], max_new_tokens: int) -> list[str]:
        from medvl.model.decode import Conversation, generate

        conversations = [
            Conversation(
                [
                    {
                        "role": "user",
                        "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": text}],
                    }
                ],
                images,
            )
            for text, images in prompts
        ]
        return [c.text for c in generate(self.vlm, conversations, max_new_tokens=max_new_tokens)]


class APIModel:
    """A model behind an OpenAI-compatible chat endpoint (OpenAI, vLLM, `medvl serve`), asked at
    temperature 0 with images as base64 `data:` URLs; a batch is sent as concurrent requests through
    :class:`medvl.llm.LLMClient` (retries, concurrency limit, optional cache and cost: `client_options`
    go to it; `self.client.usage` holds the totals). The key is `api_key`, else $OPENAI_API_KEY."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, **client_options) -> None:
        client_options.setdefault("api_key_env", "OPENAI_API_KEY")
        self.client = LLMClient(base_url, api_key=api_key, **client_options)
        self.model, self.name = model, f"{model} @ {base_url}"
        self.image_size = None  # the server reads the images it is sent at its model's size
        self.tokens_per_image = DEFAULT_TOKENS_PER_IMAGE  # unknown here: a volume is sent as 7 slabs of 32
        self._args = (base_url, model, api_key, client_options)

    def with_options(self, **client_options) -> APIModel:
        """The same model with these client options changed (e.g. `cache_dir`)."""
        base_url, model, api_key, options = self._args
        return APIModel(base_url, model, api_key, **(options | client_options))

    # Worker processes get the settings and build their own client (threads and sockets do not travel).
    def __getstate__(self) -> tuple:
        return self._args

    def __setstate__(self, state: tuple) -> None:
        base_url, model, api_key, options = state
        self.__init__(base_url, model, api_key, **options)

    def answer(self, prompts: list[tuple[str, list[Image.Image]]], max_new_tokens: int) -> list[str]:
        conversations = []
        for text, images in prompts:
            content = [{"type": "image_url", "image_url": {"url": image_data_url(im)}} for im in images]
            content.append({"type": "text", "text": text})
            conversations.append([{"role": "user", "content": content}])
        replies = self.client.complete_many(
            self.model, conversations, temperature=0, max_tokens=max_new_tokens
        )
        return [r.text for r in replies]


def model_name(model) -> str:
    """The name a run records for `model`, without loading it."""
    if isinstance(model, (str, Path)):
        return Path(model).name
    if hasattr(model, "model") and hasattr(model, "processor"):
        return type(model.model).__name__
    return model.name


def as_answerer(model) -> Answerer:
    """A folder path, a loaded VLM (anything with `.model` and `.processor`), or an Answerer."""
    if isinstance(model, (str, Path)):
        from medvl.model.build import load

        return LocalModel(load(model), Path(model).name)
    if hasattr(model, "model") and hasattr(model, "processor"):
        return LocalModel(model, type(model.model).__name__)
    if hasattr(model, "answer"):
        return model
    raise TypeError(f"model must be a folder, a VLM or an Answerer, not {type(model).__name__}")


def answerer_volumes(answerer, volume_tokens: int | None = None):
    """How `answerer` reads a volume question (`medvl.model.build.VolumePreprocessing`): a local model's
    own (`vlm.volumes`), the default specs and budget for others; `volume_tokens` replaces the budget."""
    from medvl.model.build import VolumePreprocessing

    return (getattr(answerer, "volumes", None) or VolumePreprocessing()).with_tokens(volume_tokens)


def volume_budget(model, volume_tokens: int | None = None) -> int:
    """The image tokens a volume question's slabs take for `model` (a folder, a VLM or an Answerer):
    `volume_tokens`, else the model's own (a folder's `volumes.json`)."""
    if volume_tokens is None and isinstance(model, (str, Path)):
        from medvl.model.build import load_volumes

        return load_volumes(model).volume_tokens
    return answerer_volumes(model, volume_tokens).volume_tokens


def _image_source(n: int, variant: str) -> list[int]:
    """For each of `n` questions, the index of the question whose images it is shown: its own, or for
    "shuffled" another one (a rotation of a seeded shuffle, so nobody keeps their own when there are
    two or more). Drawn over the whole benchmark, so `limit` does not change who sees what."""
    if variant != "shuffled":
        return list(range(n))
    order = list(range(n))
    random.Random(0).shuffle(order)
    source = {order[i]: order[(i + 1) % n] for i in range(n)}
    return [source[i] for i in range(n)]


def _images(
    item: Item,
    variant: str,
    size: int | None,
    preprocessing: Preprocessing = DEFAULT_PREPROCESSING,
    tokens_per_image: int = DEFAULT_TOKENS_PER_IMAGE,
    volumes=None,
    frames: int | None = None,
) -> list:
    """A question's model inputs: its images, or its volume's slabs (one input of `frames` slabs for a
    native-route model); all black for the "blank" variant."""
    if item.volume is not None:
        images = volume_images(item.volume, tokens_per_image, volumes, frames)
    else:
        images = item.load_images(size, preprocessing)
    if variant == "blank":
        images = [Image.new("RGB", im.size) for im in images]
    return [images] if frames and item.volume is not None else images


def _prediction_row(item: Item, bench: str, variant: str, text: str) -> dict:
    return {
        "id": item.id,
        "bench": bench,
        "variant": variant,
        "kind": item.kind,
        "question": item.question,
        "options": item.options,
        "answer": item.answer,
        "groups": item.groups,
        "prediction": text,
    }


class AnswerStep(Step):
    """One chunk of questions -> one prediction row each (a JSON line, as `predictions.jsonl` holds
    it). The model is built once per worker (`setup`); a local model decodes the chunk `batch_size`
    questions at a time, an API model sends it at its client's concurrency."""

    name = "eval-answers"

    def __init__(
        self,
        model,
        bench: str,
        variant: str,
        batch_size: int,
        max_new_tokens: int,
        config: dict,
        workers: int,
        volume_tokens: int | None = None,
    ) -> None:
        self.model, self.bench, self.variant = model, bench, variant
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self._config, self.workers, self.volume_tokens = config, workers, volume_tokens
        self.answerer: Answerer | None = None

    def schema(self):
        import pyarrow as pa

        return pa.schema([("id", pa.string()), ("row", pa.string())])

    def config(self) -> dict:
        return self._config

    def setup(self) -> None:
        if self.workers > 1 and isinstance(self.model, (str, Path)):
            import torch

            # Local models in several processes share the cores instead of each taking all of them.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.workers))
        self.answerer = as_answerer(self.model)

    def __call__(self, chunk: dict):
        answerer = self.answerer
        assert answerer is not None
        preprocessing = getattr(answerer, "preprocessing", DEFAULT_PREPROCESSING)
        slab_tokens = getattr(answerer, "tokens_per_image", DEFAULT_TOKENS_PER_IMAGE)
        frames = getattr(answerer, "frames", None)  # a native-route model: a volume is one input
        pairs: list[tuple[Item, Item]] = chunk["questions"]  # (question, item whose images it is shown)
        # Only a chunk with volumes needs them (reading them imports medvl.model, i.e. torch).
        volumes = answerer_volumes(answerer, self.volume_tokens) if any(s.volume for _, s in pairs) else None
        step = len(pairs) if isinstance(answerer, APIModel) else self.batch_size
        for start in range(0, len(pairs), step):
            batch = pairs[start : start + step]
            size = answerer.image_size
            prompts = [
                (q.prompt(), _images(src, self.variant, size, preprocessing, slab_tokens, volumes, frames))
                for q, src in batch
            ]
            texts = answerer.answer(prompts, self.max_new_tokens)
            for (q, _), text in zip(batch, texts, strict=True):
                row = _prediction_row(q, self.bench, self.variant, text)
                yield {"id": q.id, "row": json.dumps(row, ensure_ascii=False)}


def predict(
    model,
    items: list[Item],
    path: Path,
    *,
    bench: str,
    config: dict,
    variant: str = "image",
    limit: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    chunk: int = DEFAULT_CHUNK,
    workers: int = 1,
    engine: str = "local",
    progress: bool = True,
    volume_tokens: int | None = None,
) -> list[dict]:
    """Answer the first `limit` of `items` (all by default) as a resumable job in
    `<path's folder>/jobs/<variant>/`, write their rows in order to `path`, and return them.

    `items` is the whole benchmark: chunks are cut over it, so a run with a larger `limit` (or none)
    continues a smaller one. `config` (JSON-able: the model, benchmark and settings) is the job's
    fingerprint with the chunk size and decoding added; a folder made under another one is refused.
    A question about a volume is shown its slabs, as many as `volume_tokens` pay for (None: the model's
    own budget)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; one of {', '.join(ENGINES)}")
    if chunk < 1 or workers < 1:
        raise ValueError("chunk and workers must be at least 1")
    path = Path(path)
    wanted = items[:limit]
    source = _image_source(len(items), variant)
    chunks = [
        {
            "id": f"{start // chunk:06d}",
            "questions": [(items[i], items[source[i]]) for i in range(start, min(start + chunk, len(items)))],
        }
        for start in range(0, len(wanted), chunk)
    ]
    # The chunk size names the job's items, so it is part of the fingerprint; the batch size is not
    # (a re-run with another one keeps what is committed and batches the rest its own way).
    fingerprint = config | {"chunk": chunk, "variant": variant, "max_new_tokens": max_new_tokens}
    if any(it.volume is not None for it in items):  # the budget sets what a volume question is shown
        fingerprint["volume_tokens"] = volume_tokens
    step = AnswerStep(model, bench, variant, batch_size, max_new_tokens, fingerprint, workers, volume_tokens)
    label = TextColumn(f"{bench} ({variant}, chunks of {chunk})")
    columns = (label, BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    job = path.parent / "jobs" / variant
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("", total=None)
        try:
            summary = run(
                step,
                chunks,
                job,
                workers=workers,
                engine=engine,
                part_rows=1,  # every chunk is committed as it finishes
                on_progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
        except RuntimeError as e:
            # The runner names the chunk; an endpoint's own error (in this process) says more.
            if isinstance(e.__cause__, LLMError):
                raise e.__cause__ from None
            raise
    if summary["quarantined"]:
        bad = (job / "quarantine.jsonl").read_text(encoding="utf-8").splitlines()[0]
        raise BenchmarkError(f"{job}: {summary['quarantined']} chunk(s) could not be read, e.g. {bad}")
    import pyarrow.parquet as pq

    rows: dict[str, str] = {}
    for part in summary["data"]:
        for r in pq.read_table(job / part).to_pylist():
            rows[r["id"]] = r["row"]
    lines = [rows[it.id] for it in wanted]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)
    return [json.loads(line) for line in lines]


def prediction_path(out: Path, variant: str = "image") -> Path:
    return out / ("predictions.jsonl" if variant == "image" else f"predictions.{variant}.jsonl")


def prepare_model(model, out: Path, workers: int):
    """The model as the job gets it: an API model with a cache in `out/llm-cache` unless it has one;
    with one worker, anything loaded once here (the job then runs in this process)."""
    if isinstance(model, APIModel) and model.client.cache_dir is None:
        model = model.with_options(cache_dir=Path(out) / "llm-cache")
    return as_answerer(model) if workers == 1 else model


def load_prior(
    bench: str, data: Path, split: str, lang: str, train_split: Path | None, items: list[Item]
) -> dict | None:
    """The training split's majority answers and question prior (:mod:`medvl.eval.baselines`), from
    `train_split`, else the benchmark's own training split when it has one (SLAKE's train.json);
    None when there is none. The evaluated questions are never used: a training file that is the
    evaluated file, or holds one of its questions (same id and question text), is refused."""
    if split == "train":
        return None
    train_file = Path(train_split) if train_split is not None else default_train_split(bench, Path(data))
    if train_file is None:
        return None
    test_file = Path(data) / f"{split}.json" if bench == "slake" and Path(data).is_dir() else Path(data)
    if train_file.resolve() == test_file.resolve():
        raise BenchmarkError(f"{train_file}: the training split is the evaluated file")
    train = load_benchmark(bench, train_file, split="train", lang=lang)
    asked = {(it.id, it.question) for it in items}
    leaked = next((it.id for it in train if (it.id, it.question) in asked), None)
    if leaked is not None:
        raise BenchmarkError(f"{train_file}: question {leaked!r} is also evaluated; not a training split")
    return build_prior(train, PRIMARY_BREAKDOWN.get(bench), str(train_file))


def evaluate(
    model,
    bench: str,
    data: Path,
    out: Path,
    *,
    batch_size: int = 16,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    limit: int | None = None,
    image_check: bool = False,
    split: str = "test",
    lang: str = "en",
    judge: tuple | None = None,
    train_split: Path | None = None,
    workers: int = 1,
    engine: str = "local",
    chunk: int = DEFAULT_CHUNK,
    progress: bool = True,
    volume_tokens: int | None = None,
) -> dict:
    """Evaluate `model` (a folder, a VLM, or an :class:`APIModel`) on benchmark `bench` read from
    `data`; writes predictions and the report (JSON, Markdown, plot) to `out` and returns the report.
    `limit` keeps the first N questions; `image_check` re-runs with blank and shuffled images;
    `judge` = (LLMClient, model name) resolves answers exact matching cannot; `train_split` (a file
    of the benchmark's format; SLAKE's train.json is found by itself) gives the majority and
    question-only baselines; `workers`/`engine`/`chunk` shard the run (module docstring); `volume_tokens`
    is the image tokens a volume question's slabs may take (default: the model's own, `volumes.json`).
    Questions the loader skipped (a 3D benchmark's missing volumes) are counted in the report's
    `run.notes`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    items = load_benchmark(bench, Path(data), split=split, lang=lang, notes=notes)
    wanted = items[:limit]
    prior = load_prior(bench, Path(data), split, lang, train_split, wanted)
    run_info = {
        "model": model_name(model),
        "bench": bench,
        "data": str(data),
        "split": split,
        "lang": lang,
        "limit": limit,
        "questions": len(wanted),
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy (temperature 0)",
        "prompts": {
            "multiple choice": "question, 'X. option' lines, then: " + MC_INSTRUCTION,
            "closed/open": "question, then: " + SHORT_INSTRUCTION,
        },
        "train_split": prior["source"] if prior else None,
        "medvl_version": medvl.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if notes:
        run_info["notes"] = notes
    if any(it.volume is not None for it in items):
        volume_tokens = run_info["volume_tokens"] = volume_budget(model, volume_tokens)
    (out / "run.json").write_text(json.dumps(run_info, indent=2, ensure_ascii=False))
    prior_file = out / PRIOR_FILE
    if prior is not None:
        prior_file.write_text(json.dumps(prior, indent=1, ensure_ascii=False), encoding="utf-8")
    else:
        prior_file.unlink(missing_ok=True)
    answerer = prepare_model(model, out, workers)
    config = {"model": run_info["model"], "bench": bench, "data": str(data), "split": split, "lang": lang}
    kwargs = dict(
        bench=bench,
        config=config,
        limit=limit,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        chunk=chunk,
        workers=workers,
        engine=engine,
        progress=progress,
        volume_tokens=volume_tokens,
    )
    predict(answerer, items, prediction_path(out), **kwargs)
    if image_check:
        for variant in VARIANTS:
            predict(answerer, items, prediction_path(out, variant), variant=variant, **kwargs)
    return rescore(prediction_path(out), out, judge=judge)


def rescore(
    predictions: Path, out: Path | None = None, *, bench: str | None = None, judge: tuple | None = None
) -> dict:
    """Score a prediction file again without a model (medvl's, or another tool's in the documented
    format). Blank/shuffled prediction files, `run.json` and the training prior (`prior.json`)
    beside it are picked up. Writes the report to `out` (default: the file's folder) and returns it."""
    predictions = Path(predictions)
    out = Path(out) if out else predictions.parent
    out.mkdir(parents=True, exist_ok=True)
    rows = read_predictions(predictions)
    if not rows:
        raise ValueError(f"{predictions}: no predictions")
    if judge is not None and judge_unresolved(rows, *judge):
        # Keep the verdicts so the next re-scoring does not ask again.
        tmp = predictions.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(predictions)
    run_file = predictions.parent / "run.json"
    run_info = {"model": "unknown (re-scored file)"}
    if run_file.exists():
        run_info = json.loads(run_file.read_text())
    run_info["bench"] = bench or run_info.get("bench") or rows[0].get("bench", "custom")
    run_info["predictions"] = str(predictions)
    variants = {}
    for variant in VARIANTS:
        path = predictions.with_name(f"{predictions.stem}.{variant}.jsonl")
        if path.exists():
            variants[variant] = read_predictions(path)
    prior_file = predictions.parent / PRIOR_FILE
    prior = json.loads(prior_file.read_text(encoding="utf-8")) if prior_file.exists() else None
    report = build_report(rows, run_info, variants, prior)
    write_report(report, rows, out)
    return report
