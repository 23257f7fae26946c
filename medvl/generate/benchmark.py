"""A held-out multiple-choice benchmark from the engine's own perception items.

Run `generate` on a split that training never sees (the quickstart's test split, or any source's) with
the perception format only, and this writes its samples as a VLMEvalKit TSV that `medvl eval --bench mc`
reads and `medvl quality --benchmark` guards. This is how OmniMedVQA and GMAI-MMBench are built: labels
of classification, detection and segmentation datasets turned into multiple-choice questions. The images
are held out; the question wording and the distractor rules are those of the training data, so such a
benchmark measures whether a model reads the images, not whether it carries over to new phrasings.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from medvl.prompts import IMAGE_TOKEN, OPTION_LETTERS
from medvl.samples import write_vlmeval_tsv
from medvl.vocab import OMNIMEDVQA_QUESTION_TYPES

MODALITY, ANATOMY, DISEASE, GRADE, OTHER = OMNIMEDVQA_QUESTION_TYPES
# A perception item's kind (medvl.generate.template.perception_items) -> OmniMedVQA's question type.
CATEGORY = {
    "modality": MODALITY,
    "body region": ANATOMY,
    "present:Organ Recognition": ANATOMY,
    "present:Disease Diagnosis": DISEASE,
    "present:Lesion Grading": GRADE,
}
# Four options at most, as in OmniMedVQA and the TSV's A-D columns.
MAX_OPTIONS = 4


def category(kind: str) -> str:
    """The OmniMedVQA question type of a perception item (box label, quadrant, count: other attributes)."""
    return CATEGORY.get(kind, OTHER)


def benchmark_rows(samples: Iterable[dict]) -> list[dict]:
    """Perception samples -> VLMEvalKit rows: index, image (path), question, A-D, answer, category. The
    question is the sample's first user turn without the image token, the options and the instruction
    (the evaluator adds its own)."""
    rows = []
    for s in samples:
        if s.get("format") != "perception":
            continue
        opts = list(s["options"])
        if len(opts) > MAX_OPTIONS:
            raise ValueError(f"sample {s['id']}: {len(opts)} options; a benchmark row holds {MAX_OPTIONS}")
        prompt = s["conversations"][0]["value"].replace(IMAGE_TOKEN, "").strip()
        row = {"index": len(rows), "image": s["image"], "question": prompt.split("\n")[0].strip()}
        row.update(
            {letter: (opts[i] if i < len(opts) else "") for i, letter in enumerate(OPTION_LETTERS[:4])}
        )
        row.update({"answer": s["answer"], "category": category(str(s.get("kind", "")))})
        rows.append(row)
    return rows


def write_benchmark(samples: Iterable[dict], root: str | Path, path: str | Path) -> Path:
    """Write the perception samples of a generation job (`root` is its output folder, where their image
    paths point) as a VLMEvalKit TSV at `path`."""
    return write_vlmeval_tsv(benchmark_rows(samples), root, path)
