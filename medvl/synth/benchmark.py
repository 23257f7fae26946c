"""The synthetic set's held-out multiple-choice benchmark (five OmniMedVQA question types) and the
quickstart's data folder: labelled images, their records, the dataset card `medvl curate` reads, and the
benchmark as a VLMEvalKit TSV.

Training data is not written here: the quickstart curates these images by their card and generates its
instruction data with `medvl generate`, the same path a user's real datasets take. This benchmark keeps
its own question wording, so a model is tested on phrasings it was not trained on (`medvl synth` writes
it); the quickstart's benchmark is the engine's own multiple-choice items of the test split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medvl.prompts import OPTION_LETTERS
from medvl.records import read_rows
from medvl.samples import write_vlmeval_tsv
from medvl.synth.dataset import write_card, write_synthetic
from medvl.synth.images import ANATOMIES, FINDINGS, GEN_MODALITIES, NO_FINDING, QUADRANTS, SPECS
from medvl.vocab import OMNIMEDVQA_QUESTION_TYPES

# Four options per synthetic multiple-choice question, as in OmniMedVQA.
LETTERS = OPTION_LETTERS[:4]
GRADES = ("grade 1", "grade 2", "grade 3")
MODALITY_Q, ANATOMY_Q, DISEASE_Q, GRADE_Q, ATTRIBUTE_Q = OMNIMEDVQA_QUESTION_TYPES

QUESTIONS: dict[str, tuple[str, ...]] = {
    MODALITY_Q: (
        "What imaging modality was used to acquire this image?",
        "Which modality is shown in this image?",
        "What type of medical imaging is this?",
    ),
    ANATOMY_Q: (
        "Which anatomical structure is shown in this image?",
        "What organ or structure is the focus of this image?",
        "Which anatomy does this image show?",
    ),
    DISEASE_Q: (
        "What finding is present in this image?",
        "What is the most likely diagnosis based on this image?",
        "Which abnormality, if any, can be seen in this image?",
    ),
    GRADE_Q: (
        "What is the grade of the {finding} in this image?",
        "How would you grade the {finding} shown here?",
    ),
    ATTRIBUTE_Q: (
        "In which quadrant of the image is the {finding} located?",
        "Where in the image is the {finding}?",
    ),
}
# ---------------------------------------------------------------------------------------------------
# multiple choice


def _options(rng: np.random.Generator, correct: str, pool, prefer=()) -> tuple[list[str], int]:
    """Up to 4 unique options: the answer plus distractors, preferring ``prefer`` (harder ones)."""
    pref = [p for p in dict.fromkeys(prefer) if p != correct]
    rest = [p for p in dict.fromkeys(pool) if p != correct and p not in pref]
    pref = [pref[i] for i in rng.permutation(len(pref))]
    rest = [rest[i] for i in rng.permutation(len(rest))]
    opts = [correct] + (pref + rest)[:3]
    opts = [opts[i] for i in rng.permutation(len(opts))]
    return opts, opts.index(correct)


def mc_items(rec: dict, rng: np.random.Generator) -> list[tuple[str, str, list[str], int]]:
    """All applicable (question type, question, options, answer index) for one record."""

    def q(kind: str) -> str:
        return str(rng.choice(QUESTIONS[kind])).format(finding=rec["finding"])

    items = [(MODALITY_Q, q(MODALITY_Q), *_options(rng, rec["modality"], GEN_MODALITIES))]
    items.append((ANATOMY_Q, q(ANATOMY_Q), *_options(rng, rec["anatomy"], ANATOMIES)))
    same = [f for s in SPECS[rec["modality"]].values() for f in s.findings] + [NO_FINDING]
    items.append((DISEASE_Q, q(DISEASE_Q), *_options(rng, rec["finding"], FINDINGS, same)))
    if rec["grade"]:
        opts = list(GRADES)  # in order: grades are ordinal
        items.append((GRADE_Q, q(GRADE_Q), opts, rec["grade"] - 1))
    if rec["location"]:
        items.append((ATTRIBUTE_Q, q(ATTRIBUTE_Q), *_options(rng, rec["location"], QUADRANTS)))
    return items


def mc_benchmark(records: list[dict], rng: np.random.Generator) -> list[dict]:
    """VLMEvalKit-style rows: index, image, question, A-D ("" when absent), answer letter, category."""
    rows = []
    for rec in records:
        for kind, question, opts, ans in mc_items(rec, rng):
            row = {"index": len(rows), "image": rec["image"], "question": question}
            row.update({LETTERS[i]: (opts[i] if i < len(opts) else "") for i in range(4)})
            row.update({"answer": LETTERS[ans], "category": kind})
            rows.append(row)
    return rows


def write_quickstart_dataset(
    out_dir: str | Path, n_train: int, n_bench: int, seed: int, size: int = 128, benchmark: bool = True
) -> dict:
    """Write the quickstart's data folder: ``images/``, ``records.jsonl`` (train), ``bench_records.jsonl``,
    the card ``synthetic.yaml`` (train/test split by file name) and, with `benchmark`,
    ``bench/synth_mc.tsv`` in this module's own wording. The same arguments give byte-identical files.
    The quickstart itself asks the data engine for its benchmark (`medvl.generate.benchmark`)."""
    out = Path(out_dir)
    rec_path = write_synthetic(
        out, n_train, seed, size, prefix="train", stream=0, records_name="records.jsonl"
    )
    bench_path = write_synthetic(
        out, n_bench, seed, size, prefix="bench", stream=1, records_name="bench_records.jsonl"
    )
    paths = {
        "images": out / "images",
        "records": rec_path,
        "bench_records": bench_path,
        "card": write_card(out),
    }
    if benchmark:
        rows = mc_benchmark(read_rows(bench_path), np.random.default_rng([seed, 3]))
        paths["bench_tsv"] = write_vlmeval_tsv(rows, out, out / "bench" / "synth_mc.tsv")
    return paths
