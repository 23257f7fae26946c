"""Scoring, loaders and reports of `medvl eval`, without a model."""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from medvl.eval.benchmarks import BenchmarkError, load_benchmark
from medvl.eval.harness import rescore
from medvl.eval.report import REFERENCE_COLUMNS, load_reference
from medvl.eval.scoring import (
    extract_choice,
    normalize_answer,
    read_predictions,
    score,
    token_recall,
)
from medvl.prompts import build_prompt

HANDSCORED = Path(__file__).parent / "data" / "eval" / "predictions_handscored.jsonl"
OPTS = {"A": "CT", "B": "MR", "C": "X-ray", "D": "PET"}


# ------------------------------------------------------------------ the multiple-choice chain


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("B", "B"),
        ("B. MR", "B"),
        ("(C)", "C"),
        ("The answer is D.", "D"),
        ("  B  ", "B"),  # whitespace around a lone letter
        ("Answer: **A**", "A"),  # * and : are separators
        ("b", None),  # letters are case-sensitive: "a"/"b" may be words
        ("mr", "B"),  # option text is matched case-insensitively
        ("It is an x-ray", "C"),  # option text inside an answer (at most twice the options' length)
        ("A or B", None),  # several letters: no letter wins, and no option text is inside
        ("B, not C", None),
        (
            "A 45-year-old man, the image shows a clear lesion of the liver",
            None,
        ),  # letter not among the last tokens
        ("Cannot determine the answer", "Z"),  # refusal
        ("I'm sorry, but without the image provided I cannot say", "Z"),
        ("Z", "Z"),
        ("", None),
        ("I don't know", None),
    ],
)
def test_extract_choice_cases(prediction: str, expected: str | None) -> None:
    assert extract_choice(prediction, OPTS) == expected


def test_extract_choice_option_inside_another() -> None:
    opts = {"A": "lung", "B": "lung cancer", "C": "pneumonia"}
    assert extract_choice("lung cancer", opts) is None  # "lung" is inside "lung cancer": both match
    assert extract_choice("pneumonia of the left lower lobe", opts) == "C"
    assert extract_choice("B. lung cancer", opts) == "B"  # a lone letter is tried first


def test_extract_choice_chinese() -> None:
    opts = {"A": "肝脏", "B": "肺", "C": "肾脏"}
    assert extract_choice("B. 肺", opts) == "B"
    assert extract_choice("图中是肝脏", opts) == "A"  # option text inside a Chinese sentence
    # No spaces in Chinese: "答案：B" is one token (the full-width colon is no separator) and no
    # option text occurs in it, so it stays unresolved, as in VLMEvalKit.
    assert extract_choice("答案：B", opts) is None


def test_normalisation_and_recall() -> None:
    assert normalize_answer(" Yes. ") == "yes"
    assert normalize_answer("The Liver") == "liver"
    assert normalize_answer("ＣＴ") == "ct"  # full-width letters (NFKC)
    assert token_recall("lung", "Lung, Spinal Cord") == pytest.approx(1 / 3)
    assert token_recall("the spinal cord and lung", "Lung, Spinal Cord") == 1.0
    assert token_recall("肝", "肝脏") == 0.5  # CJK characters are tokens
    assert token_recall("anything", "") == 0.0


def test_prompt_format() -> None:
    assert build_prompt("Which modality?", {"A": "CT", "B": "MR"}) == (
        "Which modality?\nA. CT\nB. MR\nAnswer with the option's letter from the given choices directly."
    )
    assert (
        build_prompt(" Is this a CT? ", {})
        == "Is this a CT?\nAnswer the question using a single word or phrase."
    )


# ------------------------------------------------------------------ the hand-scored prediction file


