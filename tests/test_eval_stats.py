"""Intervals, paired comparisons, McNemar's test, the baselines and the image-dependence verdict of
`medvl eval`, on hand-computable cases and against scipy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA
from scipy import stats
from typer.testing import CliRunner

from medvl.cli import app
from medvl.eval.baselines import build_prior
from medvl.eval.benchmarks import Item, default_train_split, load_benchmark
from medvl.eval.harness import load_prior, rescore
from medvl.eval.report import build_report, image_dependence
from medvl.eval.scoring import score
from medvl.eval.stats import BOOTSTRAP_SAMPLES, mcnemar, mean_interval, paired_difference

SLAKE = SHARED_DATA / "slake"


# ------------------------------------------------------------------ intervals


def test_mean_interval_hand_cases_and_scipy() -> None:
    assert mean_interval([]) is None
    assert mean_interval([1.0] * 7) == [1.0, 1.0]  # every resample of all-right is all-right
    # One right of three: a resample holds it 0..3 times; P(0) = 8/27 and P(3) = 1/27 both exceed
    # 2.5%, so the interval is the whole range.
    assert mean_interval([1, 0, 0]) == [0.0, 1.0]
    # 60 right of 100: the percentile bootstrap agrees with scipy's (its own resampling) to within
    # resampling noise, and both are close to the normal approximation 0.6 +- 1.96 * 0.049.
    values = [1.0] * 60 + [0.0] * 40
    lo, hi = mean_interval(values)
    ref = stats.bootstrap(
        (np.array(values),), np.mean, method="percentile", n_resamples=20000, random_state=1
    ).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.02) and hi == pytest.approx(ref.high, abs=0.02)
    assert lo == pytest.approx(0.6 - 1.96 * 0.049, abs=0.02)
    assert mean_interval(values) == [lo, hi]  # fixed seed: the same interval every time


def test_paired_difference() -> None:
    a = [1.0, 0.0, 1.0, 1.0, 0.0] * 20
    assert paired_difference(a, a) == {"n": 100, "difference": 0.0, "ci95": [0.0, 0.0]}
    b = [1.0, 0.0, 1.0, 0.0, 0.0] * 20  # A right where B is, plus one question in five
    d = paired_difference(a, b)
    assert d["difference"] == pytest.approx(0.2)
    # Per question the difference is 0 or 1 (never -1): its bootstrap is the 0/1 interval of 0.2.
    assert d["ci95"] == mean_interval([x - y for x, y in zip(a, b, strict=True)])
    assert 0 < d["ci95"][0] < 0.2 < d["ci95"][1]
    # The paired interval is narrower than the difference of two separate intervals suggests.
    la, ha = mean_interval(a)
    lb, hb = mean_interval(b)
    assert d["ci95"][1] - d["ci95"][0] < (ha - lb) - (la - hb)
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference([1.0], [1.0, 0.0])


def test_mcnemar_exact_and_chi_square() -> None:
    # 3 questions only A gets right, 10 only B, 7 both, 5 neither: 13 discordant, exact test.
    a = [True] * 3 + [False] * 10 + [True] * 7 + [False] * 5
    b = [False] * 3 + [True] * 10 + [True] * 7 + [False] * 5
    m = mcnemar(a, b)
    assert (m["a_only"], m["b_only"], m["method"]) == (3, 10, "exact binomial")
    assert m["p_value"] == pytest.approx(stats.binomtest(3, 13, 0.5).pvalue)
    # By hand: 2 * P(X <= 3), X ~ Binomial(13, 1/2) = 2 * (1 + 13 + 78 + 286) / 8192.
    assert m["p_value"] == pytest.approx(2 * 378 / 8192)
    # 30 against 10: chi-square (|30 - 10| - 1)^2 / 40 = 9.025 with one degree of freedom.
    a = [True] * 30 + [False] * 10 + [True] * 50
    b = [False] * 30 + [True] * 10 + [True] * 50
    m = mcnemar(a, b)
    assert m["method"] == "chi-square with continuity correction"
    assert m["statistic"] == pytest.approx(9.025)
    assert m["p_value"] == pytest.approx(stats.chi2.sf(9.025, 1))
    assert m["p_value"] == pytest.approx(stats.binomtest(10, 40, 0.5).pvalue, rel=0.3)  # close to exact
    assert mcnemar([True, False], [True, False])["p_value"] == 1.0


# ------------------------------------------------------------------ baselines


def _item(i: str, question: str, answer: str, kind: str = "closed", **kw) -> Item:
    t = {"closed": "CLOSED", "open": "OPEN"}.get(kind)
    groups = {"answer type": t} if t else kw.pop("groups", {})
    return Item(id=i, question=question, kind=kind, answer=answer, groups=groups, **kw)  # type: ignore[arg-type]


def _row(it: Item, prediction: str) -> dict:
    return {"id": it.id, "kind": it.kind, "question": it.question, "options": it.options,
            "answer": it.answer, "groups": it.groups, "prediction": prediction}  # fmt: skip


def test_majority_and_question_prior() -> None:
    train = [
        _item("t1", "Is this a CT?", "Yes"),
        _item("t2", "Is this a CT?", "yes."),
        _item("t3", "Is there a lesion?", "No"),
        _item("t4", "Is the heart enlarged?", "No"),
        _item("t5", "Is the heart enlarged?", "No"),
        _item("t6", "Which organ is largest?", "Liver", "open"),
        _item("t7", "What modality?", "MRI", "open"),
        _item("t8", "What modality?", "MRI", "open"),
    ]
    prior = build_prior(train, None, "train.json")
    assert prior["majority"]["CLOSED"] == "No" and prior["majority"]["OPEN"] == "MRI"
    assert (
        prior["by_question"]["is this ct"] == "Yes"
    )  # normalised question text; "Yes" and "yes." are one answer, first spelling kept
    test = [
        _item("q1", "Is this a  CT ?", "Yes"),  # seen question: prior Yes (right); majority No (wrong)
        _item("q2", "Is the lung clear?", "No"),  # unseen: both say No (right)
        _item("q3", "What modality?", "CT", "open"),  # seen: MRI (wrong); majority MRI (wrong)
        _item("q4", "Which organ is largest?", "liver", "open"),  # seen: Liver (right); majority wrong
    ]
    report = build_report([_row(it, "no") for it in test], {"bench": "vqa-rad"}, prior=prior)
    o = report["overall"]
    assert o["accuracy"] == 0.25  # the model said "no" four times
    assert o["baselines"]["majority"]["accuracy"] == 0.25  # q2
    assert o["baselines"]["question_prior"]["accuracy"] == 0.75  # q1, q2, q4
    closed = report["breakdowns"]["answer type"]["CLOSED"]["baselines"]
    assert closed["question_prior"]["closed_accuracy"] == 1.0 and closed["majority"]["closed_accuracy"] == 0.5
    assert report["baselines"]["question_prior"]["seen_questions"] == 3
    assert "training split train.json" in report["baselines"]["majority"]["source"]
    # Without a training split the majority comes from the scored answers, said so, and no prior.
    alone = build_report([_row(it, "no") for it in test], {"bench": "vqa-rad"})
    assert "question_prior" not in alone["overall"]["baselines"]
    assert "in hindsight" in alone["baselines"]["majority"]["source"]


def test_multiple_choice_prior_matches_option_text() -> None:
    opts = {"A": "CT", "B": "MRI", "C": "X-ray"}
    cat = {"category": "Modality Recognition"}
    train = [
        Item("t1", "Which modality?", "mc", "B", options=opts, groups=cat),
        Item("t2", "Which modality?", "mc", "A", options={"A": "MRI", "B": "CT"}, groups=cat),
        Item("t3", "Grade?", "mc", "C", options={"A": "I", "B": "II", "C": "III"}, groups=cat),
    ]
    prior = build_prior(train, "category", "train.tsv")
    assert prior["by_question"]["which modality"] == "MRI"
    assert prior["majority"]["Modality Recognition"] == "B"
    test = [
        Item("q1", "Which modality?", "mc", "C", options={"A": "CT", "B": "X-ray", "C": "MRI"}, groups=cat),
        Item("q2", "Which organ?", "mc", "B", options={"A": "liver", "B": "lung"}, groups=cat),
    ]
    report = build_report([_row(it, "A") for it in test], {"bench": "mc"}, prior=prior)
    b = report["overall"]["baselines"]
    assert b["question_prior"]["accuracy"] == 1.0  # q1: "MRI" is option C here; q2: majority letter B
    assert b["majority"]["accuracy"] == 0.5


@pytest.mark.skipif(not (SLAKE / "train.json").exists(), reason="shared SLAKE data not present")
def test_slake_supplies_its_training_split() -> None:
    assert default_train_split("slake", SLAKE) == SLAKE / "train.json"
    assert default_train_split("vqa-rad", SLAKE) is None
    test = load_benchmark("slake", SLAKE)
    prior = load_prior("slake", SLAKE, "test", "en", None, test)
    assert prior["source"] == str(SLAKE / "train.json") and prior["train_questions"] > 4000
    assert set(prior["majority"]) >= {"CLOSED", "OPEN"}
    train_ids = {it.id for it in load_benchmark("slake", SLAKE, split="train")}
    assert not train_ids & {it.id for it in test}  # built from the training questions only
    assert load_prior("slake", SLAKE, "train", "en", None, test) is None  # no prior for the train split
    with pytest.raises(ValueError, match="is the evaluated file"):
        load_prior("slake", SLAKE, "test", "en", SLAKE / "test.json", test)


# ------------------------------------------------------------------ image dependence and compare


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _closed_rows(n: int, right: set[int], group=lambda i: "x") -> list[dict]:
    return [
        {"id": str(i), "kind": "closed", "question": f"q{i}", "answer": "yes",
         "groups": {"organ": group(i)}, "prediction": "yes" if i in right else "no"}
        for i in range(n)
    ]  # fmt: skip


def test_image_dependence_interval_flag() -> None:
    _, scored = score(_closed_rows(40, set(range(30))))
    same = _closed_rows(40, set(range(30)))
    worse = _closed_rows(40, set(range(10)))
    dep = image_dependence(scored, {"blank": same, "shuffled": worse})
    blank, shuffled = dep["variants"]["blank"], dep["variants"]["shuffled"]
    assert blank["drop"] == 0 and blank["drop_ci95"] == [0.0, 0.0] and blank["interval_includes_0"]
    assert shuffled["drop"] == pytest.approx(0.5) and shuffled["drop_ci95"][0] > 0.3
    assert not shuffled["interval_includes_0"] and not dep["image_independent"]
    assert shuffled["mcnemar"]["a_only"] == 20 and shuffled["mcnemar"]["p_value"] < 1e-4
    assert image_dependence(scored, {"blank": same, "shuffled": same})["image_independent"]
    # A small drop on few questions: the interval includes 0, so the run is flagged.
    few = _closed_rows(40, set(range(29)))
    dep = image_dependence(scored, {"blank": few, "shuffled": few})
    assert dep["variants"]["blank"]["drop"] == pytest.approx(0.025) and dep["image_independent"]


def test_compare_two_runs(tmp_path: Path) -> None:
    group = lambda i: "liver" if i < 50 else "lung"  # noqa: E731
    a = _write(tmp_path / "a" / "predictions.jsonl", _closed_rows(100, set(range(0, 80)), group))
    # B is right on 0..39 and 80..89: A alone right on 40..79 (40), B alone on 80..89 (10).
    b_rows = _closed_rows(100, set(range(40)) | set(range(80, 90)), group)
    _write(tmp_path / "b" / "predictions.jsonl", list(reversed(b_rows)))  # matched by id, not order
    result = CliRunner().invoke(app, ["eval", "--compare", str(a.parent), str(tmp_path / "b"),
                                      "--out", str(tmp_path / "cmp")])  # fmt: skip
    assert result.exit_code == 0, result.output
    c = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert c["bootstrap"]["samples"] == BOOTSTRAP_SAMPLES
    p = next(iter(c["paired"].values()))
    o = p["overall"]
    assert (o["accuracy_a"], o["accuracy_b"], o["difference"]) == (0.8, 0.5, pytest.approx(0.3))
    assert o["ci95"][0] > 0.15 and o["ci95"][1] < 0.45
    assert (o["mcnemar"]["a_only"], o["mcnemar"]["b_only"]) == (40, 10)
    assert o["mcnemar"]["p_value"] == pytest.approx(stats.chi2.sf(29**2 / 50, 1))
    liver = p["breakdowns"]["organ"]["liver"]  # 0..49: A right on all, B on 0..39
    assert liver["difference"] == pytest.approx(0.2) and liver["mcnemar"]["method"] == "exact binomial"
    assert liver["mcnemar"]["p_value"] == pytest.approx(stats.binomtest(0, 10, 0.5).pvalue)
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| all | 100 | 80.00 | 50.00 | 30.00 [" in md and "McNemar" in md
    # Runs on different question sets are refused, with one line.
    _write(tmp_path / "c" / "predictions.jsonl", _closed_rows(99, set()))
    bad = CliRunner().invoke(app, ["eval", "--compare", str(a.parent), str(tmp_path / "c"),
                                   "--out", str(tmp_path / "cmp2")])  # fmt: skip
    assert bad.exit_code == 1
    assert "not run on the same questions (100 and 99 scored, 99 in common)" in bad.output
    assert len(bad.output.strip().splitlines()) == 1


def test_rescore_uses_the_saved_prior(tmp_path: Path) -> None:
    test = [_item("q1", "Is this a CT?", "Yes"), _item("q2", "Is it normal?", "No")]
    pred = _write(tmp_path / "predictions.jsonl", [_row(it, "maybe") for it in test])
    prior = build_prior([_item("t1", "Is this a CT?", "Yes"), _item("t2", "Is it big?", "Yes")], None, "t")
    (tmp_path / "prior.json").write_text(json.dumps(prior))
    report = rescore(pred)
    assert report["overall"]["baselines"]["question_prior"]["accuracy"] == 0.5  # q1 seen; q2 -> Yes
    md = (tmp_path / "report.md").read_text()
    assert "question prior % [95% CI]" in md and "1 of 2 questions were asked" in md
