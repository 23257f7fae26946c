"""The curation job: list items from every card, load them in parallel (processes, or Ray for a
cluster), map them onto the vocabularies, drop/flag duplicates, and commit Parquet shards atomically.

Commit unit = a *part*: `data/part-NNNNN.parquet` (the kept records, absent when there are none) and
then `parts/part-NNNNN.json` (which items it covers, what was quarantined, which duplicates were
dropped). A part counts only once its JSON exists, so a killed run resumes from the last committed part
and a finished run re-runs as a no-op. Items are consumed in a fixed order and duplicates are decided
against the records already kept, so the output does not depend on the number of workers.

Counting unit: a candidate record (one 2D image, slice or frame). An item that fails before it can be
split (unreadable file, missing mask) counts as one. read = kept + quarantined + duplicates.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from medvl.vocab import BODY_REGIONS, CLINICAL_TASKS, normalize_modality

from .adapters import ADAPTERS, Sample
from .card import Card
from .images import CurationError, content_hash, encode_png, perceptual_hash

SHARD_RECORDS = 1000
# PNG bytes do not compress further; zstd is kept for the other columns.
COMPRESSION = {c: "zstd" for c in ("id", "labels", "boxes", "mask_boxes", "meta", "file", "sha256", "phash")}


# ---------------------------------------------------------------- worker side


def build_record(card: Card, s: Sample) -> dict:
    """Validate a sample and map it onto the record schema (vocabularies, provenance, hashes)."""
    px = s.pixels
    if px.dtype != np.uint8 or px.ndim not in (2, 3) or (px.ndim == 3 and px.shape[2] != 3):
        raise CurationError(s.file, "image", f"wrongly shaped image: {px.dtype} array of shape {px.shape}")
    h, w = px.shape[:2]
    if min(h, w) < 2:
        raise CurationError(s.file, "image", f"degenerate {w}x{h} image")
    relabel = card.label_map.get
    boxes = [{**b, "label": relabel(b["label"], b["label"])} for b in s.boxes]
    for b in boxes:
        if not (0 <= b["x_min"] < b["x_max"] <= w and 0 <= b["y_min"] < b["y_max"] <= h):
            coords = [round(b[k], 1) for k in ("x_min", "y_min", "x_max", "y_max")]
            raise CurationError(
                s.file, "boxes", f"box {b['label']!r} {coords} lies outside the {w}x{h} image"
            )
    labels = list(dict.fromkeys(relabel(x, x) for x in s.labels))
    raw_mod = s.modality or card.modality or ""
    try:
        modality = card.modality_map.get(raw_mod) or normalize_modality(raw_mod)
    except ValueError as e:
        raise CurationError(s.file, "modality", str(e)) from None
    raw_region = s.body_region or card.body_region
    region = card.body_region_map.get(raw_region, raw_region) if raw_region else ""
    if region and region not in BODY_REGIONS:
        raise CurationError(
            s.file, "body_region", f"{raw_region!r} is not mapped onto BODY_REGIONS (body_region_map)"
        )
    department = card.department_by_region.get(region) or card.department
    if department is None:
        raise CurationError(
            s.file, "department", f"no department for body region {region!r} (department_by_region)"
        )
    tasks = {card.clinical_task_by_label[x] for x in labels if x in card.clinical_task_by_label}
    clinical = min(tasks, key=CLINICAL_TASKS.index) if tasks else card.clinical_task
    rid = f"{card.name}/{s.file}" + (f"#{s.index_kind}{s.index}" if s.index >= 0 else "")
    return {
        "id": rid,
        "image": {"bytes": encode_png(px), "path": None},
        "width": w,
        "height": h,
        "modality": modality,
        "body_region": region,
        "department": department,
        "original_task": card.original_task,
        "clinical_task": clinical,
        "labels": labels,
        "boxes": boxes,
        "mask_boxes": [{**b, "label": relabel(b["label"], b["label"])} for b in s.mask_boxes],
        "source": card.name,
        "license": card.license,
        "file": s.file,
        "index": s.index,
        "index_kind": s.index_kind,
        "sha256": content_hash(px),
        "phash": f"{perceptual_hash(px):016x}",
        "duplicate_of": None,
        "meta": json.dumps(s.meta, sort_keys=True),
    }


def process_item(cards: list[Card], task: tuple[int, dict]) -> dict:
    """Load one item into records; bad input becomes quarantine entries, never an exception."""
    ci, item = task
    card = cards[ci]
    adapter = ADAPTERS[card.adapter]
    out = {"key": [card.name, item["id"]], "records": [], "quarantined": [], "read": 0}
    try:
        for s in adapter.load(card, card.opts(), card.root_dir(), item):
            out["read"] += 1
            try:
                out["records"].append(build_record(card, s))
            except CurationError as e:
                out["quarantined"].append(_q(card, e, s.index))
    except CurationError as e:
        out["read"] += 1
        out["quarantined"].append(_q(card, e, None))
    except Exception as e:  # an adapter bug or an unforeseen format problem still must not stop the run
        out["read"] += 1
        out["quarantined"].append(
            {
                "source": card.name,
                "item": item["id"],
                "file": item["id"],
                "field": "item",
                "problem": f"unexpected {type(e).__name__}: {str(e)[:300]}",
                "index": None,
            }
        )
    return out


def _q(card: Card, e: CurationError, index: int | None) -> dict:
    return {"source": card.name, "file": e.file, "field": e.field, "problem": e.problem, "index": index}


_CARDS: list[Card] = []


def _init(cards: list[Card]) -> None:
    global _CARDS
    _CARDS = cards


def _work(task: tuple[int, dict]) -> dict:
    return process_item(_CARDS, task)


def run_local(cards: list[Card], tasks: list, workers: int) -> Iterator[dict]:
    if workers <= 1:
        yield from (process_item(cards, t) for t in tasks)
        return
    # Small chunks keep every worker busy while the results still arrive in order.
    with ProcessPoolExecutor(workers, initializer=_init, initargs=(cards,)) as pool:
        yield from pool.map(_work, tasks, chunksize=max(1, min(16, len(tasks) // (workers * 8) or 1)))


def run_ray(cards: list[Card], tasks: list, workers: int) -> Iterator[dict]:
    """The same items through `ray.data`. `ray.init()` honours RAY_ADDRESS, so pointing it at a cluster
    is `RAY_ADDRESS=ray://head:10001` (source paths must be readable from every node); otherwise a
    local Ray instance with `workers` CPUs is started."""
    import pickle

    import ray

    if not ray.is_initialized():
        local = not os.environ.get("RAY_ADDRESS")
        ray.init(
            num_cpus=workers if local else None,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deduplication is decided in item order
    ds = ray.data.from_items([{"t": pickle.dumps(t)} for t in tasks])
    ds = ds.map(lambda row: {"r": pickle.dumps(process_item(cards, pickle.loads(row["t"])))})
    for row in ds.iter_rows():
        yield pickle.loads(row["r"])


ENGINES: dict[str, Callable[[list[Card], list, int], Iterator[dict]]] = {"local": run_local, "ray": run_ray}


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


class Deduper:
    def __init__(self, cards: list[Card]):
        self.cards = {c.name: c for c in cards}
        self.exact: dict[str, str] = {}
        self.near = NearIndex(max(c.dedup.near_distance for c in cards))

    def keep(self, rid: str, sha: str, phash: str, item: str) -> None:
        self.exact.setdefault(sha, rid)
        self.near.add(int(phash, 16), rid, item)

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
        if policy.near != "keep":
            hit = self.near.find(int(rec["phash"], 16), item, policy.near_distance)
            if hit:
                return {"kind": "near", "of": hit[0], "distance": hit[1], "drop": policy.near == "drop"}
        return None


def _features():
    import datasets as hf

    box = hf.List(
        {
            k: hf.Value("string") if k == "label" else hf.Value("float32")
            for k in ("label", "x_min", "y_min", "x_max", "y_max")
        }
    )
    s = hf.Value("string")
    return hf.Features(
        {
            "id": s,
            "image": hf.Image(),
            "width": hf.Value("int32"),
            "height": hf.Value("int32"),
            "modality": s,
            "body_region": s,
            "department": s,
            "original_task": s,
            "clinical_task": s,
            "labels": hf.List(s),
            "boxes": box,
            "mask_boxes": box,
            "source": s,
            "license": s,
            "file": s,
            "index": hf.Value("int32"),
            "index_kind": s,
            "sha256": s,
            "phash": s,
            "duplicate_of": s,
            "meta": s,
        }
    )


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _cards_fingerprint(cards: list[Card]) -> str:
    return hashlib.sha256(
        json.dumps([c.model_dump(mode="json") for c in cards], sort_keys=True).encode()
    ).hexdigest()


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
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = [c.name for c in cards]
    if len(set(names)) != len(names):
        raise ValueError(f"two cards share a name: {names}")
    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "parts").mkdir(exist_ok=True)
    fp = _cards_fingerprint(cards)
    run_file = out / "run.json"
    if run_file.exists() and json.loads(run_file.read_text())["cards"] != fp:
        raise ValueError(
            f"{out} was written from different cards; use a new --out (or delete it) to start over"
        )
    _atomic_write(run_file, lambda p: p.write_text(json.dumps({"cards": fp, "sources": names}, indent=1)))

    # Resume: leftovers of a killed run (temp files, a shard whose part JSON never landed) are discarded.
    for p in out.rglob("*.tmp"):
        p.unlink()
    parts = sorted((out / "parts").glob("part-*.json"))
    committed = {p.stem for p in parts}
    for p in (out / "data").glob("part-*.parquet"):
        if p.stem not in committed:
            p.unlink()
    done: set[tuple[str, str]] = set()
    for p in parts:
        done.update(tuple(k) for k in json.loads(p.read_text())["items"])
    dedup = Deduper(cards)
    shards = sorted((out / "data").glob("part-*.parquet"))
    if shards:
        t = pq.read_table(shards, columns=["id", "sha256", "phash", "source", "file"])
        for rid, sha, ph, src, f in zip(
            *(t.column(c).to_pylist() for c in ("id", "sha256", "phash", "source", "file")), strict=True
        ):
            dedup.keep(rid, sha, ph, f"{src}/{f}")

    tasks = []
    for ci, card in enumerate(cards):
        adapter = ADAPTERS[card.adapter]
        for item in adapter.items(card, card.opts(), card.root_dir()):
            if (card.name, item["id"]) not in done:
                tasks.append((ci, item))
    tasks = tasks[:limit] if limit is not None else tasks
    features = _features()
    schema = features.arrow_schema
    next_part = 1 + max((int(p.stem.split("-")[1]) for p in parts), default=-1)
    state = {"items": [], "records": [], "quarantined": [], "duplicates": [], "read": 0, "kept": {}}

    def commit() -> None:
        nonlocal next_part, state
        name = f"part-{next_part:05d}"
        if state["records"]:
            table = pa.Table.from_pylist(state["records"], schema=schema)
            _atomic_write(
                out / "data" / f"{name}.parquet",
                lambda p: pq.write_table(table, p, row_group_size=256, compression=COMPRESSION),
            )
        body = {k: v for k, v in state.items() if k != "records"}
        body["shard"] = f"data/{name}.parquet" if state["records"] else None
        _atomic_write(out / "parts" / f"{name}.json", lambda p: p.write_text(json.dumps(body)))
        next_part += 1
        state = {"items": [], "records": [], "quarantined": [], "duplicates": [], "read": 0, "kept": {}}

    for n, res in enumerate(ENGINES[engine](cards, tasks, workers), 1):
        state["items"].append(res["key"])
        state["read"] += res["read"]
        state["quarantined"].extend({**q, "item": res["key"][1]} for q in res["quarantined"])
        for rec in res["records"]:
            dup = dedup.check(rec, f"{rec['source']}/{rec['file']}")
            if dup is not None:
                state["duplicates"].append({"id": rec["id"], "source": rec["source"], **dup})
                if dup["drop"]:
                    continue
                rec["duplicate_of"] = dup["of"]
            dedup.keep(rec["id"], rec["sha256"], rec["phash"], f"{rec['source']}/{rec['file']}")
            state["records"].append(rec)
            state["kept"][rec["source"]] = state["kept"].get(rec["source"], 0) + 1
        if len(state["records"]) >= shard_records or len(state["items"]) >= 4 * shard_records:
            commit()
        if on_progress:
            on_progress(n, len(tasks))
    if state["items"]:
        commit()

    from .report import finalize

    return finalize(out, cards)
