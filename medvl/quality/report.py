"""The outputs of `medvl quality`, written from the job's Parquet parts (input order, so a resumed run
writes the same files): kept.jsonl, rejected.jsonl, report.json, report.md and one histogram per
score (plots/*.png)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from medvl.jobs import atomic_write

from .blind import BLIND_PROMPT_VERSION
from .config import Thresholds
from .images import BenchmarkImage
from .judge import JUDGE_PROMPT_VERSION, JUDGE_SYSTEM

# The scores drawn as histograms (column, what it measures).
HISTOGRAMS: dict[str, str] = {
    "image_std": "1. image grey-level standard deviation",
    "fidelity_score": "2. annotation fidelity (share of rules held)",
    "alignment_score": "3. alignment (1 - blind answerability)",
    "blind_prior": "3. question-only prior's share of the gold answer",
    "language_score": "4. language quality (min of parts)",
    "repetition": "4. repetition (worst answer)",
    "lang_confidence": "4. language-ID probability of the sample's language",
    "translation": "4. zh/en invariants kept",
    "clinical_score": "5. clinical validity (0/1/2)",
}
EXAMPLES = 3  # per reason (rejected) and per format (kept): enough for a person to audit by eye
GROUP = ("source", "modality", "format", "lang")


def rows_of(out: Path, summary: dict) -> list[dict]:
    import pyarrow.parquet as pq

    return [r for part in summary["data"] for r in pq.read_table(out / "scores" / part).to_pylist()]


def _lines(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def trainable(row: dict, out: Path) -> dict:
    """The kept sample as written to kept.jsonl: its image path made relative to `out` (the default
    image root of a training data entry), so `medvl train` and `medvl mix` find it."""
    s = json.loads(row["sample"])
    if row["image"]:
        s["image"] = os.path.relpath(row["image"], out.resolve())
    return s


def scores_of(row: dict) -> dict:
    keep = [c for c in row if c.endswith(("_score", "_reason"))] + [
        "repetition",
        "lang_confidence",
        "translation",
        "blind_prior",
        "blind_support",
        "blind_llm",
        "clinical_by",
        "judge_critique",
        "benchmark",
        "benchmark_distance",
        "benchmark_match",
        "duplicate_of",
        "near_duplicate_of",
        "flags",
    ]
    return {k: row[k] for k in keep}


def write_outputs(
    out: Path, summary: dict, t: Thresholds, judge, bench: list[BenchmarkImage], benchmarks: list[Path]
) -> dict:
    rows = rows_of(out, summary)
    kept = [r for r in rows if r["kept"]]
    rejected = [r for r in rows if not r["kept"]]
    atomic_write(
        out / "kept.jsonl", lambda p: p.write_text(_lines([trainable(r, out) for r in kept]), "utf-8")
    )
    atomic_write(
        out / "rejected.jsonl",
        lambda p: p.write_text(
            _lines(
                [
                    {**json.loads(r["sample"]), "quality": {"failures": r["failures"], **scores_of(r)}}
                    for r in rejected
                ]
            ),
            "utf-8",
        ),
    )
    counts = {
        "read": summary["read"],
        "kept": len(kept),
        "rejected": len(rejected),
        "quarantined": summary["quarantined"],
    }
    if counts["read"] != counts["kept"] + counts["rejected"] + counts["quarantined"]:
        raise RuntimeError(f"{out}: counts do not add up: {counts}")
    first = Counter(r["failures"][0] for r in rejected)
    every = Counter(f for r in rejected for f in r["failures"])
    flags = Counter(f for r in rows for f in r["flags"])
    table: dict[tuple, Counter] = {}
    for r in rows:
        c = table.setdefault(tuple(r[k] for k in GROUP), Counter())
        c["read"] += 1
        c["kept" if r["kept"] else "rejected"] += 1
        for f in r["failures"]:
            c[f] += 1
    ran = Counter(r["clinical_by"] for r in rows)
    dropped: dict[str, dict] = {}
    by_sha = {b.sha256: b for b in bench}
    for r in rows:
        if r["benchmark"]:
            d = dropped.setdefault(
                r["benchmark"],
                {
                    "sha256": r["benchmark"],
                    "where": by_sha[r["benchmark"]].where,
                    "samples": 0,
                    "records": [],
                    "match": [],
                    "distance": 64,
                },
            )
            d["samples"] += 1
            d["distance"] = min(d["distance"], r["benchmark_distance"])
            d["records"] = sorted({*d["records"], r["record_id"]})
            d["match"] = sorted({*d["match"], r["benchmark_match"]})
    report = {
        "counts": counts,
        "rejected_by_first_reason": dict(sorted(first.items())),
        "rejected_by_reason": dict(sorted(every.items())),
        "flagged": dict(sorted(flags.items())),
        "by_group": [
            {**dict(zip(GROUP, key, strict=True)), **dict(sorted(c.items()))}
            for key, c in sorted(table.items())
        ],
        "checks_run": {
            "clinical": dict(sorted(ran.items())),
            "blind": ["question-only prior"] + ([f"text-only LLM {judge.model}"] if judge else []),
            "judge": None
            if judge is None
            else {
                "base_url": judge.base_url,
                "model": judge.model,
                "prompt_version": JUDGE_PROMPT_VERSION,
                "blind_prompt_version": BLIND_PROMPT_VERSION,
                "prompt": JUDGE_SYSTEM,
            },
        },
        "thresholds": t.model_dump(),
        "benchmark": {
            "given": [str(b) for b in benchmarks],
            "images_seen": len(bench),
            "index": "benchmark_index.jsonl",
            "dropped": sorted(dropped.values(), key=lambda d: d["sha256"]),
        },
        "histograms": _histograms(out, rows),
        "examples": {
            "rejected": {
                reason: [_example(r) for r in rejected if r["failures"][0] == reason][:EXAMPLES]
                for reason in sorted(first)
            },
            "kept": {
                fmt: [_example(r) for r in kept if r["format"] == fmt][:EXAMPLES]
                for fmt in sorted({r["format"] for r in kept})
            },
        },
        "files": {"kept": "kept.jsonl", "rejected": "rejected.jsonl", "scores": "scores/data/*.parquet"},
    }
    atomic_write(
        out / "report.json", lambda p: p.write_text(json.dumps(report, indent=1, ensure_ascii=False), "utf-8")
    )
    atomic_write(out / "report.md", lambda p: p.write_text(markdown(report), "utf-8"))
    return report


def _example(r: dict) -> dict:
    s = json.loads(r["sample"])
    return {
        "id": r["id"],
        "image": r["image"],
        "conversations": s.get("conversations"),
        "failures": r["failures"],
        "reasons": {d: r[f"{d}_reason"] for d in ("image", "fidelity", "alignment", "language", "clinical")},
    }


def _histograms(out: Path, rows: list[dict]) -> dict:
    # A bare Figure renders with Agg on savefig: no pyplot, so no process-wide backend or figure state.
    from matplotlib.figure import Figure

    (out / "plots").mkdir(exist_ok=True)
    made = {}
    for col, title in HISTOGRAMS.items():
        values = [r[col] for r in rows if r[col] is not None]
        missing = len(rows) - len(values)
        fig = Figure(figsize=(5, 3), dpi=80)
        ax = fig.subplots()
        ax.hist(values, bins=20)
        ax.set_title(f"{title}\n{len(values)} samples, {missing} without this score", fontsize=8)
        ax.set_xlabel(col)
        ax.set_ylabel("samples")
        fig.tight_layout()
        path = out / "plots" / f"{col}.png"
        atomic_write(path, lambda p, f=fig: f.savefig(p, format="png", metadata={"Software": None}))
        made[col] = {"file": f"plots/{col}.png", "samples": len(values), "missing": missing}
    return made


def markdown(report: dict) -> str:
    c = report["counts"]
    lines = [
        "# medvl quality report",
        "",
        f"Read {c['read']} samples: kept {c['kept']}, rejected {c['rejected']}, "
        f"quarantined {c['quarantined']}.",
        "",
        "## Checks that ran",
        "",
        f"- Clinical validity: {', '.join(f'{k}: {v}' for k, v in report['checks_run']['clinical'].items())}"
        " (judge = LLM judge, rules = rule-based checks, none = no fact sheet: fails closed)",
        f"- Blind answerability: {', '.join(report['checks_run']['blind'])}",
    ]
    judge = report["checks_run"]["judge"]
    if judge:
        lines.append(f"- Judge: `{judge['model']}` at {judge['base_url']}, prompt {judge['prompt_version']}")
    lines += ["", "## Rejected by first reason", "", "| reason | samples |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["rejected_by_first_reason"].items()]
    lines += [
        "",
        "## Every failure (a sample counts under each of its failures)",
        "",
        "| reason | samples |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in report["rejected_by_reason"].items()]
    if report["flagged"]:
        lines += ["", "Flagged but kept: " + ", ".join(f"{k} {v}" for k, v in report["flagged"].items())]
    lines += [
        "",
        "## By dataset x modality x format x language",
        "",
        "| dataset | modality | format | lang | read | kept | rejected | failures |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in report["by_group"]:
        fails = ", ".join(f"{k} {v}" for k, v in g.items() if ": " in k)
        lines.append(
            f"| {g['source']} | {g['modality']} | {g['format']} | {g['lang']} | {g.get('read', 0)} | "
            f"{g.get('kept', 0)} | {g.get('rejected', 0)} | {fails} |"
        )
    b = report["benchmark"]
    lines += [
        "",
        "## Benchmark contamination guard",
        "",
        f"Benchmarks given: {', '.join(b['given']) or 'none'}; {b['images_seen']} distinct benchmark images "
        f"(listed by hash in {b['index']}). Benchmark images found in the input and dropped:",
        "",
    ]
    lines += [
        f"- `{d['sha256']}` ({d['where']}): {d['samples']} samples of {', '.join(d['records'])}; "
        f"{' and '.join(d['match'])} match, pHash distance {d['distance']}"
        for d in b["dropped"]
    ] or ["- none"]
    lines += ["", "## Histograms", ""]
    lines += [f"![{k}]({v['file']}) " for k, v in report["histograms"].items()]
    lines += ["", "## Examples to audit", ""]
    for kind in ("rejected", "kept"):
        for key, examples in report["examples"][kind].items():
            lines += [f"### {kind}: {key}", ""]
            for e in examples:
                lines.append(f"- `{e['id']}` {Path(e['image']).name if e['image'] else '(text only)'}")
                for turn in e["conversations"] or []:
                    value = " ".join(str(turn.get("value", "")).split())[:300]
                    lines.append(f"  - {turn.get('from')}: {value}")
                lines.append(f"  - reasons: {'; '.join(f'{d}: {r}' for d, r in e['reasons'].items())}")
            lines.append("")
    return "\n".join(lines) + "\n"
