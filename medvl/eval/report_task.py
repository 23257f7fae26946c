"""Radiology report generation as an evaluation task: generate a report per study with the model,
score it against the reference with the metrics of :mod:`medvl.eval.report_metrics`, score two
baselines the same way (the most frequent training report; the training report of the nearest
image), and write report.json and report.md.

The reports are generated as the VQA questions are answered (:func:`medvl.eval.harness.predict`): a
resumable job on :mod:`medvl.jobs` in `out/jobs/image/`, in fixed chunks of studies, sharded across
worker processes or Ray actors; a run killed at any point continues after its last committed chunk
and writes the same files, byte for byte, as a run never stopped, whatever the number of workers.

Files in `out`: `predictions.jsonl` (one generated report per study), `baselines.jsonl`, `run.json`,
`scored.jsonl` (each study's scores), `report.json`, `report.md`. See docs/eval.md, "Report generation".
"""

from __future__ import annotations

import json
import random
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

import medvl
from medvl import RESEARCH_ONLY
from medvl.eval.benchmarks import BenchmarkError
from medvl.eval.harness import (
    DEFAULT_CHUNK,
    Answerer,
    LocalModel,
    as_answerer,
    model_name,
    predict,
    prediction_path,
    prepare_model,
)
from medvl.eval.radiology import (
    CT_REGION,
    CT_SLICE_FRACTIONS,
    DEFAULT_MAX_IMAGES,
    REPORT_LOADERS,
    Report,
    clean_report,
    load_reports,
    report_instruction,
    to_items,
)
from medvl.eval.report_metrics import (
    METEOR_BOOTSTRAP_SAMPLES,
    ClinicalMetrics,
    ClinicalOptions,
    TextMetrics,
    degeneracy,
    most_frequent_report,
    nearest_neighbours,
)
from medvl.eval.scoring import read_predictions
from medvl.eval.stats import BOOTSTRAP_INFO
from medvl.imaging import DEFAULT_PREPROCESSING

REPORT_BENCHES = tuple(REPORT_LOADERS)
# Reports are long: IU X-ray findings average ~40 words, MIMIC-CXR ~55, CT-RATE ~200 (~1.4 tokens a
# word with a BPE tokenizer); 256 new tokens covers the chest X-ray sets, give CT-RATE 512.
DEFAULT_REPORT_TOKENS = 256
PIXEL_EMBEDDING_SIDE = 32
BASELINES = ("most_frequent", "nearest_neighbour")


# ---------------------------------------------------------------- image embeddings for the retrieval baseline


def _tower_embed(answerer: LocalModel, images: list[Image.Image]) -> np.ndarray:
    """Mean over image tokens of the vision tower's hidden state at the layer the model feeds its
    projector (`vision_feature_layer`; CLIP's CLS token left out under the "default" strategy)."""
    import torch

    vlm = answerer.vlm
    cfg = vlm.model.config
    pixels = vlm.processor.image_processor(images, return_tensors="pt")["pixel_values"]
    tower = vlm.model.model.vision_tower
    with torch.inference_mode():
        out = tower(pixels.to(vlm.model.device, vlm.model.dtype), output_hidden_states=True)
    layers = (
        cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, list) else [cfg.vision_feature_layer]
    )
    skip = (
        1
        if cfg.vision_feature_select_strategy == "default" and cfg.vision_config.model_type.startswith("clip")
        else 0
    )
    feats = torch.cat([out.hidden_states[i][:, skip:].mean(1) for i in layers], dim=-1)
    return feats.float().cpu().numpy()


def _pixel_embed(images: list[Image.Image]) -> np.ndarray:
    """Grey levels at 32 x 32 (antialiased), each image shifted to mean 0 and scaled to unit norm, so
    cosine similarity is the pixels' correlation: whole-image layout and contrast, nothing learned."""
    side = PIXEL_EMBEDDING_SIDE
    rows = []
    for im in images:
        x = np.asarray(im.convert("L").resize((side, side), Image.BILINEAR), dtype=np.float32).ravel()
        x = x - x.mean()
        rows.append(x / max(float(np.linalg.norm(x)), 1e-6))
    return np.stack(rows)


