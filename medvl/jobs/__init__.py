"""Resumable, sharded batch jobs. A `Step` maps one item to output rows, drops (with a reason),
quarantined candidates and flags (notes on kept rows); `run` owns the rest: sharding, worker processes
or Ray, the commit log, Parquet parts, the quarantine/drop/flag files and the counts. Curation runs on
it (docs/curate.md).

    class Lengths(Step):
        name = "lengths"

        def schema(self):
            return pa.schema([("id", pa.string()), ("chars", pa.int64())])

        def __call__(self, item):
            text = Path(item["path"]).read_text()
            if not text:
                raise InputError(item["path"], "text", "empty file")  # quarantined, the job goes on
            if len(text) > 10_000:
                yield Drop("too long", {"chars": len(text)})
            else:
                yield {"id": item["id"], "chars": len(text)}

    run(Lengths(), [{"id": p.name, "path": str(p)} for p in sorted(folder.glob("*.txt"))], "out", workers=4)
"""

from .runner import atomic_write, run, summarize
from .step import DriverStep, Drop, Flag, Outcome, Quarantine, Step
from .workers import ENGINES, die_with_parent

__all__ = [
    "ENGINES",
    "Drop",
    "Flag",
    "DriverStep",
    "Outcome",
    "Quarantine",
    "Step",
    "atomic_write",
    "die_with_parent",
    "run",
    "summarize",
]
