"""Where a step runs: in this process, in local worker processes that end with their parent, or on Ray.
Every engine yields each item's outcomes in input order."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor

from medvl.errors import InputError

from .step import Outcome, Quarantine, Step

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCH_INTERVAL_S = 1.0


def process(step: Step, item: dict) -> list[Outcome]:
    """The step on one item; a bad item becomes one quarantine entry, its partial outcomes discarded."""
    try:
        return list(step(item))
    except InputError as e:
        return [Quarantine(e)]
    except Exception as e:
        raise RuntimeError(
            f"step {step.name!r} failed on item {item['id']!r}: {type(e).__name__}: {e}"
        ) from e


def watch_parent(parent: int, interval: float = WATCH_INTERVAL_S) -> None:
    """End this process once `parent` is no longer its parent (it died, and the orphan was handed to init
    or a subreaper). Polls; `die_with_parent` uses it where the kernel cannot signal."""

    def loop() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=loop, name="medvl-parent-watch", daemon=True).start()


def die_with_parent(parent: int | None = None) -> None:
    """Make this worker end when its parent ends, however it ends: a pool worker outliving a killed
    driver would go on burning CPU and memory with nobody to read its results. On Linux the kernel sends
    SIGKILL (PR_SET_PDEATHSIG); elsewhere a thread polls the parent pid. `parent`: the pid the parent
    had when it started this process (checked after arming, in case it died in between)."""
    parent = os.getppid() if parent is None else parent
    armed = False
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    if os.getppid() != parent:
        os._exit(1)
    if not armed:
        watch_parent(parent)


_STEP: Step | None = None


def _init(step: Step, parent: int | None) -> None:
    global _STEP
    die_with_parent(parent)
    step.setup()
    _STEP = step


def _work(item: dict) -> list[Outcome]:
    assert _STEP is not None
    return process(_STEP, item)


def run_local(step: Step, items: list[dict], workers: int) -> Iterator[list[Outcome]]:
    if workers <= 1:
        step.setup()
        yield from (process(step, it) for it in items)
        return
    ctx = multiprocessing.get_context()
    # With fork and spawn the driver is the workers' parent, so a worker can tell that it died before
    # the worker armed its death signal; with forkserver the parent is the server (it exits with us).
    parent = os.getpid() if ctx.get_start_method() in ("fork", "spawn") else None
    # Small chunks keep every worker busy while the results still arrive in order.
    chunk = max(1, min(16, len(items) // (workers * 8)))
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init, initargs=(step, parent)) as pool:
        yield from pool.map(_work, items, chunksize=chunk)


class _RayWorker:
    """One Ray actor: set up once, then items one by one (pickled, so rows stay a single bytes column)."""

    def __init__(self, step: Step):
        step.setup()
        self.step = step

    def __call__(self, row: dict) -> dict:
        import pickle

        return {"r": pickle.dumps(process(self.step, pickle.loads(row["t"])))}


def run_ray(step: Step, items: list[dict], workers: int) -> Iterator[list[Outcome]]:
    """The items through `ray.data`, `workers` actors. `ray.init()` honours RAY_ADDRESS, so pointing a job
    at a cluster is `RAY_ADDRESS=ray://head:10001` (inputs must be readable from every node); otherwise a
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
    if not items:
        return
    ctx = ray.data.DataContext.get_current()
    before = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # a driver step sees items in input order
    try:
        ds = ray.data.from_items([{"t": pickle.dumps(it)} for it in items])
        ds = ds.map(_RayWorker, fn_constructor_args=(step,), concurrency=max(1, workers))
        for row in ds.iter_rows():
            yield pickle.loads(row["r"])
    finally:
        ctx.execution_options.preserve_order = before


ENGINES: dict[str, Callable[[Step, list[dict], int], Iterator[list[Outcome]]]] = {
    "local": run_local,
    "ray": run_ray,
}
