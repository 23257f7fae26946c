"""End of a run: from the job's summary (medvl.jobs adds up and checks the counts, and writes
quarantine.jsonl, dropped.jsonl and flagged.jsonl) and the records, write report.json and
dataset_card.md with the four distribution plots of the reference's Fig. 3 (original task, modality,
department, clinical task) and, where masks came with boxes, the IoU of mask-derived boxes against the
given ones."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from medvl.jobs import atomic_write

from .card import Card
from .images import box_iou

PLOTS = {
    "original_task": "(a) Original task",
    "modality": "(b) Modality",
    "department": "(c) Department",
    "clinical_task": "(d) Clinical task",
}


def mask_box_iou(boxes: list[list[dict]], mask_boxes: list[list[dict]]) -> list[float]:
    """For every given box, the best IoU with a mask-derived box of the same label (0 when the mask has
    no component of that label)."""
    ious = []
    for given, derived in zip(boxes, mask_boxes, strict=True):
        for b in given:
            ious.append(max((box_iou(b, d) for d in derived if d["label"] == b["label"]), default=0.0))
    return ious


def iou_summary(ious: list[float]) -> dict:
    a = np.asarray(ious, dtype=float)
    if not len(a):
        return {"n": 0}
    q = np.percentile(a, [10, 25, 50, 75, 90])
    return {
        "n": len(a),
        "mean": round(float(a.mean()), 4),
        **{f"p{p}": round(float(v), 4) for p, v in zip((10, 25, 50, 75, 90), q, strict=True)},
        "ge_0.5": round(float((a >= 0.5).mean()), 4),
        "ge_0.75": round(float((a >= 0.75).mean()), 4),
        "unmatched": int((a == 0).sum()),
    }


COUNTS = ("items", "read", "kept", "quarantined", "dropped", "flagged")


def finalize(out: Path, cards: list[Card], summary: dict) -> dict:
    import pyarrow.parquet as pq

    empty = {"items": 0, "read": 0, "kept": 0, "quarantined": 0, "dropped": {}, "flagged": {}}
    shards = [out / d for d in summary["data"]]
    cols = ["body_region", "boxes", "mask_boxes", "meta", "source", "split", *PLOTS]
    t = pq.read_table(shards, columns=cols).to_pydict() if shards else {c: [] for c in cols}
    dists = {c: Counter(t[c]) for c in [*PLOTS, "body_region"]}
    masked = [i for i, m in enumerate(t["meta"]) if '"mask"' in m]
    ious = mask_box_iou([t["boxes"][i] for i in masked], [t["mask_boxes"][i] for i in masked])
    splits = Counter(zip(t["source"], t["split"], strict=True))
    report = {
        "counts": {k: summary[k] for k in COUNTS},
        "by_source": {
            c.name: {
                **{k: summary["by"].get(c.name, empty)[k] for k in COUNTS},
                # kept records per split ("" where the source defines none)
                "splits": {sp: n for (src, sp), n in sorted(splits.items()) if src == c.name},
            }
            for c in cards
        },
        "distributions": {k: dict(v.most_common()) for k, v in dists.items()},
        "mask_box_iou": iou_summary(ious),
        "shards": summary["data"],
    }
    atomic_write(out / "report.json", lambda p: p.write_text(json.dumps(report, indent=1)))
    (out / "plots").mkdir(exist_ok=True)
    _plots(out / "plots", dists, ious)
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    atomic_write(out / "dataset_card.md", lambda p: p.write_text(_card_md(cards, report, quarantine)))
    return report


def counts_line(c: dict) -> str:
    """`read = kept + quarantined + dropped (by reason)`, flags, items: one line for the CLI and the card."""
    dropped = ", ".join(f"{k} {v}" for k, v in c["dropped"].items()) or "none"
    flagged = ", ".join(f"{k} {v}" for k, v in c["flagged"].items()) or "none"
    return (
        f"read {c['read']} = kept {c['kept']} + quarantined {c['quarantined']} + dropped "
        f"{sum(c['dropped'].values())} ({dropped}); kept but flagged: {flagged}; items {c['items']}."
    )


def _plots(folder: Path, dists: dict[str, Counter], ious: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for col, title in PLOTS.items():
        items = dists[col].most_common()
        fig, ax = plt.subplots(figsize=(6, 0.35 * max(3, len(items)) + 1))
        n = sum(v for _, v in items) or 1
        ax.barh([k for k, _ in items][::-1], [100 * v / n for _, v in items][::-1], color="#4477aa")
        ax.set_xlabel("% of records")
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(folder / f"{col}.png", dpi=80)
        plt.close(fig)
    if ious:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.hist(ious, bins=20, range=(0, 1), color="#aa7744")
        ax.set_xlabel("IoU of mask-derived box vs given box")
        ax.set_ylabel("boxes")
        fig.tight_layout()
        fig.savefig(folder / "mask_box_iou.png", dpi=80)
        plt.close(fig)


def _table(counter: dict, total: int) -> str:
    rows = [f"| {k or '(unknown)'} | {v} | {100 * v / max(total, 1):.1f}% |" for k, v in counter.items()]
    return "| value | records | share |\n|---|---:|---:|\n" + "\n".join(rows)


def _card_md(cards: list[Card], report: dict, quarantine: list[dict]) -> str:
    c = report["counts"]
    lines = [
        "# Curated dataset",
        "",
        "**Research use only. Not for diagnosis or any clinical decision.** Each source keeps its own "
        "licence (below); redistribution follows the most restrictive of them.",
        "",
        "Records: one 2D image (or slice, or frame) each (`kind` `image`), with modality, labels, boxes "
        "(pixels, `x_max`/`y_max` exclusive), department, original and clinical task, body region, source, "
        "licence and a provenance id (`source/file[#sliceN|#frameN]`); where a card keeps volumes whole, one "
        "record per volume too (`kind` `volume`, id `source/file#volume`): its preprocessed array in "
        "`volumes/<sha256>.npy`, the spec that made it (`volume_spec`), its spacing, 3D boxes in voxels and "
        "slice ranges per label (`volume`). DICOM headers were de-identified before anything was kept.",
        "",
        "```python",
        "from datasets import load_dataset",
        'ds = load_dataset("parquet", data_files="data/*.parquet", split="train", streaming=True)',
        "```",
        "",
        "## Counts",
        "",
        counts_line(c),
        "",
        "| source | adapter | licence | items | read | kept | quarantined | dropped duplicates | "
        "dropped, no output | duplicates kept, flagged | kept by split |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for card in cards:
        s = report["by_source"][card.name]
        lines.append(
            f"| {card.name} | {card.adapter} | {card.license} | {s['items']} | {s['read']} | {s['kept']} | "
            f"{s['quarantined']} | {s['dropped'].get('duplicate', 0)} | {s['dropped'].get('no output', 0)} | "
            f"{s['flagged'].get('duplicate', 0)} | "
            + (", ".join(f"{sp or '(none)'} {n}" for sp, n in s["splits"].items()) or "-")
            + " |"
        )
    lines += ["", "## Distributions (reference Fig. 3)", ""]
    for col, title in PLOTS.items():
        lines += [
            f"### {title}",
            "",
            f"![{title}](plots/{col}.png)",
            "",
            _table(report["distributions"][col], c["kept"]),
            "",
        ]
    lines += ["### Body region", "", _table(report["distributions"]["body_region"], c["kept"]), ""]
    iou = report["mask_box_iou"]
    if iou["n"]:
        lines += [
            "## Boxes from masks vs given boxes",
            "",
            "For every given box, the best IoU with a box derived from the mask (one per connected component "
            "per label) of the same label; 0 when the mask has no such component.",
            "",
            "| " + " | ".join(iou) + " |",
            "|" + "---:|" * len(iou),
            "| " + " | ".join(str(v) for v in iou.values()) + " |",
            "",
            "![IoU](plots/mask_box_iou.png)",
            "",
        ]
    reasons = Counter((q["source"], q["field"]) for q in quarantine)
    lines += ["## Quarantine", "", "Details, one line per item: `quarantine.jsonl`.", ""]
    lines += ["| source | field | items |", "|---|---|---:|"] + [
        f"| {s} | {f} | {n} |" for (s, f), n in reasons.most_common()
    ]
    return "\n".join(lines) + "\n"
