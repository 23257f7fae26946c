"""`medvl quality`: every generated sample scored on five dimensions, on medvl.jobs (resumable after
kill -9, identical outputs), then split into kept and rejected files with a report.

Worker side (`ScoreStep`, one item = one sample): image validity, annotation fidelity, alignment
(image identity, blind answerability), language quality, clinical validity (judge or rules), the
benchmark guard. Driver side (`CrossCheck`, input order): duplicate images across records and
near-duplicate text against what was kept so far, then the decision. Every score lands in the job's
Parquet parts (`scores/data/`), kept or not; a missing score fails its dimension (`decide`)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from medvl.errors import InputError
from medvl.jobs import DriverStep, Outcome, Step
from medvl.jobs import run as run_job
from medvl.records import read_rows

from . import images as img
from .blind import BLIND_PROMPT_VERSION, Prior, blind_correct, blind_messages
from .config import Thresholds
from .judge import JUDGE_PROMPT_VERSION, judge_messages, parse_judgement, rule_checks
from .text import language_confidence, max_repetition, minhash, translation_consistency

DIMENSIONS = ("image", "fidelity", "alignment", "language", "clinical")


@dataclass(frozen=True)
class Judge:
    """An OpenAI-compatible endpoint for the clinical judge and the text-only blind test."""

    base_url: str
    model: str
    api_key_env: str | None = None


def schema():
    import pyarrow as pa

    cols = [
        ("item", pa.string()),
        ("id", pa.string()),
        ("gen", pa.int32()),
        ("source", pa.string()),
        ("modality", pa.string()),
        ("format", pa.string()),
        ("lang", pa.string()),
        ("record_id", pa.string()),
        ("image", pa.string()),  # absolute path, "" for text-only samples
        ("image_sha256", pa.string()),  # of the decoded pixels (curation's hash)
        ("image_phash", pa.string()),
        ("image_std", pa.float64()),
    ]
    for d in DIMENSIONS:
        cols += [(f"{d}_score", pa.float64()), (f"{d}_reason", pa.string())]
    cols += [
        ("repetition", pa.float64()),
        ("lang_confidence", pa.float64()),
        ("translation", pa.float64()),
        ("blind_prior", pa.float64()),
        ("blind_support", pa.int64()),
        ("blind_llm", pa.int64()),
        ("clinical_by", pa.string()),
        ("judge_critique", pa.string()),
        ("benchmark", pa.string()),
        ("benchmark_distance", pa.int64()),
        ("benchmark_match", pa.string()),  # "exact" (same pixels) or "phash" (within the distance)
        ("duplicate_of", pa.string()),
        ("near_duplicate_of", pa.string()),
        ("failures", pa.list_(pa.string())),
        ("flags", pa.list_(pa.string())),
        ("kept", pa.bool_()),
        ("sample", pa.string()),
    ]
    return pa.schema(cols)


# ------------------------------------------------------------------------------------- inputs


def sample_files(gen: Path) -> tuple[Path, Path]:
    """(samples file, image root) of one `medvl generate` output folder, or of a JSONL/JSON file."""
    if gen.is_dir():
        f = gen / "samples.jsonl"
        if not f.is_file():
            raise InputError(
                str(gen), "samples.jsonl", "not found: is this a `medvl generate` output folder?"
            )
        return f, gen
    if gen.is_file():
        return gen, gen.parent
    raise InputError(str(gen), "path", "not found")


def items(gens: list[Path], t: Thresholds) -> tuple[list[dict], list[Path]]:
    """One item per sample, in input order, with what the worker needs from other samples: the English
    original of a Chinese sample, and the question-only prior's verdict."""
    loaded = []
    files = []
    for g, gen in enumerate(gens):
        f, root = sample_files(gen)
        files.append(f)
        loaded += [(g, root.resolve(), s) for s in read_rows(f)]
    prior = Prior([s for _, _, s in loaded], t.alignment.short_answer_words)
    by_id = {(g, s.get("id")): s for g, _, s in loaded if s.get("lang") == "en"}
    out = []
    for n, (g, root, s) in enumerate(loaded):
        original = by_id.get((g, s.get("pair_id"))) if s.get("lang") == "zh" else None
        out.append(
            {
                "id": f"{g}:{n:09d}",
                "gen": g,
                "root": str(root),
                "sample": s,
                "original": original,
                "prior": prior.test(s),
            }
        )
    return out, files


