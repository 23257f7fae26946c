"""Reports: JSON, Markdown and plots, with the reference's published numbers beside this run's."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import yaml

from medvl import RESEARCH_ONLY
from medvl.eval.baselines import BASELINES, baseline_predictions
from medvl.eval.matching import MATCHING_VERSION, extract_choice
from medvl.eval.scoring import normalize_answer, read_predictions, score, score_row
from medvl.eval.stats import BOOTSTRAP_INFO, mcnemar, paired_difference

REFERENCE_FILE = Path(__file__).with_name("reference_results.yaml")
# The baselines' metrics shown beside the model's.
BASELINE_METRICS = ("accuracy", "closed_accuracy", "open_recall", "open_exact_match")

# The breakdown each benchmark is plotted by.
PRIMARY_BREAKDOWN = {
    "mc": "category",
    "omnimedvqa": "question type",
    "gmai-mmbench": "clinical VQA task",
    "mmmu": "subject",
    "slake": "content type",
    "vqa-rad": "answer type",
    "pathvqa": "answer type",
    "synth3d": "category",
    "m3d-vqa": "question type",
    "ct-rate-vqa": "question type",
}

_MMMU = {
    "BMS": "Basic_Medical_Science",
    "CM": "Clinical_Medicine",
    "DLM": "Diagnostics_and_Laboratory_Medicine",
    "P": "Pharmacy",
    "PH": "Public_Health",
}
# GMAI-MMBench's clinical VQA task names behind Table 5's abbreviations.
_GMAI_TASKS = {
    "AR": "Attribute Recognition",
    "BVR": "Blood Vessels Recognition",
    "B": "Bone",
    "CR": "Cell Recognition",
    "C": "Counting",
    "DD": "Disease Diagnosis",
    "IQG": "Image Quality Grading",
    "MR": "Microorganism Recognition",
    "M": "Muscle",
    "NT": "Nervous Tissue",
    "OR-A": "Organ Recognition - Abdomen",
    "OR-HN": "Organ Recognition - Head and Neck",
    "OR-P": "Organ Recognition - Pelvic",
    "OR-T": "Organ Recognition - Thorax",
    "SG": "Severity Grading",
    "SAR": "Surgeon Action Recognition",
    "SIR": "Surgical Instrument Recognition",
    "SWR": "Surgical Workflow Recognition",
}
_OMNI = (
    "Modality Recognition",
    "Anatomy Identification",
    "Disease Diagnosis",
    "Lesion Grading",
    "Other Biological Attributes",
)

# benchmark -> (reference table, {column: (breakdown or None for overall, group value, metric)}).
REFERENCE_COLUMNS: dict[str, tuple[str, dict[str, tuple[str | None, str | None, str]]]] = {
    "vqa-rad": ("table2", {"VQA-RAD": (None, None, "closed_accuracy")}),
    "slake": ("table2", {"SLAKE": (None, None, "closed_accuracy")}),
    "pmc-vqa": ("table2", {"PMC-VQA": (None, None, "accuracy")}),
    "omnimedvqa": (
        "table3",
        {**{t: ("question type", t, "accuracy") for t in _OMNI}, "Overall": (None, None, "accuracy")},
    ),
    "mmmu": (
        "table4",
        {
            **{k: ("subject", v, "accuracy") for k, v in _MMMU.items()},
            "MMMU Health & Medicine": (None, None, "accuracy"),
        },
    ),
    "gmai-mmbench": (
        "table5",
        {
            "Overall (val)": (None, None, "accuracy"),
            **{k: ("clinical VQA task", v, "accuracy") for k, v in _GMAI_TASKS.items()},
        },
    ),
}


def load_reference() -> dict:
    return yaml.safe_load(REFERENCE_FILE.read_text(encoding="utf-8"))


def _lookup(report: dict, breakdown: str | None, value: str | None, metric: str) -> float | None:
    if breakdown is None:
        return report["overall"].get(metric)
    groups = {k.lower(): v for k, v in report["breakdowns"].get(breakdown, {}).items()}
    return groups.get(value.lower(), {}).get(metric)


def reference_for(bench: str, report: dict) -> dict | None:
    """The published rows for this benchmark, and this run's numbers in the same columns (percent)."""
    if bench not in REFERENCE_COLUMNS:
        return None
    ref = load_reference()
    key, columns = REFERENCE_COLUMNS[bench]
    table = ref["tables"][key]
    index = [table["columns"].index(c) for c in columns]
    this_run = {}
    for column, (breakdown, value, metric) in columns.items():
        v = _lookup(report, breakdown, value, metric)
        this_run[column] = None if v is None else round(100 * v, 2)
    return {
        "source": ref["source"],
        "table": table["caption"],
        "note": table.get("note", ""),
        "columns": list(columns),
        "this_run_metric": sorted({m for _, _, m in columns.values()}),
        "rows": {model: [values[i] for i in index] for model, values in table["rows"].items()},
        "this_run": this_run,
    }


