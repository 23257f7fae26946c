"""What a job runs: a `Step` turns one input item into its outcomes, in a worker process; an optional
`DriverStep` sees every item's outcomes in input order, in the driver, and may keep state across items
(deduplication against everything kept so far)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from medvl.errors import InputError

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True)
class Drop:
    """A candidate left out on purpose. `reason` is a short fixed name ("duplicate", "too short"), the
    unit of the summary's counts; `detail` (JSON-able) goes to `dropped.jsonl` with it."""

    reason: str
    detail: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Quarantine:
    """One bad candidate of an item whose other candidates go on (one unreadable slice of a volume).
    A step whose whole item is bad raises the `InputError` instead."""

    error: InputError
    detail: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Flag:
    """A note on a kept row ("near duplicate of X, kept under the flag policy"): logged to `flagged.jsonl`
    and counted by reason; not a candidate of its own."""

    reason: str
    detail: dict = field(default_factory=dict)


Outcome = dict | Drop | Quarantine | Flag  # a dict is an output row, in the step's schema


class Step:
    """One item in, its outcomes out: output rows (dicts), `Drop`s, `Quarantine`s and `Flag`s, in any
    number.

    An item is a picklable dict with a unique string `"id"`. Raising `medvl.errors.InputError`
    quarantines the whole item (outcomes yielded before it are discarded) and the job goes on; any other
    exception stops the job, leaving every committed part in place for a re-run. The object is pickled
    to the workers, so keep heavy state (models, clients) out of `__init__` and build it in `setup`."""

    name: str = "step"
    compression: str | dict[str, str] = "zstd"  # Parquet codec, or one per column

    def schema(self) -> pa.Schema:
        """The Arrow schema of the output rows."""
        raise NotImplementedError

    def config(self) -> Any:
        """Everything that changes the output, JSON-able: the job's fingerprint. A re-run into the same
        folder with another config is refused, so done items are never mixed with differently made ones."""
        return {}

    def setup(self) -> None:
        """Once per worker process, before its first item."""

    def __call__(self, item: dict) -> Iterable[Outcome]:
        raise NotImplementedError


class DriverStep:
    """Runs in the driver on each item's outcomes, in input order, whatever the number of workers; may
    turn rows into drops or change them. Its state must follow from the rows already kept: on resume
    `resume` is given the committed rows (only `columns` of them), in order."""

    columns: tuple[str, ...] = ()

    def config(self) -> Any:
        return {}

    def resume(self, rows: Iterable[dict]) -> None:
        """Rebuild the state from the rows committed by earlier runs."""

    def __call__(self, item: dict, outcomes: list[Outcome]) -> list[Outcome]:
        return outcomes