def _digest(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# -------------------------------------------------------------------------------- worker side


class ScoreStep(Step):
    name = "quality"

    def __init__(self, t: Thresholds, judge: Judge | None, benchmark: Path, fingerprint: dict, cache: Path):
        self.t, self.judge, self.benchmark, self.fingerprint, self.cache = (
            t,
            judge,
            benchmark,
            fingerprint,
            cache,
        )
        self.client = None
        self.guard: img.BenchmarkGuard | None = None

    def schema(self):
        return schema()

    def config(self) -> dict:
        return self.fingerprint

    def setup(self) -> None:
        self.guard = img.BenchmarkGuard(
            read_rows(self.benchmark) if self.benchmark.stat().st_size else [], self.t.image.benchmark_phash
        )
        if self.judge is not None:
            from medvl.llm import LLMClient

            self.client = LLMClient(
                self.judge.base_url,
                api_key_env=self.judge.api_key_env,
                max_concurrency=1,
                cache_dir=self.cache,
            )
        self.measure = lru_cache(maxsize=256)(img.measure)  # the samples of one record share an image

    def __call__(self, item: dict) -> Iterator[Outcome]:
        yield self.score(item)

    def score(self, item: dict) -> dict:
        s = item["sample"]
        facts_raw = s.get("facts")
        facts, facts_problem = None, ""
        try:
            from medvl.samples import FactSheet

            facts = FactSheet.from_json(facts_raw) if facts_raw else None
            facts_problem = "" if facts else "the sample carries no fact sheet"
        except (TypeError, ValueError, KeyError) as e:
            facts_problem = f"unreadable fact sheet ({type(e).__name__})"
        fdict = json.loads(facts.to_json()) if facts else {}
        prov = s.get("provenance") if isinstance(s.get("provenance"), dict) else {}
        row: dict = {c: None for c in schema().names}
        row |= {
            "item": item["id"],
            "id": str(s.get("id", "")),
            "gen": item["gen"],
            "source": str(prov.get("source") or fdict.get("source") or ""),
            "modality": str(fdict.get("modality") or ""),
            "format": str(s.get("format") or ""),
            "lang": str(s.get("lang") or ""),
            "record_id": str(prov.get("record_id") or fdict.get("record_id") or ""),
            "image": "",
            "image_sha256": "",
            "image_phash": "",
            "benchmark": "",
            "benchmark_match": "",
            "duplicate_of": "",
            "near_duplicate_of": "",
            "judge_critique": "",
            "flags": [],
            "sample": json.dumps(s, ensure_ascii=False, sort_keys=True),
        }
        failures: list[str] = []
        mismatch = self._image(item, facts, row, failures)
        self._fidelity(s, facts, facts_problem, item["original"], row, failures)
        self._alignment(item, mismatch, row, failures)
        self._language(s, item["original"], row, failures)
        self._clinical(s, fdict, facts_problem, row, failures)
        row["failures"] = failures
        return row

    def _image(self, item: dict, facts, row: dict, failures: list[str]) -> str:
        """Dimension 1 into `row`; returns what ties the image to the wrong fact sheet ("" if nothing)."""
        s, t = item["sample"], self.t.image
        rel = s.get("image")
        if not rel:
            row["image_score"], row["image_reason"] = 1.0, "text-only sample: no image"
            return ""
        path = Path(item["root"]) / str(rel)
        row["image"] = str(path)
        m = self.measure(path)
        row["image_sha256"], row["image_std"] = m.sha256, m.std
        row["image_phash"] = f"{m.phash:016x}" if m.sha256 else ""
        problems = img.image_problems(m, t)
        if m.sha256 and self.guard is not None:
            hit = self.guard.match(m.sha256, m.phash)
            if hit is not None:
                entry, d, exact = hit
                row["benchmark"], row["benchmark_distance"] = entry["sha256"], d
                row["benchmark_match"] = "exact" if exact else "phash"
                problems.append("benchmark image")
        failures += [f"image: {p}" for p in problems]
        detail = m.problem or f"{m.width}x{m.height}, std {m.std:.1f}"
        row["image_score"] = 0.0 if problems else 1.0
        row["image_reason"] = ("; ".join(problems) + f" ({detail})") if problems else f"ok ({detail})"
        if facts is not None and m.sha256 and (facts.width, facts.height) != (m.width, m.height):
            return f"image is {m.width}x{m.height}, the fact sheet says {facts.width}x{facts.height}"
        if facts is not None and facts.image_sha256 and m.file_sha256 != facts.image_sha256:
            return "image file is not the fact sheet's image (sha256 differs)"
        return ""

    def _fidelity(self, s, facts, facts_problem, original, row, failures) -> None:
        from medvl.samples import REASONS, validate

        if facts is None:
            row["fidelity_reason"] = f"missing score: {facts_problem}"
            return
        bad = validate(s, facts, original)
        row["fidelity_score"] = 1 - len(bad) / len(REASONS)
        row["fidelity_reason"] = ", ".join(bad) if bad else "ok: every rule of medvl.samples.validate holds"
        failures += [f"fidelity: {b}" for b in bad]

    def _alignment(self, item: dict, mismatch: str, row: dict, failures: list[str]) -> None:
        s, t = item["sample"], self.t.alignment
        prior = item["prior"]
        row["blind_prior"], row["blind_support"] = prior["share"], prior["support"]
        answerable = []
        if prior["support"] >= t.prior_min_support and prior["share"] >= t.prior_min_share:
            answerable.append(f"question-only prior: {prior['why']}")
        if self.client is not None and s.get("format") != "text":
            messages = blind_messages(s)
            if messages is not None and prior["testable"]:
                reply = self.client.complete(self.judge.model, messages, temperature=0, max_tokens=16)
                row["blind_llm"] = int(blind_correct(s, reply.text, t.short_answer_words))
                if row["blind_llm"]:
                    answerable.append(f"text-only LLM answered {reply.text.strip()[:40]!r}")
        problems = []
        if mismatch:
            problems.append("image mismatch")
        if answerable:
            if t.blind_answerable == "reject":
                problems.append("blind-answerable")
            else:
                row["flags"] = [*row["flags"], "alignment: blind-answerable"]
        row["alignment_score"] = (
            0.0
            if mismatch
            else 1.0
            - max(
                prior["share"] if prior["support"] >= t.prior_min_support else 0.0,
                float(row["blind_llm"] or 0),
            )
        )
        why = [mismatch] if mismatch else []
        why += answerable or [f"needs the image ({prior['why']})"]
        row["alignment_reason"] = "; ".join(why)
        failures += [f"alignment: {p}" for p in problems]

    def _language(self, s: dict, original: dict | None, row: dict, failures: list[str]) -> None:
        t = self.t.language
        rep = max_repetition(s)
        lang, conf = language_confidence(s)
        row["repetition"], row["lang_confidence"] = rep, conf
        problems, why = [], [f"repetition {rep:.2f}", f"language {lang} p={conf:.2f}"]
        if rep > t.max_repetition:
            problems.append("repetition")
        if conf < t.min_lang_confidence:
            problems.append("language id")
        score = min(1 - rep, conf)
        if s.get("lang") == "zh":
            if original is None:
                problems.append("translation (no English original)")
                score = None
                why.append(f"pair_id {s.get('pair_id')!r} names no English sample of this input")
            else:
                kept, broken = translation_consistency(s, original)
                row["translation"] = kept
                score = min(score, kept)
                why.append(
                    f"translation keeps {kept:.2f}" + (f", breaks {', '.join(broken)}" if broken else "")
                )
                if broken:
                    problems.append("translation")
        row["language_score"] = score
        row["language_reason"] = ("; ".join(problems) + ": " if problems else "ok: ") + ", ".join(why)
        failures += [f"language: {p}" for p in problems]

    def _clinical(self, s: dict, fdict: dict, facts_problem: str, row: dict, failures: list[str]) -> None:
        t = self.t.clinical
        if not fdict:
            row["clinical_by"] = "none"
            row["clinical_reason"] = f"missing score: {facts_problem}"
            return
        if self.client is None:
            score, why = rule_checks(s, fdict)
            row["clinical_by"] = "rules"
        else:
            url = None
            if t.judge_send_image and row["image"] and row["image_sha256"]:
                from medvl.imaging import read_image
                from medvl.llm import image_data_url

                url = image_data_url(read_image(row["image"]))
            reply = self.client.complete(
                self.judge.model, judge_messages(s, fdict, url), temperature=0, max_tokens=t.judge_max_tokens
            )
            score, why = parse_judgement(reply.text)
            row["clinical_by"] = "judge"
            row["judge_critique"] = why
            if score is None:
                row["clinical_reason"] = "missing score: judge reply malformed (no final `Score: 0|1|2` line)"
                return
        row["clinical_score"] = float(score)
        row["clinical_reason"] = f"{row['clinical_by']} score {score}: {why}"
        if score < t.min_score:
            failures.append(f"clinical: score {score}")


# -------------------------------------------------------------------------------- driver side


def decide(row: dict) -> dict:
    """The one decision rule: a sample is kept when no check failed and every dimension has a score.
    A missing score is a failure (fail closed), whatever the reason it is missing."""
    failures = list(row["failures"])
    for d in DIMENSIONS:
        if row[f"{d}_score"] is None and not any(f.startswith(f"{d}: ") for f in failures):
            failures.append(f"{d}: missing score")
    return {**row, "failures": failures, "kept": not failures}


class CrossCheck(DriverStep):
    """Duplicate images across records and near-duplicate text, against the rows kept so far."""

    columns = ("kept", "record_id", "image_sha256", "image_phash", "sample", "item")

    def __init__(self, t: Thresholds) -> None:
        self.t = t
        self.by_sha: dict[str, str] = {}
        self.phashes: list[int] = []
        self.phash_records: list[str] = []
        self.texts: dict[str, list[tuple[str, object]]] = {}  # image sha -> (item, MinHash) kept with it
        self.text_only: dict[str, object] = {}  # item -> MinHash of the kept text-only samples
        self._lsh = None

    def config(self) -> dict:
        return {"version": 1}

    def lsh(self):
        if self._lsh is None:
            from datasketch import MinHashLSH

            lang = self.t.language
            self._lsh = MinHashLSH(threshold=lang.near_duplicate_jaccard, num_perm=lang.minhash_permutations)
        return self._lsh

    def resume(self, rows: Iterable[dict]) -> None:
        for r in rows:
            if r["kept"]:
                self._keep(r, minhash(json.loads(r["sample"]), self.t.language.minhash_permutations))

    def _keep(self, row: dict, mh) -> None:
        sha = row["image_sha256"]
        if sha and sha not in self.by_sha:
            self.by_sha[sha] = row["record_id"]
            self.phashes.append(int(row["image_phash"], 16))
            self.phash_records.append(row["record_id"])
        if sha:
            self.texts.setdefault(sha, []).append((row["item"], mh))
        else:
            self.lsh().insert(row["item"], mh)
            self.text_only[row["item"]] = mh

    def _duplicate(self, row: dict) -> str:
        sha = row["image_sha256"]
        if not sha:
            return ""
        if sha in self.by_sha:
            return self.by_sha[sha] if self.by_sha[sha] != row["record_id"] else ""
        if not self.phashes:
            return ""
        d = img.hamming(int(row["image_phash"], 16), np.array(self.phashes, dtype=np.uint64))
        close = [
            i
            for i in np.flatnonzero(d <= self.t.image.duplicate_phash)
            if self.phash_records[i] != row["record_id"]
        ]
        return self.phash_records[close[0]] if close else ""

    def _near_text(self, row: dict, mh) -> str:
        sha = row["image_sha256"]
        jac = self.t.language.near_duplicate_jaccard
        if sha:
            return next((i for i, m in self.texts.get(sha, []) if mh.jaccard(m) >= jac), "")
        hits = sorted(self.lsh().query(mh)) if self.text_only else []
        return next((i for i in hits if mh.jaccard(self.text_only[i]) >= jac), "")

    def __call__(self, item: dict, outcomes: list[Outcome]) -> list[Outcome]:
        out = []
        for row in outcomes:
            if not isinstance(row, dict):
                out.append(row)
                continue
            row = dict(row)
            mh = minhash(item["sample"], self.t.language.minhash_permutations)
            dup = self._duplicate(row)
            if dup:
                row["duplicate_of"] = dup
                row["failures"] = [*row["failures"], "image: duplicate"]
                row["image_score"] = 0.0
                row["image_reason"] = f"duplicate: the image repeats record {dup}'s; {row['image_reason']}"
            near = self._near_text(row, mh)
            if near:
                row["near_duplicate_of"] = near
                row["failures"] = [*row["failures"], "language: near duplicate"]
                row["language_reason"] = f"near duplicate of item {near}; {row['language_reason']}"
            row = decide(row)
            if row["kept"]:
                self._keep(row, mh)
            out.append(row)
        return out


# -------------------------------------------------------------------------------------- run


def quality(
    gens: list[Path],
    out: Path,
    t: Thresholds,
    *,
    benchmarks: list[Path] = (),
    judge: Judge | None = None,
    workers: int = 1,
    engine: str = "local",
    part_rows: int = 1000,
    on_progress=None,
) -> dict:
    """Score, decide, and write kept.jsonl, rejected.jsonl, report.md/json and the histograms into
    `out`; returns the report. A re-run into the same folder resumes (or is a no-op)."""
    from .report import write_outputs

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    todo, files = items([Path(g) for g in gens], t)
    bench = img.benchmark_index([Path(b) for b in benchmarks])
    index = out / "benchmark_index.jsonl"
    tmp = index.with_name(index.name + ".tmp")
    img.write_index(bench, tmp)
    os.replace(tmp, index)
    fingerprint = {
        "inputs": [str(f.resolve()) for f in files],
        "inputs_sha256": _digest(files),
        "thresholds": t.model_dump(),
        "benchmarks": [str(Path(b).resolve()) for b in benchmarks],
        "benchmark_sha256": _digest([index]),
        "judge": None
        if judge is None
        else {
            "base_url": judge.base_url,
            "model": judge.model,
            "prompts": [JUDGE_PROMPT_VERSION, BLIND_PROMPT_VERSION],
        },
    }
    step = ScoreStep(t, judge, index.resolve(), fingerprint, (out / "llm-cache").resolve())
    summary = run_job(
        step,
        todo,
        out / "scores",
        driver=CrossCheck(t),
        workers=workers,
        engine=engine,
        part_rows=part_rows,
        on_progress=on_progress,
    )
    return write_outputs(out, summary, t, judge, bench, [Path(b) for b in benchmarks])