def test_handscored_file() -> None:
    """Every number below was worked out by hand from the 13 rows of the file (see the comments)."""
    metrics, scored = score(read_predictions(HANDSCORED))
    by_id = {r["id"]: r for r in scored}
    # m1 "B. MR"->B right; m2 "MR"->B wrong; m3 "I think it is C"->C right; m4 "lung cancer" matches
    # both "lung" and "lung cancer"->unresolved; m5 refusal->Z; m6 "A or C"->unresolved.
    assert [by_id[i]["choice"] for i in ("m1", "m2", "m3", "m4", "m5", "m6")] == [
        "B",
        "B",
        "C",
        None,
        "Z",
        None,
    ]
    o = metrics["overall"]
    assert o["n"] == 12 and metrics["unscored"] == 1  # u1 has no gold answer
    assert o["accuracy"] == pytest.approx(5 / 12)  # m1, m3, c1, c3, o2
    assert o["unresolved"] == 2 and o["refused"] == 1
    assert o["random_guess"] == pytest.approx((5 * 0.25 + 1 / 3) / 6)  # m3 has three options
    assert o["closed_n"] == 3 and o["closed_accuracy"] == pytest.approx(2 / 3)  # "yes." and " left " match
    assert o["open_n"] == 3
    assert o["open_exact_match"] == pytest.approx(1 / 3)  # only "The liver" == "Liver"
    assert o["open_recall"] == pytest.approx((1 / 3 + 1 + 1 / 2) / 3)
    cat = metrics["breakdowns"]["category"]
    assert cat["Modality Recognition"]["accuracy"] == pytest.approx(2 / 3)
    assert cat["Modality Recognition"]["random_guess"] == pytest.approx((0.25 + 0.25 + 1 / 3) / 3)
    assert cat["Disease Diagnosis"] == {
        "n": 3,
        "accuracy": 0.0,
        "random_guess": 0.25,
        "unresolved": 2,
        "refused": 1,
        # Every resample of three wrong answers is wrong; all have four options.
        "ci95": {"accuracy": [0.0, 0.0], "random_guess": [0.25, 0.25]},
    }
    at = metrics["breakdowns"]["answer type"]
    assert at["CLOSED"]["closed_accuracy"] == pytest.approx(2 / 3)
    assert at["OPEN"]["open_recall"] == pytest.approx(11 / 18)


def test_rescore_writes_reports_and_submission(tmp_path: Path) -> None:
    pred = tmp_path / "run" / "predictions.jsonl"
    pred.parent.mkdir()
    shutil.copy(HANDSCORED, pred)
    report = rescore(pred, tmp_path / "out", bench="mc")
    assert report["overall"]["accuracy"] == pytest.approx(5 / 12)
    out = tmp_path / "out"
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    md = (out / "report.md").read_text()
    assert "Research use only" in md or "research use only" in md.lower()
    # accuracy [interval], random guess, majority baseline (D, the first of three tied answers: right
    # once, and a resample of three can hold it 0 to 3 times), unresolved, refused.
    assert "| Disease Diagnosis | 3 | 0.00 [0.00, 0.00] | 25.00 | 33.33 [0.00, 100.00] | 2 | 1 |" in md
    assert (out / "report.png").stat().st_size > 1000
    assert len((out / "scored.jsonl").read_text().splitlines()) == 12
    sub = list(csv.reader((out / "submission.tsv").open(), delimiter="\t"))
    assert sub == [["index", "prediction", "choice"], ["u1", "A", "A"]]


def test_torn_last_line_is_ignored_but_other_bad_lines_fail(tmp_path: Path) -> None:
    lines = HANDSCORED.read_text().splitlines()
    torn = tmp_path / "torn.jsonl"
    torn.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
    assert [r["id"] for r in read_predictions(torn)] == ["m1", "m2", "m3"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n{oops\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match="bad.jsonl line 2"):
        read_predictions(bad)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"id": "x", "kind": "mc", "answer": "A", "prediction": "A"}) + "\n")
    with pytest.raises(ValueError, match="options"):
        read_predictions(missing)


# ------------------------------------------------------------------ loaders