def embedding_name(answerer: Answerer) -> str:
    if isinstance(answerer, LocalModel):
        return f"the evaluated model's vision tower ({answerer.name}): mean hidden state at its feature layer"
    return (
        f"pixel fallback ({answerer.name} is not a local model): "
        f"{PIXEL_EMBEDDING_SIDE}x{PIXEL_EMBEDDING_SIDE} grey levels, mean-centred, cosine = pixel correlation"
    )


def embed_reports(answerer: Answerer, reports: list[Report], batch_size: int = 32) -> np.ndarray:
    """One vector per study: the mean of its images' embeddings."""
    items = to_items(reports, "both")
    size = answerer.image_size if isinstance(answerer, LocalModel) else None
    preprocessing = getattr(answerer, "preprocessing", DEFAULT_PREPROCESSING)
    vectors = []
    for start in range(0, len(items), batch_size):
        batch = [it.load_images(size, preprocessing) for it in items[start : start + batch_size]]
        flat = [im for ims in batch for im in ims]
        emb = _tower_embed(answerer, flat) if isinstance(answerer, LocalModel) else _pixel_embed(flat)
        i = 0
        for ims in batch:
            vectors.append(emb[i : i + len(ims)].mean(0))
            i += len(ims)
    return np.stack(vectors)


def baseline_predictions(
    answerer: Answerer, train: list[Report], test: list[Report], section: str, nn_pool: int | None
) -> tuple[list[dict], dict]:
    """Rows {id, baseline, prediction, source} for both baselines, and what was used."""
    texts = [r.text(section) for r in train]
    frequent, count = most_frequent_report(texts)
    rows = [
        {"id": r.id, "baseline": "most_frequent", "prediction": frequent, "source": "train"} for r in test
    ]
    pool = train
    if nn_pool is not None and nn_pool < len(train):
        pool = random.Random(0).sample(train, nn_pool)
    nearest = nearest_neighbours(embed_reports(answerer, pool), embed_reports(answerer, test))
    rows += [
        {
            "id": r.id,
            "baseline": "nearest_neighbour",
            "prediction": pool[j].text(section),
            "source": pool[j].id,
        }
        for r, j in zip(test, nearest, strict=True)
    ]
    info = {
        "most_frequent": {
            "text": frequent,
            "cleaned": clean_report(frequent),
            "training_reports_sharing_it": count,
            "training_reports": len(train),
        },
        "nearest_neighbour": {
            "embedding": embedding_name(answerer),
            "pool": len(pool),
            "pool_sampled": len(pool) < len(train),
        },
    }
    return rows, info


# ---------------------------------------------------------------- scoring and the report


MEASURES = {
    "bleu_n": "n-gram precision against the reference (BLEU-n, geometric mean up to n, brevity penalty), "
    "corpus level: wording overlap, not clinical correctness",
    "meteor": "unigram matches with stems and synonyms (METEOR 1.5), corpus level (pooled alignment "
    "statistics), with a bootstrap interval over reports",
    "rouge_l": "longest common subsequence F-measure, mean over reports",
    "cider": "TF-IDF weighted n-gram similarity (CIDEr-D), rewarding words that are rare in the references",
    "sacrebleu": "corpus BLEU (sacreBLEU, its signature given) with a 95% bootstrap interval over reports",
    "f1_chexbert": "agreement of the 14 CheXbert observation labels (positive or uncertain = mentioned) "
    "between generated and reference report: micro/macro F1, all 14 and the usual 5",
    "f1_radgraph": "overlap of RadGraph entities (simple), entities with relations (partial, complete)",
    "bertscore": "token-embedding similarity of generated and reference report (precision/recall/F1)",
    "degeneracy": "repeated reports, distinct n-grams and lengths: a model that writes one template for "
    "every study can still reach a fair BLEU",
    "baselines": "the same metrics for the most frequent training report given to every study, and for "
    "the training report of the nearest image: a model should beat both",
}