def image_dependence(scored: list[dict], variants: dict[str, list[dict]]) -> dict:
    """Accuracy with the real images against blank/shuffled ones, on the questions both runs
    answered: the drop with its paired-bootstrap interval and McNemar's test. A variant whose drop
    interval reaches 0 (or lies below it) shows no measurable dependence on the image; the run is
    flagged `image_independent` when that holds for every variant."""
    base = {r["id"]: r for r in scored}
    out: dict = {"bootstrap": BOOTSTRAP_INFO, "variants": {}}
    for name, rows in variants.items():
        pairs = [(base[r["id"]], score_row(r)) for r in rows if r["id"] in base]
        if not pairs:
            continue
        n = len(pairs)
        with_images = [float(a["correct"]) for a, _ in pairs]
        without = [float(b["correct"]) for _, b in pairs]
        drop = paired_difference(with_images, without)
        changed = (
            sum(normalize_answer(a["prediction"]) != normalize_answer(b["prediction"]) for a, b in pairs) / n
        )
        out["variants"][name] = {
            "n": n,
            "accuracy_with_images": sum(with_images) / n,
            "accuracy": sum(without) / n,
            "drop": drop["difference"],
            "drop_ci95": drop["ci95"],
            "interval_includes_0": drop["ci95"][0] <= 0,
            "mcnemar": mcnemar(with_images, without),
            "answers_changed": changed,
        }
    flags = [v["interval_includes_0"] for v in out["variants"].values()]
    out["image_independent"] = bool(flags) and all(flags)
    return out


def add_baselines(metrics: dict, scored: list[dict], prior: dict | None, category: str | None) -> dict:
    """Score the baselines (:mod:`medvl.eval.baselines`) on the same questions and put their
    metrics (with intervals) beside the model's, overall and in every breakdown group, under
    `baselines`; returns what each baseline used."""
    found = baseline_predictions(scored, prior, category)
    for name, b in found.items():
        rows = [{**r, "prediction": p} for r, p in zip(scored, b["predictions"], strict=True)]
        rows = [{k: v for k, v in r.items() if k != "judge"} for r in rows]  # the judge read the model
        bm, _ = score(rows)
        groups = [(metrics["overall"], bm["overall"])] + [
            (metrics["breakdowns"][g][v], bm["breakdowns"][g][v])
            for g in metrics["breakdowns"]
            for v in metrics["breakdowns"][g]
        ]
        for target, source in groups:
            kept = {k: source[k] for k in BASELINE_METRICS if k in source}
            kept["ci95"] = {k: source["ci95"][k] for k in kept}
            target.setdefault("baselines", {})[name] = kept
    return {name: b["info"] for name, b in found.items()}