def _png(color: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (color, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _write_tsv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)


def test_gmai_mmbench_val_and_test(tmp_path: Path) -> None:
    img = base64.b64encode(_png()).decode()
    base = {
        "question": "Which organ?",
        "A": "liver",
        "B": "kidney",
        "C": "",
        "D": "",
        "E": "",
        "clinical VQA task": "Organ Recognition - Abdomen",
        "department": "Urology",
        "perceptual granularity": "Image Level",
        "modality": "CT",
    }
    val = tmp_path / "GMAI-MMBench_VAL.tsv"
    # Row 2 refers to row 1's image by its index, as VLMEvalKit stores repeated images.
    _write_tsv(
        val,
        [
            {"index": "1", "image": img, **base, "answer": "B"},
            {"index": "2", "image": "1", **base, "answer": "A"},
        ],
    )
    items = load_benchmark("gmai-mmbench", val)
    assert [it.answer for it in items] == ["B", "A"] and items[0].options == {"A": "liver", "B": "kidney"}
    assert items[1].load_images()[0].size == (16, 16)
    assert items[0].groups["clinical VQA task"] == "Organ Recognition - Abdomen"
    test = tmp_path / "GMAI-MMBench_TEST.tsv"
    _write_tsv(test, [{"index": "7", "image": img, **base}])
    assert load_benchmark("gmai-mmbench", test)[0].answer == ""
    broken = tmp_path / "broken.tsv"
    _write_tsv(broken, [{"index": "1", "image": img, "question": "q", "A": "x", "B": "y", "answer": "A"}])
    with pytest.raises(BenchmarkError, match=r"broken.tsv line 2: missing column 'clinical VQA task'"):
        load_benchmark("gmai-mmbench", broken)


def test_mc_tsv_errors(tmp_path: Path) -> None:
    path = tmp_path / "mc.tsv"
    _write_tsv(
        path,
        [
            {
                "index": "1",
                "image": "x",
                "question": "q",
                "A": "a",
                "B": "b",
                "answer": "C",
                "category": "Lesion Grading",
            }
        ],
    )
    with pytest.raises(BenchmarkError, match="answer 'C' is not one of the options"):
        load_benchmark("mc", path)
    with pytest.raises(BenchmarkError, match="not found"):
        load_benchmark("mc", tmp_path / "absent.tsv")
    with pytest.raises(BenchmarkError, match="unknown benchmark"):
        load_benchmark("nope", path)


def test_broken_image_cell_is_named_before_the_model_loads(tmp_path: Path) -> None:
    good = base64.b64encode(_png()).decode()
    row = {"question": "q", "A": "a", "B": "b", "answer": "A", "category": "Modality Recognition"}
    rows = [{"index": str(i), "image": good, **row} for i in range(3)]
    rows[2]["image"] = good[:-3]  # a cut cell: base64 padding broken
    path = tmp_path / "bench.tsv"
    _write_tsv(path, rows)
    with pytest.raises(BenchmarkError, match=r"bench.tsv line 4, column 2 \(image\): not valid base64"):
        load_benchmark("mc", path)
    rows[2]["image"] = base64.b64encode(b"plain text, not a picture").decode()
    _write_tsv(path, rows)
    with pytest.raises(BenchmarkError, match=r"line 4, column 2 \(image\): the 25 decoded bytes are not"):
        load_benchmark("mc", path)
    # The command line: one line naming the file, line and column; the model folder does not exist,
    # so a message about the benchmark proves the file was checked before any model was loaded.
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "medvl"), "eval", "--model", str(tmp_path / "no-model"),
         "--bench", "mc", "--data", str(path), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bench.tsv line 4, column 2 (image)" in lines[0], proc.stderr


def test_mmmu_keeps_health_validation_choice_rows(tmp_path: Path) -> None:
    img = json.dumps([base64.b64encode(_png(1)).decode(), base64.b64encode(_png(2)).decode()])
    rows = [
        {
            "index": "1",
            "image": img,
            "question": "<image 1> <image 2> q",
            "A": "x",
            "B": "y",
            "answer": "A",
            "category": "Pharmacy",
            "split": "validation",
        },
        {
            "index": "2",
            "image": img,
            "question": "q",
            "A": "x",
            "B": "y",
            "answer": "B",
            "category": "Art",
            "split": "validation",
        },
        {
            "index": "3",
            "image": img,
            "question": "q",
            "A": "",
            "B": "",
            "answer": "42",
            "category": "Pharmacy",
            "split": "validation",
        },
        {
            "index": "4",
            "image": img,
            "question": "q",
            "A": "x",
            "B": "y",
            "answer": "A",
            "category": "Public_Health",
            "split": "dev",
        },
    ]
    path = tmp_path / "MMMU_DEV_VAL.tsv"
    _write_tsv(path, rows)
    items = load_benchmark("mmmu", path)
    assert [it.id for it in items] == ["1"] and len(items[0].load_images()) == 2
    assert items[0].groups == {"subject": "Pharmacy"}


