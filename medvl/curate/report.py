"""End of a run: add up the committed parts, check that the counts balance, write quarantine.jsonl,
duplicates.jsonl, report.json and dataset_card.md with the four distribution plots of the reference's
Fig. 3 (original task, modality, department, clinical task) and, where masks came with boxes, the IoU of
mask-derived boxes against the given ones."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from .card import Card
from .images import box_iou

PLOTS = {
    "original_task": "(a) Original task",
    "modality": "(b) Modality",
    "department": "(c) Department",
    "clinical_task": "(d) Clinical task",
}


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


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


def finalize(out: Path, cards: list[Card]) -> dict:
    import pyarrow.parquet as pq

    parts = [json.loads(p.read_text()) for p in sorted((out / "parts").glob("part-*.json"))]
    per = {c.name: Counter() for c in cards}
    quarantine, duplicates = [], []
    for part in parts:
        for src, n in part["kept"].items():
            per[src]["kept"] += n
        for key in part["items"]:
            per[key[0]]["items"] += 1
        for q in part["quarantined"]:
            per[q["source"]]["quarantined"] += 1
        for d in part["duplicates"]:
            per[d["source"]]["duplicates" if d["drop"] else "flagged"] += 1
        quarantine += part["quarantined"]
        duplicates += part["duplicates"]
    # `read` is not stored per source; it is checked in total, and per source it is derived.
    read = sum(p["read"] for p in parts)
    for c in per.values():
        c["read"] = c["kept"] + c["quarantined"] + c["duplicates"]
    total = {
        k: sum(c[k] for c in per.values())
        for k in ("items", "read", "kept", "quarantined", "duplicates", "flagged")
    }
    if read != total["kept"] + total["quarantined"] + total["duplicates"]:
        raise RuntimeError(f"counts do not add up in {out}: read {read} != {total}")

    key = lambda e: (e["source"], e.get("file", ""), e.get("index") if e.get("index") is not None else -1)  # noqa: E731
    _write(
        out / "quarantine.jsonl",
        "".join(json.dumps(q, sort_keys=True) + "\n" for q in sorted(quarantine, key=key)),
    )
    _write(
        out / "duplicates.jsonl",
        "".join(json.dumps(d, sort_keys=True) + "\n" for d in sorted(duplicates, key=lambda d: d["id"])),
    )

    shards = sorted((out / "data").glob("part-*.parquet"))
    cols = ["source", "body_region", "boxes", "mask_boxes", "meta", *PLOTS]
    t = pq.read_table(shards, columns=cols).to_pydict() if shards else {c: [] for c in cols}
    dists = {c: Counter(t[c]) for c in [*PLOTS, "body_region"]}
    masked = [i for i, m in enumerate(t["meta"]) if '"mask"' in m]
    ious = mask_box_iou([t["boxes"][i] for i in masked], [t["mask_boxes"][i] for i in masked])
    report = {
        "counts": total,
        "by_source": {k: dict(v) for k, v in per.items()},
        "distributions": {k: dict(v.most_common()) for k, v in dists.items()},
        "mask_box_iou": iou_summary(ious),
        "shards": [s.relative_to(out).as_posix() for s in shards],
    }
    _write(out / "report.json", json.dumps(report, indent=1))
    (out / "plots").mkdir(exist_ok=True)
    _plots(out / "plots", dists, ious)
    _write(out / "dataset_card.md", _card_md(cards, report, quarantine))
    return report


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
        "Records: one 2D image (or slice, or frame) each, with modality, labels, boxes (pixels, "
        "`x_max`/`y_max` exclusive), department, original and clinical task, body region, source, licence "
        "and a provenance id (`source/file[#sliceN|#frameN]`). DICOM headers were de-identified before "
        "anything was kept.",
        "",
        "```python",
        "from datasets import load_dataset",
        'ds = load_dataset("parquet", data_files="data/*.parquet", split="train", streaming=True)',
        "```",
        "",
        "## Counts",
        "",
        f"read {c['read']} = kept {c['kept']} + quarantined {c['quarantined']} + duplicates dropped "
        f"{c['duplicates']} (items: {c['items']}; near duplicates kept but flagged: {c['flagged']}).",
        "",
        "| source | adapter | licence | items | read | kept | quarantined | duplicates | flagged |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for card in cards:
        s = report["by_source"][card.name]
        lines.append(
            f"| {card.name} | {card.adapter} | {card.license} | {s.get('items', 0)} | {s.get('read', 0)} | "
            f"{s.get('kept', 0)} | {s.get('quarantined', 0)} | {s.get('duplicates', 0)} | "
            f"{s.get('flagged', 0)} |"
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
