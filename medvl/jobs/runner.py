"""The runner: items -> step (workers) -> driver step -> Parquet parts, committed one at a time.

Output folder:

    job.json                  the job's fingerprint (step name, config, schema)
    data/part-NNNNN.parquet   the kept rows of a part (absent when it kept none)
    parts/part-NNNNN.json     the commit log: which items the part covers, its counts, drops, quarantine
    quarantine.jsonl          every quarantined candidate: item, file, field, problem (+ the step's detail)
    dropped.jsonl             every dropped candidate: item, reason (+ the step's detail)
    flagged.jsonl             every flag on a kept row: item, reason (+ the step's detail)
    summary.json              the counts

A part counts once its JSON exists (written after its Parquet file, each to a temp file then renamed),
so a killed job resumes after the last committed part and a finished one re-runs as a no-op. Items run
in input order and parts are cut by the same rule whatever the engine or the number of workers, so a
resumed job writes the same files, byte for byte, as one that was never stopped.

Counting unit: a candidate, i.e. each row, `Drop` or `Quarantine` a step yields; an item that fails as a
whole counts once (quarantined), one that yields nothing counts once (dropped, reason "no output").
read = kept + dropped + quarantined is checked at the end of every run, and kept against the Parquet
files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from medvl.errors import InputError

from .step import DriverStep, Drop, Flag, Quarantine, Step
from .workers import ENGINES

PART_ROWS = 1000
ROW_GROUP_ROWS = 256  # streaming readers hold one row group at a time, never a whole part


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then rename onto `path`: a reader (or a resumed job) sees all of it or none."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def fingerprint(step: Step, driver: DriverStep | None) -> str:
    spec = {
        "step": step.name,
        "config": step.config(),
        "schema": step.schema().to_string(show_schema_metadata=False),
        "driver": None if driver is None else [type(driver).__name__, driver.config()],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def run(
    step: Step,
    items: Iterable[dict],
    out: str | Path,
    *,
    driver: DriverStep | None = None,
    workers: int = 1,
    engine: str = "local",
    part_rows: int = PART_ROWS,
    group_by: str | None = None,
    limit: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Run (or resume) the job; returns the summary (also written to out/summary.json).

    `items`: dicts with a unique string "id", in the order they are to be processed. `group_by`: an item
    field (e.g. the source an item came from) copied into each of its log entries, with the counts
    broken down by it. `limit`: process at most this many items not yet done (a smoke test; a later run
    does the rest)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; one of {', '.join(ENGINES)}")
    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "parts").mkdir(exist_ok=True)
    job = {"step": step.name, "fingerprint": fingerprint(step, driver), "group_by": group_by}
    job_file = out / "job.json"
    if job_file.exists() and json.loads(job_file.read_text()) != job:
        raise InputError(
            str(out), "job.json", "written by a job with another configuration; use a new output folder"
        )
    atomic_write(job_file, lambda p: p.write_text(json.dumps(job, indent=1)))

    # Leftovers of a killed run (temp files, a Parquet part whose JSON never landed) are discarded.
    for p in out.rglob("*.tmp"):
        p.unlink()
    parts = sorted((out / "parts").glob("part-*.json"))
    committed = {p.stem for p in parts}
    for p in (out / "data").glob("part-*.parquet"):
        if p.stem not in committed:
            p.unlink()
    done = {key for p in parts for key in json.loads(p.read_text())["items"]}
    if driver is not None:
        shards = sorted((out / "data").glob("part-*.parquet"))
        cols = list(driver.columns)
        driver.resume(pq.read_table(shards, columns=cols).to_pylist() if shards and cols else [])

    todo, seen = [], set()
    for it in items:
        key = it["id"]
        if not isinstance(key, str) or key in seen:
            raise ValueError(f"item ids must be unique strings; got {key!r} twice or of another type")
        seen.add(key)
        if key not in done:
            todo.append(it)
    todo = todo[:limit] if limit is not None else todo

    schema = step.schema()
    names = set(schema.names)
    next_part = 1 + max((int(p.stem.split("-")[1]) for p in parts), default=-1)
    part = _empty_part()

    def commit() -> None:
        nonlocal next_part, part
        name = f"part-{next_part:05d}"
        rows = part.pop("rows")
        if rows:
            table = pa.Table.from_pylist(rows, schema=schema)
            atomic_write(
                out / "data" / f"{name}.parquet",
                lambda p: pq.write_table(
                    table, p, row_group_size=ROW_GROUP_ROWS, compression=step.compression
                ),
            )
        part["data"] = f"data/{name}.parquet" if rows else None
        atomic_write(out / "parts" / f"{name}.json", lambda p: p.write_text(json.dumps(part)))
        next_part += 1
        part = _empty_part()

    # A Ray that this job starts (none was running) is the job's own: shut down when the job ends, also
    # on error, so that it does not outlive the job in the caller's process (a later ray.init() there
    # would fail). A Ray the caller started stays up.
    owns_ray = engine == "ray" and not _ray_running()
    results = ENGINES[engine](step, todo, workers)
    try:
        for n, (item, outcomes) in enumerate(zip(todo, results, strict=True), 1):
            if driver is not None:
                outcomes = driver(item, outcomes)
            if all(isinstance(o, Flag) for o in outcomes):
                outcomes = [*outcomes, Drop("no output")]
            tags = {"item": item["id"]}
            if group_by is not None:
                tags[group_by] = str(item[group_by])
            group = part["groups"].setdefault(tags.get(group_by, ""), {"items": 0, "read": 0, "kept": 0})
            part["items"].append(item["id"])
            group["items"] += 1
            for o in outcomes:
                group["read"] += not isinstance(o, Flag)
                if isinstance(o, Flag):
                    part["flagged"].append({**tags, "reason": o.reason, **o.detail})
                elif isinstance(o, Drop):
                    part["dropped"].append({**tags, "reason": o.reason, **o.detail})
                elif isinstance(o, Quarantine):
                    e = o.error
                    part["quarantined"].append(
                        {**tags, "file": e.file, "field": e.field, "problem": e.problem, **o.detail}
                    )
                else:
                    if set(o) != names:
                        raise ValueError(
                            f"step {step.name!r} gave a row for item {item['id']!r} whose keys differ from "
                            f"its schema: missing {sorted(names - set(o))}, unknown {sorted(set(o) - names)}"
                        )
                    part["rows"].append(o)
                    group["kept"] += 1
            if len(part["rows"]) >= part_rows or len(part["items"]) >= 4 * part_rows:
                commit()
            if on_progress:
                on_progress(n, len(todo))
    finally:
        results.close()
        if owns_ray:
            import ray

            ray.shutdown()
    if part["items"]:
        commit()
    return summarize(out)


def _ray_running() -> bool:
    import ray

    return ray.is_initialized()


def _empty_part() -> dict:
    return {"items": [], "groups": {}, "dropped": [], "quarantined": [], "flagged": [], "rows": []}


def _counts(groups: list[dict], dropped: list[dict], quarantined: list[dict], flagged: list[dict]) -> dict:
    c = {k: sum(g[k] for g in groups) for k in ("items", "read", "kept")}
    c |= {
        "dropped": dict(sorted(Counter(d["reason"] for d in dropped).items())),
        "quarantined": len(quarantined),
        "flagged": dict(sorted(Counter(f["reason"] for f in flagged).items())),
    }
    if c["read"] != c["kept"] + len(dropped) + len(quarantined) or c["read"] < c["items"]:
        raise RuntimeError(f"counts do not add up: {c}")
    return c


def summarize(out: str | Path) -> dict:
    """Add up the committed parts of a job folder, check them against the Parquet files, write
    quarantine.jsonl, dropped.jsonl, flagged.jsonl and summary.json.

    Summary: items, read (candidates) = kept + dropped + quarantined, dropped and flagged by reason; with
    `group_by`, the same per group under "by"; "data": the Parquet parts."""
    import pyarrow.parquet as pq

    out = Path(out)
    group_by = json.loads((out / "job.json").read_text())["group_by"]
    logs = [json.loads(p.read_text()) for p in sorted((out / "parts").glob("part-*.json"))]
    entries = {k: [e for log in logs for e in log[k]] for k in ("dropped", "quarantined", "flagged")}
    data = [log["data"] for log in logs if log["data"]]
    summary = _counts([g for log in logs for g in log["groups"].values()], *entries.values())
    rows = sum(pq.read_metadata(out / d).num_rows for d in data)
    if rows != summary["kept"]:
        raise RuntimeError(f"{out}: the parts log {summary['kept']} kept rows, the Parquet files hold {rows}")
    if group_by is not None:
        names = sorted({k for log in logs for k in log["groups"]})
        summary["by"] = {
            name: _counts(
                [log["groups"][name] for log in logs if name in log["groups"]],
                *([e for e in v if e[group_by] == name] for v in entries.values()),
            )
            for name in names
        }
    summary["data"] = data
    lines = lambda entries: "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries)  # noqa: E731
    for k, name in (("quarantined", "quarantine"), ("dropped", "dropped"), ("flagged", "flagged")):
        atomic_write(out / f"{name}.jsonl", lambda p, v=entries[k]: p.write_text(lines(v)))
    atomic_write(out / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=1)))
    return summary