def test_omnimedvqa_native_json(tmp_path: Path) -> None:
    (tmp_path / "Images" / "X").mkdir(parents=True)
    (tmp_path / "Images" / "X" / "a.png").write_bytes(_png())
    qa = tmp_path / "QA_information" / "Open-access"
    qa.mkdir(parents=True)
    rows = [
        {
            "question_id": "q1",
            "question_type": "Modality Recognition",
            "question": "Modality?",
            "gt_answer": "MR",
            "option_A": "CT",
            "option_B": "MR",
            "image_path": "Images/X/a.png",
            "modality_type": "MR",
        },
        # The known variant spells the field `modality` and may leave options C/D out.
        {
            "question_id": "q2",
            "question_type": "Lesion Grading",
            "question": "Grade?",
            "gt_answer": "II",
            "option_A": "I",
            "option_B": "II",
            "option_C": "III",
            "image_path": "Images/X/a.png",
            "modality": "CT",
        },
    ]
    (qa / "X.json").write_text(json.dumps(rows))
    items = load_benchmark("omnimedvqa", tmp_path / "QA_information")
    assert [(it.answer, it.groups["modality"], len(it.options)) for it in items] == [
        ("B", "MR", 2),
        ("B", "CT", 3),
    ]
    rows[0]["gt_answer"] = "PET"
    (qa / "X.json").write_text(json.dumps(rows))
    with pytest.raises(BenchmarkError, match="gt_answer 'PET' matches no option"):
        load_benchmark("omnimedvqa", tmp_path / "QA_information")


def test_vqa_rad_both_layouts(tmp_path: Path) -> None:
    (tmp_path / "VQA_RAD Image Folder").mkdir()
    (tmp_path / "VQA_RAD Image Folder" / "synpic1.jpg").write_bytes(_png())
    rows = [
        {
            "qid": 1,
            "image_name": "synpic1.jpg",
            "question": "Is it normal?",
            "answer": "yes",
            "answer_type": "CLOSED ",
            "phrase_type": "test_freeform",
        },
        {
            "qid": 2,
            "image_name": "synpic1.jpg",
            "question": "What organ?",
            "answer": " liver ",
            "answer_type": "OPEN",
            "phrase_type": "test_para",
        },
        {
            "qid": 3,
            "image_name": "synpic1.jpg",
            "question": "Train?",
            "answer": "no",
            "answer_type": "CLOSED",
            "phrase_type": "freeform",
        },
    ]
    (tmp_path / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    items = load_benchmark("vqa-rad", tmp_path)
    assert [(it.id, it.kind, it.answer, it.groups["answer type"]) for it in items] == [
        ("1", "closed", "yes", "CLOSED"),
        ("2", "open", "liver", "OPEN"),
    ]
    (tmp_path / "testset.json").write_text(json.dumps(rows[2:]))  # the variant: every row is test
    assert [it.id for it in load_benchmark("vqa-rad", tmp_path / "testset.json")] == ["3"]
    rows[0]["answer_type"] = "MAYBE"
    (tmp_path / "testset.json").write_text(json.dumps(rows[:1]))
    with pytest.raises(BenchmarkError, match="answer_type 'MAYBE'"):
        load_benchmark("vqa-rad", tmp_path / "testset.json")


def test_pmc_vqa_csv(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "f1.jpg").write_bytes(_png())
    path = tmp_path / "test_clean.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D"])
        w.writerow(["f1.jpg", "What scan?", "B:MRI", " A:CT ", " B:MRI", " C:PET", " D:US"])
    (item,) = load_benchmark("pmc-vqa", path)
    assert item.options == {"A": "CT", "B": "MRI", "C": "PET", "D": "US"} and item.answer == "B"


def test_pathvqa_parquet_and_pickle_refused(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "test.parquet"
    table = pa.table(
        {
            "image": [{"bytes": _png(), "path": None}] * 2,
            "question": ["Is it?", "What?"],
            "answer": ["yes", "fibrosis"],
        }
    )
    pq.write_table(table, path)
    items = load_benchmark("pathvqa", path)
    assert [it.kind for it in items] == ["closed", "open"] and items[0].load_images()[0].size == (16, 16)
    with pytest.raises(BenchmarkError, match="pickle"):
        load_benchmark("pathvqa", tmp_path / "test_qa.pkl")


# ------------------------------------------------------------------ reference rows


def test_reference_rows_are_consistent() -> None:
    ref = load_reference()
    for name, table in ref["tables"].items():
        for model, values in table["rows"].items():
            assert len(values) == len(table["columns"]), (name, model)
    for bench, (table, columns) in REFERENCE_COLUMNS.items():
        assert set(columns) <= set(ref["tables"][table]["columns"]), bench
    t2 = ref["tables"]["table2"]
    assert t2["rows"]["GMAI-VL"] == [66.3, 72.9, 54.3, 64.5]  # also stated in the paper's text
    t3 = ref["tables"]["table3"]
    assert t3["rows"]["GMAI-VL"][-1] == 88.48