def build_report(
    rows: list[dict],
    run: dict,
    variants: dict[str, list[dict]] | None = None,
    prior: dict | None = None,
) -> dict:
    metrics, scored = score(rows)
    report = {"research_only": RESEARCH_ONLY, "run": run, **metrics}
    # Named at scoring time, as re-scoring an old prediction file applies this medvl's matching.
    report["multiple_choice_matching"] = MATCHING_VERSION
    report["statistics"] = {"bootstrap": BOOTSTRAP_INFO}
    report["measures"] = (
        "accuracy: share of questions answered correctly (multiple choice: the option extracted by "
        "VLMEvalKit's exact matching; closed/open: normalised exact answer). open_recall: share of "
        "the gold answer's tokens found in the answer. random_guess: expected accuracy of guessing "
        "uniformly among the non-empty options. unresolved/refused answers count as wrong. "
        "[low, high]: 95% percentile-bootstrap interval over the questions. Baselines: majority "
        "answer per answer type, question-only prior (with a training split)."
    )
    if scored:
        report["baselines"] = add_baselines(metrics, scored, prior, PRIMARY_BREAKDOWN.get(run["bench"]))
    if variants:
        report["image_dependence"] = image_dependence(scored, variants)
    ref = reference_for(run["bench"], report)
    if ref:
        report["reference"] = ref
    return report


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def _pct_ci(value: float | None, ci: list[float] | None) -> str:
    if value is None:
        return "–"
    return _pct(value) if ci is None else f"{_pct(value)} [{_pct(ci[0])}, {_pct(ci[1])}]"


def _metric(key: str) -> Callable[[dict], str]:
    return lambda m: _pct_ci(m[key], m["ci95"].get(key)) if key in m else "–"


def _count(key: str) -> Callable[[dict], str]:
    return lambda m: str(m[key]) if key in m else "–"


def _baseline(name: str) -> Callable[[dict], str]:
    def cell(m: dict) -> str:
        b = m.get("baselines", {}).get(name)
        return "–" if b is None else _pct_ci(b["accuracy"], b["ci95"]["accuracy"])

    return cell


# (key that must be present in some group, header, cell)
_METRIC_COLUMNS: list[tuple[str, str, Callable[[dict], str]]] = [
    ("accuracy", "accuracy % [95% CI]", _metric("accuracy")),
    ("random_guess", "random guess %", lambda m: _pct(m["random_guess"]) if "random_guess" in m else "–"),
    *((name, f"{name.replace('_', ' ')} % [95% CI]", _baseline(name)) for name in BASELINES),
    ("unresolved", "unresolved", _count("unresolved")),
    ("refused", "refused", _count("refused")),
    ("closed_accuracy", "closed acc. % [95% CI]", _metric("closed_accuracy")),
    ("open_recall", "open recall % [95% CI]", _metric("open_recall")),
    ("open_exact_match", "open exact % [95% CI]", _metric("open_exact_match")),
]


def _metrics_table(first_header: str, named: dict[str, dict]) -> list[str]:
    def present(key: str) -> bool:
        return any(key in m or key in m.get("baselines", {}) for m in named.values())

    columns = [c for c in _METRIC_COLUMNS if present(c[0])]
    lines = [
        "| " + " | ".join([first_header, "n", *(c[1] for c in columns)]) + " |",
        "|" + "---|" * (len(columns) + 2),
    ]
    for name, m in named.items():
        lines.append("| " + " | ".join([name, str(m["n"]), *(cell(m) for _, _, cell in columns)]) + " |")
    return lines


