"""Reports: JSON, Markdown and plots, with the reference's published numbers beside this run's."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import yaml

from medvl import RESEARCH_ONLY
from medvl.eval.matching import MATCHING_VERSION, extract_choice
from medvl.eval.scoring import normalize_answer, score, score_row

REFERENCE_FILE = Path(__file__).with_name("reference_results.yaml")

# The image-dependence check flags a run whose accuracy drops by less than this (a share, i.e. two
# percentage points) when the images are blanked or shuffled. On a few hundred questions sampling
# noise alone is of this order: read the flag with the counts beside it.
IMAGE_DEPENDENCE_MARGIN = 0.02

# The breakdown each benchmark is plotted by.
PRIMARY_BREAKDOWN = {
    "mc": "category",
    "omnimedvqa": "question type",
    "gmai-mmbench": "clinical VQA task",
    "mmmu": "subject",
    "slake": "content type",
    "vqa-rad": "answer type",
    "pathvqa": "answer type",
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
    """Accuracy with the real images against blank/shuffled ones, on the questions both runs answered."""
    base = {r["id"]: r for r in scored}
    out: dict = {"margin": IMAGE_DEPENDENCE_MARGIN, "variants": {}}
    for name, rows in variants.items():
        pairs = [(base[r["id"]], score_row(r)) for r in rows if r["id"] in base]
        if not pairs:
            continue
        n = len(pairs)
        with_images = sum(a["correct"] for a, _ in pairs) / n
        without = sum(b["correct"] for _, b in pairs) / n
        changed = (
            sum(normalize_answer(a["prediction"]) != normalize_answer(b["prediction"]) for a, b in pairs) / n
        )
        out["variants"][name] = {
            "n": n,
            "accuracy_with_images": with_images,
            "accuracy": without,
            "drop": with_images - without,
            "answers_changed": changed,
        }
    drops = [v["drop"] for v in out["variants"].values()]
    out["image_independent"] = bool(drops) and all(d < IMAGE_DEPENDENCE_MARGIN for d in drops)
    return out


def build_report(rows: list[dict], run: dict, variants: dict[str, list[dict]] | None = None) -> dict:
    metrics, scored = score(rows)
    report = {"research_only": RESEARCH_ONLY, "run": run, **metrics}
    # Named at scoring time, as re-scoring an old prediction file applies this medvl's matching.
    report["multiple_choice_matching"] = MATCHING_VERSION
    report["measures"] = (
        "accuracy: share of questions answered correctly (multiple choice: the option extracted by "
        "VLMEvalKit's exact matching; closed/open: normalised exact answer). open_recall: share of "
        "the gold answer's tokens found in the answer. random_guess: expected accuracy of guessing "
        "uniformly among the non-empty options. unresolved/refused answers count as wrong."
    )
    if variants:
        report["image_dependence"] = image_dependence(scored, variants)
    ref = reference_for(run["bench"], report)
    if ref:
        report["reference"] = ref
    return report


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


_METRIC_COLUMNS = [
    ("accuracy", "accuracy %", _pct),
    ("random_guess", "random guess %", _pct),
    ("unresolved", "unresolved", str),
    ("refused", "refused", str),
    ("closed_accuracy", "closed acc. %", _pct),
    ("open_recall", "open recall %", _pct),
    ("open_exact_match", "open exact %", _pct),
]


def _metrics_table(first_header: str, named: dict[str, dict]) -> list[str]:
    present = [c for c in _METRIC_COLUMNS if any(c[0] in m for m in named.values())]
    lines = [
        "| " + " | ".join([first_header, "n", *(c[1] for c in present)]) + " |",
        "|" + "---|" * (len(present) + 2),
    ]
    for name, m in named.items():
        cells = [fmt(m[key]) if key in m else "–" for key, _, fmt in present]
        lines.append("| " + " | ".join([name, str(m["n"]), *cells]) + " |")
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
    dep = report.get("image_dependence")
    if dep:
        lines += [
            "",
            "## Image dependence",
            "",
            "| images | n | accuracy with real images % | accuracy % | drop (points) | answers changed % |",
            "|---|---|---|---|---|---|",
        ]
        for name, v in dep["variants"].items():
            lines.append(
                f"| {name} | {v['n']} | {_pct(v['accuracy_with_images'])} | {_pct(v['accuracy'])} | "
                f"{100 * v['drop']:.2f} | {_pct(v['answers_changed'])} |"
            )
        verdict = (
            f"**Flagged:** accuracy drops by less than {100 * dep['margin']:.0f} points without the real "
            "images; this model's answers do not measurably depend on the image."
            if dep["image_independent"]
            else f"Accuracy drops by at least {100 * dep['margin']:.0f} points without the real images."
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


def compare(reports: list[Path], out: Path) -> Path:
    """Several runs' report.json side by side: compare.png and compare.md in `out`."""
    loaded = [json.loads(Path(p).read_text(encoding="utf-8")) for p in reports]
    benches = {r["run"]["bench"] for r in loaded}
    if len(benches) > 1:
        raise ValueError(
            f"these reports are of different benchmarks ({', '.join(sorted(benches))}): compare one at a time"
        )
    labels = [
        f"{r['run'].get('model')} ({Path(p).parent.name})" for r, p in zip(loaded, reports, strict=True)
    ]
    out.mkdir(parents=True, exist_ok=True)
    plot_reports(loaded, labels, out / "compare.png")
    breakdown = _primary(loaded[0])
    names = list(loaded[0]["breakdowns"].get(breakdown, {})) if breakdown else []
    lines = [
        f"# Comparison ({loaded[0]['run']['bench']})",
        "",
        f"*{RESEARCH_ONLY}*",
        "",
        "| run | overall accuracy % | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for label, r in zip(labels, loaded, strict=True):
        cells = [_pct(r["breakdowns"].get(breakdown, {}).get(n, {}).get("accuracy")) for n in names]
        lines.append(f"| {label} | {_pct(r['overall']['accuracy'])} | " + " | ".join(cells) + " |")
    path = out / "compare.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
