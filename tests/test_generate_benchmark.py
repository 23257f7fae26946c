"""A held-out benchmark from the engine's perception items (medvl.generate.benchmark): generated from the
test split only, every row's gold is a fact of its record, the TSV reads back through `medvl eval`'s
multiple-choice loader with the generated image's bytes."""

from __future__ import annotations

import base64
import copy

import pytest
from test_generate import record, write_curated

from medvl.eval.benchmarks import load_mc
from medvl.generate.benchmark import CATEGORY, benchmark_rows, category, write_benchmark
from medvl.generate.pipeline import generate
from medvl.generate.template import TemplateBackend
from medvl.records import read_rows
from medvl.vocab import OMNIMEDVQA_QUESTION_TYPES


def test_benchmark_from_the_test_split_reads_back_through_eval(tmp_path):
    rows = [record(i, split="test" if i % 2 else "train") for i in range(8)]
    rows[1] = record(1, split="test", modality="MR", body_region="Head", id="hand/mr0001.png")
    curated = write_curated(tmp_path / "curated", rows)
    out = tmp_path / "bench"
    report = generate(
        [curated], out, TemplateBackend(), splits=("test",), formats=("perception",), zh_share=0.0
    )
    assert report["kept"] > 0 and report["rejected"] == 0
    samples = read_rows(out / "samples.jsonl")
    assert {s["provenance"]["split"] for s in samples} == {"test"}  # the train records never become questions
    assert {s["provenance"]["record_id"] for s in samples} == {r["id"] for r in rows if r["split"] == "test"}
    by_id = {r["id"]: r for r in rows}

    tsv = write_benchmark(samples, out, out / "mc.tsv")
    items = load_mc(tsv)
    assert len(items) == len(samples) == len(benchmark_rows(samples))
    kinds = set()
    for s, item in zip(samples, items, strict=True):
        rec, kind = by_id[s["provenance"]["record_id"]], s["kind"]
        kinds.add(kind)
        gold = item.options[item.answer]
        assert gold == s["options"]["ABCD".index(s["answer"])]
        assert item.question in s["conversations"][0]["value"] and "\n" not in item.question
        assert item.groups["category"] == category(kind) in OMNIMEDVQA_QUESTION_TYPES
        if kind == "modality":
            assert gold == rec["modality"]
        elif kind == "body region":
            assert gold == rec["body_region"]
        elif kind.startswith("present:"):
            assert gold.lower() in {x.lower() for x in rec["labels"]}
        assert base64.b64decode(item.images[0]) == (out / s["image"]).read_bytes()
    assert {"modality", "body region"} <= kinds
    assert {item.groups["category"] for item in items} >= {CATEGORY["modality"], CATEGORY["body region"]}


def test_only_perception_samples_become_rows_and_too_many_options_fail():
    mc = {
        "id": "r:perception:0:en",
        "format": "perception",
        "image": "images/x.png",
        "conversations": [{"from": "human", "value": "<image>\nWhich modality?\nA. CT\nB. MR"}],
        "options": ["CT", "MR"],
        "answer": "A",
        "kind": "modality",
    }
    caption = {**mc, "format": "caption", "id": "r:caption:0:en"}
    rows = benchmark_rows([caption, mc])
    assert rows == [
        {
            "index": 0,
            "image": "images/x.png",
            "question": "Which modality?",
            "A": "CT",
            "B": "MR",
            "C": "",
            "D": "",
            "answer": "A",
            "category": "Modality Recognition",
        }
    ]
    wide = copy.deepcopy(mc)
    wide["options"] = ["CT", "MR", "X-ray", "PET", "US"]
    with pytest.raises(ValueError, match="r:perception:0:en: 5 options"):
        benchmark_rows([wide])