def to_markdown(report: dict) -> str:
    run = report["run"]
    lines = [
        f"# medvl eval: {run['bench']}",
        "",
        f"*{report['research_only']}*",
        "",
        f"- model: `{run.get('model')}`",
        f"- data: `{run.get('data', '')}`"
        + (f" (first {run['limit']} questions)" if run.get("limit") else ""),
        f"- scored questions: {report['overall']['n']}"
        + (
            f"; without answers (submission file written): {report['unscored']}" if report["unscored"] else ""
        ),
        f"- {report['measures']}",
        f"- multiple-choice matching: {report['multiple_choice_matching']}",
        "",
        "## Overall",
        "",
        *_metrics_table("", {"all": report["overall"]}),
    ]
    for name, groups in report["breakdowns"].items():
        lines += ["", f"## By {name}", "", *_metrics_table(name, groups)]
    baselines = report.get("baselines")
    if baselines:
        lines += ["", "## Baselines", ""]
        lines += [f"- {name.replace('_', ' ')}: {info['source']}" for name, info in baselines.items()]
        prior = baselines.get("question_prior")
        if prior:
            lines.append(
                f"- question prior: {prior['seen_questions']} of {prior['questions']} questions were asked "
                "in the training split in the same words; the others get their type's majority answer"
            )
        majority = baselines["majority"]["answers"]
        lines.append(
            "- majority answers: " + "; ".join(f"{t}: {a!r}" for t, a in sorted(majority.items()))[:1000]
        )
    lines += [
        "",
        "Intervals: {method}, {samples} resamples, seed {seed}.".format(**report["statistics"]["bootstrap"]),
    ]
    dep = report.get("image_dependence")
    if dep:
        lines += [
            "",
            "## Image dependence",
            "",
            "| images | n | accuracy with real images % | accuracy % | drop (points) [95% CI] "
            "| McNemar p | answers changed % |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, v in dep["variants"].items():
            lo, hi = v["drop_ci95"]
            lines.append(
                f"| {name} | {v['n']} | {_pct(v['accuracy_with_images'])} | {_pct(v['accuracy'])} | "
                f"{100 * v['drop']:.2f} [{100 * lo:.2f}, {100 * hi:.2f}] | {v['mcnemar']['p_value']:.3g} | "
                f"{_pct(v['answers_changed'])} |"
            )
        verdict = (
            "**Flagged:** the paired 95% interval of the accuracy drop includes 0 (or lies below it) for "
            "every kind of missing image: this model's answers do not measurably depend on the image."
            if dep["image_independent"]
            else "Accuracy drops measurably without the real images (a drop interval above 0)."
        )
        lines += ["", verdict]
    ref = report.get("reference")
    if ref:
        metric = ", ".join(ref["this_run_metric"])
        lines += [
            "",
            "## Published results (reference, not run here)",
            "",
            f"{ref['table']} of *{ref['source']}*. {ref['note']}",
            "",
            "| model | " + " | ".join(ref["columns"]) + " |",
            "|---|" + "---|" * len(ref["columns"]),
        ]
        for model, values in ref["rows"].items():
            lines.append(f"| {model} | " + " | ".join("–" if v is None else f"{v}" for v in values) + " |")
        this = [ref["this_run"][c] for c in ref["columns"]]
        lines.append(
            f"| **this run** ({metric}) | " + " | ".join("–" if v is None else f"{v}" for v in this) + " |"
        )
    return "\n".join(lines) + "\n"


def _primary(report: dict) -> str | None:
    name = PRIMARY_BREAKDOWN.get(report["run"]["bench"])
    if name in report["breakdowns"]:
        return name
    return next(iter(report["breakdowns"]), None)


def plot_reports(reports: list[dict], labels: list[str], path: Path) -> None:
    """Accuracy per category of the first report's main breakdown, one bar per run, with the
    random-guess level marked where the questions are multiple choice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    breakdown = _primary(reports[0])
    groups = reports[0]["breakdowns"][breakdown] if breakdown else {"all": reports[0]["overall"]}
    names = list(groups)
    height = 0.8 / len(reports)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * len(names) * max(1, len(reports) / 2)))
    for k, (report, label) in enumerate(zip(reports, labels, strict=True)):
        source = report["breakdowns"].get(breakdown, {}) if breakdown else {"all": report["overall"]}
        values = [100 * (source.get(n, {}).get("accuracy") or 0) for n in names]
        ax.barh([i + k * height for i in range(len(names))], values, height=height, label=label)
    for i, n in enumerate(names):
        guess = groups[n].get("random_guess")
        if guess is not None:
            ax.plot(
                [100 * guess] * 2,
                [i - height / 2, i + 0.8 - height / 2],
                color="black",
                lw=1.5,
                label="random guess" if i == 0 else None,
            )
    ax.set_yticks(
        [i + 0.4 - height / 2 for i in range(len(names))], [f"{n} (n={groups[n]['n']})" for n in names]
    )
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("accuracy (%)")
    ax.set_title(f"{reports[0]['run']['bench']} by {breakdown or 'overall'} — research use only", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, rows: list[dict], out: Path) -> None:
    """report.json, report.md, report.png, scored.jsonl (one verdict per question) and, for questions
    without gold answers, submission.tsv (index, raw prediction, extracted option)."""
    out = Path(out)
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "report.md").write_text(to_markdown(report), encoding="utf-8")
    _, scored = score(rows)
    with (out / "scored.jsonl").open("w", encoding="utf-8") as f:
        for r in scored:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    unanswered = [r for r in rows if not str(r.get("answer", "")).strip()]
    if unanswered:
        with (out / "submission.tsv").open("w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, delimiter="\t")
            w.writerow(["index", "prediction", "choice"])
            for r in unanswered:
                choice = extract_choice(r["prediction"], r["options"]) if r.get("options") else ""
                w.writerow([r["id"], r["prediction"], choice or ""])
    if report["overall"]["n"]:
        plot_reports([report], [report["run"].get("model", "this run")], out / "report.png")


def _run_predictions(path: Path) -> Path:
    """A run given as its folder, its report.json or its prediction file -> the prediction file."""
    path = Path(path)
    if path.is_dir():
        path = path / "predictions.jsonl"
    elif path.name == "report.json":
        path = path.with_name("predictions.jsonl")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prediction file not found (give a run folder of medvl eval)")
    return path


def paired_comparison(a: list[dict], b: list[dict]) -> dict:
    """Two runs' scored rows on the same questions (same order): run A's accuracy minus run B's with
    its paired-bootstrap interval, and McNemar's test, overall and per breakdown group (A's groups)."""

    def compare_rows(pairs: list[tuple[dict, dict]]) -> dict:
        ca, cb = [x["correct"] for x, _ in pairs], [y["correct"] for _, y in pairs]
        diff = paired_difference([float(x) for x in ca], [float(y) for y in cb])
        return {
            "n": len(pairs),
            "accuracy_a": sum(ca) / len(pairs),
            "accuracy_b": sum(cb) / len(pairs),
            "difference": diff["difference"],
            "ci95": diff["ci95"],
            "mcnemar": mcnemar(ca, cb),
        }

    pairs = list(zip(a, b, strict=True))
    out = {"overall": compare_rows(pairs), "breakdowns": {}}
    for name in sorted({g for r in a for g in r.get("groups", {})}):
        values = sorted({r["groups"][name] for r in a if name in r.get("groups", {})})
        out["breakdowns"][name] = {
            v: compare_rows([(x, y) for x, y in pairs if x.get("groups", {}).get(name) == v]) for v in values
        }
    return out


def _load_run(path: Path) -> tuple[str, dict, list[dict]]:
    pred = _run_predictions(path)
    rows = read_predictions(pred)
    run_file = pred.parent / "run.json"
    run = json.loads(run_file.read_text()) if run_file.exists() else {"model": "unknown"}
    run.setdefault("bench", rows[0].get("bench", "custom") if rows else "custom")
    metrics, scored = score(rows)
    label = f"{run.get('model')} ({pred.parent.name})"
    return label, {"run": run, **metrics}, scored


def compare(runs: list[Path], out: Path) -> Path:
    """Runs of one benchmark side by side (compare.png, compare.md, compare.json in `out`). Each
    later run is paired with the first on the same questions, matched by question id: accuracy
    difference (first minus later) with its paired-bootstrap interval and McNemar's test, overall and
    per group. Runs on different question sets are refused."""
    if len(runs) < 2:
        raise ValueError("--compare needs two or more runs (folders of medvl eval)")
    loaded = [_load_run(Path(p)) for p in runs]
    benches = {r["run"]["bench"] for _, r, _ in loaded}
    if len(benches) > 1:
        raise ValueError(
            f"these runs are of different benchmarks ({', '.join(sorted(benches))}): compare one at a time"
        )
    first_label, _, first = loaded[0]
    ids = [r["id"] for r in first]
    pairs = {}
    for label, _, scored in loaded[1:]:
        by_id = {r["id"]: r for r in scored}
        if set(by_id) != set(ids):
            common = len(set(by_id) & set(ids))
            raise ValueError(
                f"{first_label} and {label} were not run on the same questions "
                f"({len(ids)} and {len(by_id)} scored, {common} in common): compare runs of one question set"
            )
        other = [by_id[i] for i in ids]
        differ = next((a["id"] for a, b in zip(first, other, strict=True) if a["answer"] != b["answer"]), "")
        if differ:
            raise ValueError(f"{first_label} and {label} give question {differ!r} different gold answers")
        pairs[label] = paired_comparison(first, other)
    labels = [label for label, _, _ in loaded]
    reports = [r for _, r, _ in loaded]
    out.mkdir(parents=True, exist_ok=True)
    plot_reports(reports, labels, out / "compare.png")
    result = {
        "research_only": RESEARCH_ONLY,
        "bench": reports[0]["run"]["bench"],
        "runs": [{"label": lab, "path": str(p)} for lab, p in zip(labels, runs, strict=True)],
        "a": first_label,
        "bootstrap": BOOTSTRAP_INFO,
        "paired": pairs,
    }
    (out / "compare.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    breakdown = _primary(reports[0])
    names = list(reports[0]["breakdowns"].get(breakdown, {})) if breakdown else []
    lines = [
        f"# Comparison ({result['bench']})",
        "",
        f"*{RESEARCH_ONLY}*",
        "",
        "| run | overall accuracy % [95% CI] | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for label, r in zip(labels, reports, strict=True):
        cells = [_pct(r["breakdowns"].get(breakdown, {}).get(n, {}).get("accuracy")) for n in names]
        o = r["overall"]
        overall = _pct_ci(o["accuracy"], o["ci95"]["accuracy"])
        lines.append(f"| {label} | {overall} | " + " | ".join(cells) + " |")
    for label, p in pairs.items():
        lines += [
            "",
            f"## A = {first_label} vs B = {label} (paired, same questions)",
            "",
            "| group | n | A % | B % | A − B (points) [95% CI] | A only right | B only right "
            "| McNemar p (test) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        rows = [("all", p["overall"])] + [
            (f"{g}: {v}", c) for g, groups in p["breakdowns"].items() for v, c in groups.items()
        ]
        for name, c in rows:
            m = c["mcnemar"]
            lines.append(
                f"| {name} | {c['n']} | {_pct(c['accuracy_a'])} | {_pct(c['accuracy_b'])} | "
                f"{100 * c['difference']:.2f} [{100 * c['ci95'][0]:.2f}, {100 * c['ci95'][1]:.2f}] | "
                f"{m['a_only']} | {m['b_only']} | {m['p_value']:.3g} ({m['method']}) |"
            )
    lines += [
        "",
        f"Intervals: {BOOTSTRAP_INFO['method']} (the same resampled questions for both runs), "
        f"{BOOTSTRAP_INFO['samples']} resamples, seed {BOOTSTRAP_INFO['seed']}.",
    ]
    path = out / "compare.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
