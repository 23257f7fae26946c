"""Write a synthetic labelled image set to disk: ``images/<id>.png`` plus ``records.jsonl``, and a dataset
card beside them (``synthetic.yaml``) with which ``medvl curate`` reads them like any other source."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from medvl.synth.images import ANATOMIES, FINDINGS, GEN_MODALITIES, NO_FINDING, SPECS, UNGRADED, synthesize

RECORD_KEYS = (
    "id",
    "image",
    "modality",
    "body_region",
    "anatomy",
    "department",
    "finding",
    "bbox",
    "grade",
    "location",
    "width",
    "height",
    "seed",
)


def image_seed(seed: int, stream: int, index: int) -> int:
    """Per-image seed, so one image can be regenerated alone with ``images.synthesize(record["seed"])``."""
    return int(np.random.SeedSequence([seed, stream, index]).generate_state(1)[0])


def write_synthetic(
    out_dir: str | Path,
    n: int,
    seed: int,
    size: int = 128,
    *,
    prefix: str = "synth",
    stream: int = 0,
    records_name: str = "records.jsonl",
) -> Path:
    """Generate ``n`` images balanced across modalities (round robin) and return the records path.

    Same arguments give byte-identical files. ``prefix``/``stream`` let several sets (train, benchmark)
    share one ``images/`` folder with distinct ids and independent random streams.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / records_name
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            s = image_seed(seed, stream, i)
            img = synthesize(s, size, GEN_MODALITIES[i % len(GEN_MODALITIES)])
            rid = f"{prefix}_{i:06d}"
            rel = f"images/{rid}.png"
            Image.fromarray(img.image).save(out / rel, format="PNG", compress_level=1)
            rec = {"id": rid, "image": rel, **img.labels(), "width": size, "height": size, "seed": s}
            f.write(json.dumps({k: rec[k] for k in RECORD_KEYS}) + "\n")
    return path


CARD_NAME = "synthetic.yaml"
# The generator's body regions as medvl.vocab.BODY_REGIONS; histopathology (colon, lymph node) is viewed
# at the cell level, like every microscopy source.
REGIONS: dict[str, str] = {
    "chest": "Chest",
    "hand": "Upper limb",
    "abdomen": "Abdomen",
    "head": "Head",
    "knee": "Lower limb",
    "eye": "Eye",
    "skin": "Skin",
    "colon": "Cell",
    "lymph node": "Cell",
}
GRADE_LABEL = "grade {}"  # the grade is a label of its own, so generated text can state it


def card(name: str = "synthetic") -> dict:
    """The dataset card of a folder written by `write_quickstart_dataset` (or `write_synthetic` with
    prefixes "train" and "bench"): every ``*records.jsonl`` table, labels anatomy + finding + grade."""
    departments = {REGIONS[r]: spec.department for m in SPECS.values() for r, spec in m.items()}
    findings = [f for f in FINDINGS if f != NO_FINDING]
    grades = [GRADE_LABEL.format(g) for g in (1, 2, 3)]
    return {
        "name": name,
        "adapter": "table",
        "root": ".",
        "license": "Apache-2.0 (generated)",
        "description": "Procedural labelled images of six modalities by medvl synth (not patient data).",
        "original_task": "2D detection",
        "clinical_task": "Organ Recognition",
        "clinical_task_by_label": {
            **{f: "Disease Diagnosis" for f in findings},
            **{g: "Lesion Grading" for g in grades},
        },
        "body_region_map": REGIONS,
        "department_by_region": departments,
        "label_space": [*ANATOMIES, *findings, *grades],
        "exhaustive_labels": True,
        "split": {"from": "pattern", "patterns": {"images/train_*": "train", "images/bench_*": "test"}},
        "options": {
            "file": "*records.jsonl",
            "image_column": "image",
            "label_column": ["anatomy", "finding", "grade"],
            "skip_labels": [NO_FINDING],
            "label_formats": {"grade": GRADE_LABEL},
            "modality_column": "modality",
            "region_column": "body_region",
            "box_column": "bbox",
            "box_label_column": "finding",
        },
    }


CARD_HEADER = f"""\
# Written by medvl synth: the synthetic images of this folder as a dataset card, for
#   medvl curate --card {CARD_NAME} --out curated/
# Labels: the imaged organ (anatomy), the finding ("{NO_FINDING}" is no label: a normal image carries only
# its anatomy) and, for graded findings, "grade 1"-"grade 3" (not for {", ".join(sorted(UNGRADED))}).
# Exhaustive: the generator records every label it draws and each image shows one organ of the label
# space, so a label absent from a record is a verified negative. Split by file name: train_* images are
# training data, bench_* images the held-out benchmark (test).
"""


def write_card(out_dir: str | Path, name: str = "synthetic") -> Path:
    """Write the card (`CARD_NAME`) into a folder of synthetic images; returns its path."""
    import yaml

    path = Path(out_dir) / CARD_NAME
    path.write_text(CARD_HEADER + yaml.safe_dump(card(name), sort_keys=False, allow_unicode=True))
    return path