def score_reports(
    rows: list[dict],
    baseline_rows: list[dict],
    run: dict,
    clinical: ClinicalOptions | None = None,
    *,
    meteor: bool = True,
    device: str = "cpu",
) -> tuple[dict, list[dict]]:
    """The report (dict) and each study's scored row."""
    refs = [r["answer"] for r in rows]
    systems = {"model": [r["prediction"] for r in rows]}
    for name in BASELINES:
        by_id = {b["id"]: b["prediction"] for b in baseline_rows if b["baseline"] == name}
        if by_id:
            missing = [r["id"] for r in rows if r["id"] not in by_id]
            if missing:
                raise ValueError(f"baselines.jsonl: no {name} prediction for study {missing[0]!r}")
            systems[name] = [by_id[r["id"]] for r in rows]
    text = TextMetrics(meteor=meteor)
    clin = ClinicalMetrics(clinical or ClinicalOptions(), device=device)
    metrics, each = {}, []
    try:
        for name, hyps in systems.items():
            scores, per_report = text.score(refs, hyps)
            scores["clinical"] = clin.score(refs, hyps)
            scores["degeneracy"] = degeneracy(refs, hyps)
            metrics[name] = scores
            if name == "model":
                each = per_report
    finally:
        text.close()
    report = {
        "research_only": RESEARCH_ONLY,
        "task": "radiology report generation",
        "run": run,
        "n": len(rows),
        "metrics": metrics,
        "implementations": {"text": text.info(), "clinical": clin.info()},
        "statistics": {"bootstrap": BOOTSTRAP_INFO, "meteor_bootstrap_samples": METEOR_BOOTSTRAP_SAMPLES},
        "measures": MEASURES,
    }
    scored = [
        {"id": r["id"], "reference": r["answer"], "prediction": r["prediction"], "cleaned_scores": s}
        for r, s in zip(rows, each, strict=True)
    ]
    return report, scored


def _f(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.2f}" if pct else f"{v:.4f}"


def _f_ci(v: float | None, ci: list[float] | None) -> str:
    return _f(v) if v is None or ci is None else f"{_f(v)} [{_f(ci[0])}, {_f(ci[1])}]"


