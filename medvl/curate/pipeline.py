"""The curation job on `medvl.jobs`: list the items of every card; in the workers, load each item with
its card's adapter and map its images onto the record schema (vocabularies, provenance, hashes); in the
driver, drop or flag duplicates against the records kept so far. The runner commits Parquet parts, so a
killed run resumes and a finished one re-runs as a no-op; items run in a fixed order, so the output does
not depend on the number of workers.

Counting unit: a candidate record (one 2D image, slice or frame, or one whole volume when its card asks
for volumes); an item that fails before it can be split (unreadable file, missing mask) counts as one.
read = kept + quarantined + dropped. A kept volume record's array is `volumes/<sha256>.npy`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from medvl.errors import InputError
from medvl.imaging import content_hash, perceptual_hash, store_volume
from medvl.jobs import DriverStep, Drop, Flag, Outcome, Quarantine, Step, run
from medvl.records import CURATED_COLUMNS, curated_schema
from medvl.vocab import BODY_REGIONS, CLINICAL_TASKS, normalize_modality
from medvl.volume_facts import merge_measures

from .adapters import ADAPTERS, SourceImage, SourceVolume, card_preprocessing
from .card import Card
from .images import encode_png, merge_regions
from .report import finalize

SHARD_RECORDS = 1000
VOLUMES = "volumes"  # folder of the preprocessed volumes, beside data/
VOLUME_ARRAY = "_array"  # a volume row's array, on its way from the worker to the driver; never stored
# PNG bytes do not compress further; zstd is kept for the other columns.
COMPRESSION = {c.name: "none" if c.name == "image" else "zstd" for c in CURATED_COLUMNS}


# ---------------------------------------------------------------- worker side


def build_record(card: Card, s: SourceImage | SourceVolume) -> dict:
    """Validate a sample and map it onto the record schema (vocabularies, provenance, hashes)."""
    if isinstance(s, SourceVolume):
        return build_volume_record(card, s)
    px = s.pixels
    if px.dtype != np.uint8 or px.ndim not in (2, 3) or (px.ndim == 3 and px.shape[2] != 3):
        raise InputError(s.file, "image", f"wrongly shaped image: {px.dtype} array of shape {px.shape}")
    h, w = px.shape[:2]
    if min(h, w) < 2:
        raise InputError(s.file, "image", f"degenerate {w}x{h} image")
    relabel = card.label_map.get
    boxes = [{**b, "label": relabel(b["label"], b["label"])} for b in s.boxes]
    for b in boxes:
        if not (0 <= b["x_min"] < b["x_max"] <= w and 0 <= b["y_min"] < b["y_max"] <= h):
            coords = [round(b[k], 1) for k in ("x_min", "y_min", "x_max", "y_max")]
            raise InputError(s.file, "boxes", f"box {b['label']!r} {coords} lies outside the {w}x{h} image")
    rid = f"{card.name}/{s.file}" + (f"#{s.index_kind}{s.index}" if s.index >= 0 else "")
    return {
        "id": rid,
        "image": {"bytes": encode_png(px), "path": None},
        "width": w,
        "height": h,
        **_described(card, s.file, s.labels, s.splits, s.modality, s.body_region),
        "boxes": boxes,
        "mask_boxes": [{**b, "label": relabel(b["label"], b["label"])} for b in s.mask_boxes],
        "index": s.index,
        "index_kind": s.index_kind,
        "sha256": content_hash(px),
        "phash": f"{perceptual_hash(px):016x}",
        "meta": json.dumps(s.meta, sort_keys=True),
        "regions": json.dumps(
            merge_regions([{**r, "label": relabel(r["label"], r["label"])} for r in s.regions])
        ),
        "kind": "image",
        "volume": "",
        "volume_spec": "",
    }


def build_volume_record(card: Card, v: SourceVolume) -> dict:
    """A volume record: the array itself travels under VOLUME_ARRAY to the driver, which stores it as
    `volumes/<sha256>.npy` once the record is kept (`Deduplicate`)."""
    a = v.array
    if a.dtype != np.uint8 or a.ndim != 4 or min(a.shape) < 1:
        raise InputError(v.file, "volume", f"wrongly shaped volume: {a.dtype} array of shape {a.shape}")
    relabel = card.label_map.get
    sha = content_hash(a)
    slices: dict[str, list[int]] = {}
    for label, (lo, hi) in v.slices.items():  # labels the card's label_map merges share one range
        name = relabel(label, label)
        old = slices.get(name, [lo, hi])
        slices[name] = [min(old[0], lo), max(old[1], hi)]
    measures: dict[str, dict] = {}
    for label, m in v.measures.items():
        name = relabel(label, label)
        measures[name] = merge_measures(measures.get(name), m)
    volume = {
        "file": f"{VOLUMES}/{sha}.npy",
        "shape": list(a.shape),
        "channels": v.spec.channels(),
        "spacing_mm": list(v.spec.spacing),
        "origin_mm": v.origin_mm,
        "source": v.source,
        "boxes": [{**b, "label": relabel(b["label"], b["label"])} for b in v.boxes],
        "slices": slices,
        "measures": measures,
    }
    return {
        "id": f"{card.name}/{v.file}#volume",
        "image": None,
        "width": a.shape[3],
        "height": a.shape[2],
        **_described(card, v.file, v.labels, [], v.modality, v.body_region),
        "boxes": [],
        "mask_boxes": [],
        "index": -1,
        "index_kind": "",
        "sha256": sha,
        "phash": "",
        "meta": json.dumps(v.meta, sort_keys=True),
        "regions": "[]",
        "kind": "volume",
        "volume": json.dumps(volume, sort_keys=True),
        "volume_spec": v.spec.model_dump_json(),
        VOLUME_ARRAY: a,
    }


def _described(
    card: Card,
    file: str,
    source_labels: list[str],
    splits: list[str],
    modality: str | None,
    body_region: str | None,
) -> dict:
    """The columns a 2D image and a volume fill alike: labels, vocabularies, provenance, split."""
    relabel = card.label_map.get
    labels = list(dict.fromkeys(relabel(x, x) for x in source_labels))
    space = card.labels()
    outside = [x for x in labels if x not in space]
    if space and outside:
        raise InputError(
            file, "labels", f"label {outside[0]!r} is not in the card's label space (label_space)"
        )
    split = card.split.resolve(card.root_dir(), file, splits) if card.split else ""
    raw_mod = modality or card.modality or ""
    try:
        modality = card.modality_map.get(raw_mod) or normalize_modality(raw_mod)
    except ValueError as e:
        raise InputError(file, "modality", str(e)) from None
    raw_region = body_region or card.body_region
    region = card.body_region_map.get(raw_region, raw_region) if raw_region else ""
    if region and region not in BODY_REGIONS:
        raise InputError(
            file, "body_region", f"{raw_region!r} is not mapped onto BODY_REGIONS (body_region_map)"
        )
    department = card.department_by_region.get(region) or card.department
    if department is None:
        raise InputError(
            file, "department", f"no department for body region {region!r} (department_by_region)"
        )
    tasks = {card.clinical_task_by_label[x] for x in labels if x in card.clinical_task_by_label}
    return {
        "modality": modality,
        "body_region": region,
        "department": department,
        "original_task": card.original_task,
        "clinical_task": min(tasks, key=CLINICAL_TASKS.index) if tasks else card.clinical_task,
        "labels": labels,
        "source": card.name,
        "license": card.license,
        "file": file,
        "duplicate_of": None,
        "preprocessing": card_preprocessing(card).model_dump_json(),
        "split": split,
        "annotation": json.dumps(
            {
                "exhaustive": card.exhaustive_labels,
                "label_space": space,
                # Each label's clinical task: labels of one task (organs, findings, grades) are the
                # alternatives of one question, so generated distractors come from the gold's own group.
                "groups": {x: card.clinical_task_by_label.get(x, card.clinical_task) for x in space},
            }
        ),
    }


# ---------------------------------------------------------------- driver side


class NearIndex:
    """pHash near-duplicate search by multi-index hashing: split the 64 bits into d+1 chunks; two hashes
    within distance d agree exactly on at least one chunk (pigeonhole), so only those are compared."""

    def __init__(self, max_distance: int):
        n = max_distance + 1
        edges = np.linspace(0, 64, n + 1).astype(int)
        self.chunks = [(int(a), (1 << int(b - a)) - 1) for a, b in zip(edges[:-1], edges[1:], strict=True)]
        self.tables: list[dict[int, list[int]]] = [{} for _ in self.chunks]
        self.entries: list[tuple[int, str, str]] = []  # (hash, record id, item key)

    def add(self, h: int, rid: str, item: str) -> None:
        self.entries.append((h, rid, item))
        for t, (shift, mask) in zip(self.tables, self.chunks, strict=True):
            t.setdefault((h >> shift) & mask, []).append(len(self.entries) - 1)

    def find(self, h: int, item: str, distance: int) -> tuple[str, int] | None:
        best = None
        for t, (shift, mask) in zip(self.tables, self.chunks, strict=True):
            for i in t.get((h >> shift) & mask, ()):
                eh, rid, eitem = self.entries[i]
                d = (eh ^ h).bit_count()
                # Slices or frames of one item resemble each other by nature; they are not duplicates.
                if d <= distance and eitem != item and (best is None or (d, i) < best[:2]):
                    best = (d, i, rid)
        return None if best is None else (best[2], best[0])


class LoadRecords(Step):
    """Worker side: one card item -> its records; a bad image of a volume or clip is quarantined on its
    own, a bad item as a whole."""

    name = "curate"
    compression = COMPRESSION

    def __init__(self, cards: list[Card]):
        self.cards = {c.name: c for c in cards}

    def schema(self):
        return curated_schema()

    def config(self) -> list[dict]:
        return [c.model_dump(mode="json") for c in self.cards.values()]

    def __call__(self, item: dict) -> Iterator[Outcome]:
        card = self.cards[item["source"]]
        try:
            for s in ADAPTERS[card.adapter].load(card, card.opts(), card.root_dir(), item["item"]):
                try:
                    yield build_record(card, s)
                except InputError as e:
                    yield Quarantine(
                        e, {"index": s.index} if isinstance(s, SourceImage) else {"kind": "volume"}
                    )
        except InputError:
            raise
        except Exception as e:  # an adapter bug or an unforeseen format problem must not stop the run
            raise InputError(
                item["item"]["id"], "item", f"unexpected {type(e).__name__}: {str(e)[:300]}"
            ) from None


def item_key(rec: dict) -> str:
    """Records with one key are never each other's near duplicates: slices of a volume, frames of a clip
    resemble each other by nature. Rows of an array file are separate images."""
    return rec["id"] if rec["index_kind"] == "row" else f"{rec['source']}/{rec['file']}"


class Deduplicate(DriverStep):
    """Driver side: each record against the records kept before it (cards in the order given, items in
    order); the card's policy drops the later one (`Drop("duplicate")`) or keeps it with `duplicate_of`
    set (`Flag("duplicate")`). Volumes are compared exactly only (the same preprocessed array); a kept
    volume's array is written to `out/volumes/<sha256>.npy` here, so only kept records have one."""

    columns = ("id", "sha256", "phash", "source", "file", "index_kind", "kind")

    def __init__(self, cards: list[Card], out: Path):
        self.cards = {c.name: c for c in cards}
        self.exact: dict[str, str] = {}
        self.near = NearIndex(max(c.dedup.near_distance for c in cards))
        self.out = Path(out)

    def keep(self, rec: dict, item: str) -> None:
        self.exact.setdefault(rec["sha256"], rec["id"])
        if rec.get("kind", "image") == "image":
            self.near.add(int(rec["phash"], 16), rec["id"], item)

    def check(self, rec: dict, item: str) -> dict | None:
        """None: keep as is. Otherwise the duplicate entry; `drop` says whether the record goes."""
        policy = self.cards[rec["source"]].dedup
        if policy.exact != "keep" and rec["sha256"] in self.exact:
            return {
                "kind": "exact",
                "of": self.exact[rec["sha256"]],
                "distance": 0,
                "drop": policy.exact == "drop",
            }
        if policy.near != "keep" and rec["kind"] == "image":
            hit = self.near.find(int(rec["phash"], 16), item, policy.near_distance)
            if hit:
                return {"kind": "near", "of": hit[0], "distance": hit[1], "drop": policy.near == "drop"}
        return None

    def resume(self, rows: Iterable[dict]) -> None:
        for r in rows:
            self.keep(r, item_key(r))

    def __call__(self, item: dict, outcomes: list[Outcome]) -> list[Outcome]:
        result: list[Outcome] = []
        for rec in outcomes:
            if isinstance(rec, dict):
                array = rec.pop(VOLUME_ARRAY, None)
                key = item_key(rec)
                dup = self.check(rec, key)
                if dup is not None:
                    detail = {"id": rec["id"], **{k: dup[k] for k in ("kind", "of", "distance")}}
                    if dup["drop"]:
                        result.append(Drop("duplicate", detail))
                        continue
                    rec["duplicate_of"] = dup["of"]
                    result.append(Flag("duplicate", detail))
                if array is not None:
                    store_volume(self.out, array)  # named by the record's sha256
                self.keep(rec, key)
            result.append(rec)
        return result


def curate(
    cards: list[Card],
    out: Path,
    workers: int = 1,
    engine: str = "local",
    shard_records: int = SHARD_RECORDS,
    limit: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Run (or resume) the job; returns the report (also written to out/report.json)."""
    names = [c.name for c in cards]
    if len(set(names)) != len(names):
        raise ValueError(f"two cards share a name: {names}")
    for card in cards:
        if card.split:
            card.split.check(card.root_dir())
    items = [
        {"id": f"{card.name}/{it['id']}", "source": card.name, "item": it}
        for card in cards
        for it in ADAPTERS[card.adapter].items(card, card.opts(), card.root_dir())
    ]
    summary = run(
        LoadRecords(cards),
        items,
        out,
        driver=Deduplicate(cards, out),
        workers=workers,
        engine=engine,
        part_rows=shard_records,
        group_by="source",
        limit=limit,
        on_progress=on_progress,
    )
    return finalize(Path(out), cards, summary)
