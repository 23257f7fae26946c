"""Run a model over a benchmark and score it: `evaluate` for a model, `rescore` for a prediction file.

Predictions are appended to `<out>/predictions.jsonl` batch by batch, so a killed run started again
with the same arguments continues where it stopped. The image-dependence check writes
`predictions.blank.jsonl` (every image replaced by a black one of the same size) and
`predictions.shuffled.jsonl` (each question shown another question's image) beside it.
"""

from __future__ import annotations

import json
import random
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import medvl
from medvl.eval.benchmarks import Item, load_benchmark
from medvl.eval.report import build_report, write_report
from medvl.eval.scoring import judge_unresolved, read_predictions
from medvl.imaging import DEFAULT_PREPROCESSING, Preprocessing
from medvl.llm import LLMClient, image_data_url
from medvl.prompts import MC_INSTRUCTION, SHORT_INSTRUCTION

VARIANTS = ("blank", "shuffled")
DEFAULT_MAX_NEW_TOKENS = 32  # answers are a letter, a word or a phrase


class Answerer(Protocol):
    name: str
    image_size: int | None  # images are read at this size (medvl.imaging.read_image), None: as they are

    def answer(self, prompts: list[tuple[str, list[Image.Image]]], max_new_tokens: int) -> list[str]: ...


class LocalModel:
    """A medvl model folder (or a loaded VLM), batched greedy decoding through medvl's `generate`."""

    def __init__(self, vlm, name: str) -> None:
        self.vlm, self.name = vlm, name
        self.image_size = vlm.model.config.vision_config.image_size  # as in training
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


def _image_source(items: list[Item], variant: str) -> list[int]:
    """For each item, the index of the item whose images it is shown: its own, or for "shuffled"
    another one (a rotation of a seeded shuffle, so nobody keeps their own when there are two or more)."""
    if variant != "shuffled":
        return list(range(len(items)))
    order = list(range(len(items)))
    random.Random(0).shuffle(order)
    source = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
    return [source[i] for i in range(len(items))]


def _images(
    item: Item, variant: str, size: int | None, preprocessing: Preprocessing = DEFAULT_PREPROCESSING
) -> list[Image.Image]:
    images = item.load_images(size, preprocessing)
    return [Image.new("RGB", im.size) for im in images] if variant == "blank" else images


def _repair_tail(path: Path) -> None:
    """Drop a last line that a killed run left half-written, so appending continues cleanly."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def predict(
    answerer: Answerer,
    items: list[Item],
    path: Path,
    *,
    bench: str,
    variant: str = "image",
    batch_size: int = 16,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: bool = True,
) -> list[dict]:
    """Predictions for `items`, in their order, reusing the rows already in `path`."""
    done: dict[str, dict] = {}
    if path.exists():
        _repair_tail(path)
        for row in read_predictions(path):
            if row.get("bench") != bench:
                raise ValueError(f"{path}: written for benchmark {row.get('bench')!r}, not {bench!r}")
            done[row["id"]] = row
    source = _image_source(items, variant)
    todo = [i for i, item in enumerate(items) if item.id not in done]
    columns = (TextColumn(f"{bench} ({variant})"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with path.open("a", encoding="utf-8") as f, Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("", total=len(items), completed=len(items) - len(todo))
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            prompts = [
                (
                    items[i].prompt(),
                    _images(
                        items[source[i]],
                        variant,
                        answerer.image_size,
                        getattr(answerer, "preprocessing", DEFAULT_PREPROCESSING),
                    ),
                )
                for i in batch
            ]
            texts = answerer.answer(prompts, max_new_tokens)
            for item, text in zip([items[i] for i in batch], texts, strict=True):
                row = {
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
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                done[item.id] = row
            f.flush()  # a killed run keeps every finished batch
            bar.advance(task, len(batch))
    return [done[item.id] for item in items]


def prediction_path(out: Path, variant: str = "image") -> Path:
    return out / ("predictions.jsonl" if variant == "image" else f"predictions.{variant}.jsonl")


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
    progress: bool = True,
) -> dict:
    """Evaluate `model` (a folder, a VLM, or an :class:`APIModel`) on benchmark `bench` read from
    `data`; writes predictions and the report (JSON, Markdown, plot) to `out` and returns the report.
    `limit` keeps the first N questions; `image_check` re-runs with blank and shuffled images;
    `judge` = (openai client, model name) resolves answers exact matching cannot."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = load_benchmark(bench, Path(data), split=split, lang=lang)[:limit]
    answerer = as_answerer(model)
    run = {
        "model": answerer.name,
        "bench": bench,
        "data": str(data),
        "split": split,
        "lang": lang,
        "limit": limit,
        "questions": len(items),
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy (temperature 0)",
        "prompts": {
            "multiple choice": "question, 'X. option' lines, then: " + MC_INSTRUCTION,
            "closed/open": "question, then: " + SHORT_INSTRUCTION,
        },
        "medvl_version": medvl.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (out / "run.json").write_text(json.dumps(run, indent=2, ensure_ascii=False))
    kwargs = dict(bench=bench, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress)
    predict(answerer, items, prediction_path(out), **kwargs)
    if image_check:
        for variant in VARIANTS:
            predict(answerer, items, prediction_path(out, variant), variant=variant, **kwargs)
    return rescore(prediction_path(out), out, judge=judge)


def rescore(
    predictions: Path, out: Path | None = None, *, bench: str | None = None, judge: tuple | None = None
) -> dict:
    """Score a prediction file again without a model (medvl's, or another tool's in the documented
    format). Blank/shuffled prediction files beside it and its `run.json` are picked up. Writes the
    report to `out` (default: the file's folder) and returns it."""
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
    run = json.loads(run_file.read_text()) if run_file.exists() else {"model": "unknown (re-scored file)"}
    run["bench"] = bench or run.get("bench") or rows[0].get("bench", "custom")
    run["predictions"] = str(predictions)
    variants = {}
    for variant in VARIANTS:
        path = predictions.with_name(f"{predictions.stem}.{variant}.jsonl")
        if path.exists():
            variants[variant] = read_predictions(path)
    report = build_report(rows, run, variants)
    write_report(report, rows, out)
    return report