def to_markdown(report: dict) -> str:
    run, m = report["run"], report["metrics"]
    lines = [
        f"# medvl eval: {run['bench']} (report generation)",
        "",
        f"*{report['research_only']}*",
        "",
        f"- model: `{run.get('model')}`",
        f"- data: `{run.get('data')}`, split `{run.get('split')}`, section `{run.get('section')}`, "
        f"{report['n']} studies" + (f" (first {run['limit']})" if run.get("limit") else ""),
        f'- instruction: "{run.get("instruction")}"; greedy decoding, '
        f"at most {run.get('max_new_tokens')} new tokens",
        *(f"- note: {n}" for n in run.get("notes", [])),
        "",
    ]
    header = "| system | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | METEOR | ROUGE-L | CIDEr | sacreBLEU [95% CI] |"
    for form, title in (("cleaned", "Cleaned text (R2Gen cleaning, whitespace tokens)"), ("raw", "Raw text")):
        lines += [f"## {title}", "", header, "|---|" + "---|" * 8]
        for name, s in m.items():
            t = s[form]
            sb = t["sacrebleu"]
            lines.append(
                f"| {name} | "
                + " | ".join(
                    _f_ci(t[k], t["ci95"].get(k))
                    for k in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")
                )
                + f" | {sb['bleu']:.2f} [{sb['ci95'][0]:.2f}, {sb['ci95'][1]:.2f}] |"
            )
        lines += [
            "",
            f"sacreBLEU signature: `{next(iter(m.values()))[form]['sacrebleu']['signature']}`. "
            "[low, high]: 95% percentile-bootstrap interval over the reports ({samples} resamples, seed "
            "{seed}; CIDEr keeps the whole set's document frequencies; METEOR: the first {meteor} of those "
            "resamples, each scored by the jar from the reports' alignment statistics).".format(
                **BOOTSTRAP_INFO, meteor=METEOR_BOOTSTRAP_SAMPLES
            ),
            "",
        ]
    clin = report["implementations"]["clinical"]
    lines += ["## Clinical metrics (raw text)", ""]
    if clin["models"]:
        lines += [
            "| system | F1-CheXbert micro-14 | macro-14 | micro-5 | macro-5 "
            "| RadGraph simple | partial | complete | BERTScore F1 |",
            "|---|" + "---|" * 8,
        ]
        for name, s in m.items():
            c = s["clinical"]
            cx = c.get("f1_chexbert", {})
            rg = c.get("f1_radgraph", {})
            cells = [
                _f(cx.get("14", {}).get("micro_f1")),
                _f(cx.get("14", {}).get("macro_f1")),
                _f(cx.get("5", {}).get("micro_f1")),
                _f(cx.get("5", {}).get("macro_f1")),
                _f(rg.get("simple")),
                _f(rg.get("partial")),
                _f(rg.get("complete")),
                _f(c.get("bertscore", {}).get("f1")),
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        for metric, info in clin["models"].items():
            lines.append(f"- {metric}: " + ", ".join(f"{k} `{v}`" for k, v in info.items()))
    lines += [f"- {metric}: {why}" for metric, why in clin["not_run"].items()]
    lines += [
        "",
        "## Degeneracy (cleaned text)",
        "",
        "| system | identical share % | unique | empty | distinct-1 | distinct-2 "
        "| mean length ratio | mean words |",
        "|---|" + "---|" * 7,
    ]
    for name, s in m.items():
        d = s["degeneracy"]
        lines.append(
            f"| {name} | {_f(d['identical_share'], True)} | {d['unique_reports']} | {d['empty']} | "
            f"{_f(d['distinct_1'])} | {_f(d['distinct_2'])} | {_f(d['mean_length_ratio'])} | "
            f"{_f(d['mean_words'])} |"
        )
    d = m["model"]["degeneracy"]
    lines += [
        "",
        f"References: distinct-1 {_f(d['reference_distinct_1'])}, "
        f"distinct-2 {_f(d['reference_distinct_2'])}, mean words {_f(d['reference_mean_words'])}. "
        f"The model's most repeated report ({d['most_repeated']['count']} times): "
        f'"{d["most_repeated"]["text"][:200]}"',
        "",
        "## Baselines",
        "",
    ]
    b = run.get("baselines", {})
    if "not_run" in b:
        lines.append(f"Not run: {b['not_run']}")
    else:
        mf, nn = b["most_frequent"], b["nearest_neighbour"]
        lines += [
            "- most_frequent: the training report shared (after cleaning) by "
            f"{mf['training_reports_sharing_it']} of {mf['training_reports']} training reports, "
            f'given to every study: "{mf["text"][:200]}"',
            f"- nearest_neighbour: the report of the most similar training study ({nn['pool']} candidates"
            + (", a seeded sample" if nn["pool_sampled"] else "")
            + f"); image embedding: {nn['embedding']}",
        ]
    text = report["implementations"]["text"]
    lines += ["", "## What the numbers measure", ""]
    lines += [f"- **{k}**: {v}" for k, v in report["measures"].items()]
    lines += ["", "## Implementations", ""] + [f"- {k}: {v}" for k, v in text.items()]
    return "\n".join(lines) + "\n"


def write_report(report: dict, scored: list[dict], out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "report.md").write_text(to_markdown(report), encoding="utf-8")
    with (out / "scored.jsonl").open("w", encoding="utf-8") as f:
        for row in scored:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- the run


def evaluate_reports(
    model,
    bench: str,
    data: Path,
    out: Path,
    *,
    split: str = "test",
    section: str = "findings",
    batch_size: int = 8,
    max_new_tokens: int = DEFAULT_REPORT_TOKENS,
    limit: int | None = None,
    max_images: int = DEFAULT_MAX_IMAGES,
    baselines: bool = True,
    nn_pool: int | None = None,
    clinical: ClinicalOptions | None = None,
    meteor: bool = True,
    device: str = "cpu",
    workers: int = 1,
    engine: str = "local",
    chunk: int = DEFAULT_CHUNK,
    progress: bool = True,
) -> dict:
    """Generate a report for every study of `split` of report set `bench` (iu-xray, mimic-cxr,
    ct-rate, reports-jsonl) read from `data` with `model` (a folder, a VLM or an APIModel), score
    it and the baselines, write the files listed in the module docstring to `out`, return the report.
    `clinical` names local model files for the clinical metrics; `nn_pool` caps (seeded sample) the
    training studies the retrieval baseline embeds; `device` runs the clinical models;
    `workers`/`engine`/`chunk` shard the generation as :func:`medvl.eval.harness.evaluate` does."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reports = load_reports(bench, Path(data), max_images=max_images)
    if reports.single_text:
        section = "both"
    studies = reports.split(split, section)
    test = studies[:limit]
    if not test:
        raise BenchmarkError(
            f"{data}: no {split} reports with a {section} section ({'; '.join(reports.notes)})"
        )
    instruction = report_instruction(section)
    run = {
        "model": model_name(model),
        "bench": bench,
        "data": str(data),
        "split": split,
        "section": section,
        "limit": limit,
        "studies": len(test),
        "max_images": max_images,
        "ct_slices": {"fractions": list(CT_SLICE_FRACTIONS), "window_region": CT_REGION}
        if bench == "ct-rate"
        else None,
        "instruction": instruction,
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy (temperature 0)",
        "medvl_version": medvl.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    answerer = prepare_model(model, out, workers)
    rows = predict(
        answerer,
        to_items(studies, section),  # the whole split: a run with a larger limit continues this one
        prediction_path(out),
        bench=bench,
        config={k: run[k] for k in ("model", "bench", "data", "split", "section", "max_images")},
        limit=limit,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        chunk=chunk,
        workers=workers,
        engine=engine,
        progress=progress,
    )
    train = reports.split("train", section) if split != "train" else []
    run["notes"] = reports.notes
    baseline_rows: list[dict] = []
    if not baselines:
        run["baselines"] = {"not_run": "switched off"}
    elif split == "train":
        run["baselines"] = {"not_run": "the evaluated split is the training split"}
    elif not train:
        run["baselines"] = {"not_run": f"no training reports with a {section} section in this report set"}
    else:
        # The retrieval baseline embeds images in this process (a model folder is loaded here now).
        embedder = as_answerer(answerer)
        baseline_rows, run["baselines"] = baseline_predictions(embedder, train, test, section, nn_pool)
    with (out / "baselines.jsonl").open("w", encoding="utf-8") as f:
        for row in baseline_rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / "run.json").write_text(json.dumps(run, indent=2, ensure_ascii=False), encoding="utf-8")
    report, scored = score_reports(rows, baseline_rows, run, clinical, meteor=meteor, device=device)
    write_report(report, scored, out)
    return report


def rescore_reports(
    predictions: Path,
    out: Path | None = None,
    *,
    clinical: ClinicalOptions | None = None,
    meteor: bool = True,
    device: str = "cpu",
) -> dict:
    """Score a report prediction file again (e.g. with clinical metrics added), no model needed:
    `run.json` and `baselines.jsonl` beside it are picked up."""
    predictions = Path(predictions)
    out = Path(out) if out else predictions.parent
    out.mkdir(parents=True, exist_ok=True)
    rows = read_predictions(predictions)
    if not rows:
        raise ValueError(f"{predictions}: no predictions")
    run_file, base_file = predictions.parent / "run.json", predictions.parent / "baselines.jsonl"
    run = json.loads(run_file.read_text()) if run_file.exists() else {"model": "unknown (re-scored file)"}
    run.setdefault("bench", rows[0].get("bench", "reports"))
    run["predictions"] = str(predictions)
    baseline_rows = read_jsonl(base_file) if base_file.exists() else []
    report, scored = score_reports(rows, baseline_rows, run, clinical, meteor=meteor, device=device)
    write_report(report, scored, out)
    return report


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------- `medvl eval --bench <report set>`

# --report-option KEY=VALUE: the report task's settings that the shared options do not cover.
_OPTION_TYPES: dict[str, type] = {
    "section": str,
    "max_images": int,
    "baselines": bool,
    "nn_pool": int,
    "meteor": bool,
    "device": str,
    "chexbert": Path,
    "chexbert_bert": Path,
    "radgraph": Path,
    "radgraph_type": str,
    "bertscore_model": Path,
    "bertscore_layer": int,
    "bertscore_baseline": Path,
}
_CLINICAL_KEYS = set(ClinicalOptions.__dataclass_fields__)


def parse_report_options(pairs: list[str]) -> tuple[dict, ClinicalOptions]:
    """`KEY=VALUE` strings -> (keyword arguments of evaluate_reports, clinical options)."""
    kwargs: dict = {}
    clinical: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in _OPTION_TYPES:
            raise BenchmarkError(
                f"--report-option {pair!r}: expected KEY=VALUE with KEY one of {', '.join(_OPTION_TYPES)}"
            )
        kind = _OPTION_TYPES[key]
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise BenchmarkError(f"--report-option {pair!r}: {key} is true or false")
            parsed = value.lower() in ("true", "1", "yes")
        elif kind is int:
            try:
                parsed = int(value)
            except ValueError:
                raise BenchmarkError(f"--report-option {pair!r}: {key} is a whole number") from None
        elif kind is Path:
            parsed = Path(value).expanduser()
            if not parsed.exists():
                raise BenchmarkError(f"--report-option {pair!r}: {parsed} not found")
        else:
            parsed = value
        (clinical if key in _CLINICAL_KEYS else kwargs)[key] = parsed
    return kwargs, ClinicalOptions(**clinical)


def summary(report: dict, out: Path) -> str:
    """What `medvl eval` prints after a report run."""
    lines = [f"{report['run']['bench']}: {report['n']} reports generated and scored"]
    for name, s in report["metrics"].items():
        c = s["cleaned"]
        lines.append(
            f"  {name}: BLEU-4 {c['bleu_4']:.4f}, ROUGE-L {c['rouge_l']:.4f}, CIDEr {c['cider']:.4f}, "
            f"identical reports {100 * (s['degeneracy']['identical_share'] or 0):.1f}%"
        )
    lines.append(f"report: {out / 'report.md'}\n{RESEARCH_ONLY}")
    return "\n".join(lines)


def report_cli(
    model,
    bench: str,
    data: Path | None,
    out: Path,
    rescore: Path | None,
    split: str,
    batch_size: int,
    max_new_tokens: int | None,
    limit: int | None,
    options: list[str],
    workers: int = 1,
    engine: str = "local",
    chunk: int = DEFAULT_CHUNK,
) -> str:
    """`medvl eval --bench <report set>`: run `model` (a folder or an APIModel; None with `rescore`) or
    re-score a prediction file, and return the summary."""
    kwargs, clinical = parse_report_options(options)
    if rescore:
        scoring = {k: kwargs[k] for k in ("meteor", "device") if k in kwargs}
        return summary(rescore_reports(rescore, out, clinical=clinical, **scoring), out)
    if data is None:
        raise BenchmarkError("--data is required (or --rescore)")
    report = evaluate_reports(
        model,
        bench,
        data,
        out,
        split=split,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens or DEFAULT_REPORT_TOKENS,
        limit=limit,
        clinical=clinical,
        workers=workers,
        engine=engine,
        chunk=chunk,
        **kwargs,
    )
    return summary(report, out)
