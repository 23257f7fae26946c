"""medvl.jobs on a toy step over real files: counts, drop reasons, quarantine, resume after SIGKILL,
no-op re-runs, engines agreeing, worker processes ending with their parent.

Run as a script (`python tests/test_jobs.py SRC OUT WORKERS DELAY`) it is the job that the kill tests
start as a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pytest
from conftest import kill_9_after_commits

from medvl.errors import InputError
from medvl.jobs import DriverStep, Drop, Flag, Quarantine, Step, run

UNLUCKY = 13


class Squares(Step):
    """Item: a JSON file {"values": [int, ...]}. One row per value; negatives are dropped, 13 is a bad
    value (quarantined, the item's other values go on); a broken file is quarantined whole."""

    name = "squares"

    def __init__(self, delay: float = 0.0):
        self.delay = delay  # slows items down for the kill tests; does not change the output

    def schema(self) -> pa.Schema:
        return pa.schema([("id", pa.string()), ("value", pa.int64()), ("square", pa.int64())])

    def config(self) -> dict:
        return {"version": 1}

    def __call__(self, item: dict):
        time.sleep(self.delay)
        path = Path(item["path"])
        try:
            values = json.loads(path.read_text())["values"]
        except json.JSONDecodeError as e:
            raise InputError(path.name, "json", f"not valid JSON ({e.msg})") from None
        except KeyError:
            raise InputError(path.name, "values", "missing") from None
        for k, v in enumerate(values):
            if v == UNLUCKY:
                yield Quarantine(InputError(path.name, f"values[{k}]", "unlucky number"), {"index": k})
            elif v < 0:
                yield Drop("negative", {"value": v})
            else:
                yield {"id": f"{item['id']}#{k}", "value": v, "square": v * v}


class BreaksAt(Squares):
    """Squares that fail (not a bad input: the job stops) on item `bad`."""

    def __init__(self, bad: str):
        super().__init__()
        self.bad = bad

    def __call__(self, item):
        if item["id"] == self.bad:
            raise OSError("disk gone")
        return super().__call__(item)


class FirstOfEach(DriverStep):
    """Driver side, stateful: a value already kept (by any earlier item) is dropped, an even one flagged."""

    columns = ("id", "value")

    def __init__(self):
        self.seen: dict[int, str] = {}

    def resume(self, rows):
        for r in rows:
            self.seen.setdefault(r["value"], r["id"])

    def __call__(self, item, outcomes):
        result = []
        for o in outcomes:
            if isinstance(o, dict):
                if o["value"] in self.seen:
                    result.append(Drop("repeat", {"id": o["id"], "of": self.seen[o["value"]]}))
                    continue
                self.seen[o["value"]] = o["id"]
                if o["value"] % 2 == 0:
                    result.append(Flag("even", {"id": o["id"]}))
            result.append(o)
        return result


def write_inputs(folder: Path, n: int, seed: int = 0) -> dict:
    """n JSON files, with the bad ones spread through them; returns what a run must count."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    want = {"items": n, "kept": 0, "negative": 0, "repeat": 0, "no output": 0, "quarantined": 0, "even": 0}
    seen: set[int] = set()
    for i in range(n):
        path = folder / f"{i:04d}.json"
        if i % 37 == 5:
            path.write_text('{"values": [1, 2')  # truncated
            want["quarantined"] += 1
            continue
        if i % 41 == 7:
            path.write_text('{"numbers": [1]}')
            want["quarantined"] += 1
            continue
        if i % 43 == 9:
            path.write_text('{"values": []}')
            want["no output"] += 1
            continue
        values = [rng.randint(-20, 400) for _ in range(rng.randint(1, 4))]
        path.write_text(json.dumps({"values": values}))
        for v in values:
            if v == UNLUCKY:
                want["quarantined"] += 1
            elif v < 0:
                want["negative"] += 1
            elif v in seen:
                want["repeat"] += 1
            else:
                seen.add(v)
                want["kept"] += 1
                want["even"] += v % 2 == 0
    return want


def items_of(folder: Path) -> list[dict]:
    return [
        {"id": p.stem, "path": str(p), "group": "odd" if int(p.stem) % 2 else "even"}
        for p in sorted(folder.glob("*.json"))
    ]


def job(src: Path, out: Path, workers: int = 1, delay: float = 0.0, **kw) -> dict:
    return run(
        Squares(delay),
        items_of(src),
        out,
        driver=FirstOfEach(),
        workers=workers,
        part_rows=20,
        group_by="group",
        **kw,
    )


def files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, dict]:
    src = tmp_path_factory.mktemp("inputs")
    return src, write_inputs(src, 300)


@pytest.fixture(scope="module")
def clean(inputs, tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted run with two worker processes: what every other run must reproduce."""
    out = tmp_path_factory.mktemp("clean") / "out"
    return out, job(inputs[0], out, workers=2)


# ---------------------------------------------------------------- counts, reasons, quarantine


def test_counts_add_up_and_name_their_reasons(inputs, clean):
    _, want = inputs
    out, s = clean
    dropped = {r: want[r] for r in ("negative", "repeat", "no output") if want[r]}
    assert (s["items"], s["kept"], s["quarantined"], s["dropped"]) == (
        want["items"],
        want["kept"],
        want["quarantined"],
        dropped,
    )
    assert s["read"] == s["kept"] + s["quarantined"] + sum(s["dropped"].values())
    assert s["flagged"] == {"even": want["even"]}
    # Per group, and against the files themselves.
    for k in ("items", "read", "kept", "quarantined"):
        assert s[k] == sum(g[k] for g in s["by"].values())
    import pyarrow.parquet as pq

    rows = pq.read_table([out / d for d in s["data"]]).to_pylist()
    assert len(rows) == s["kept"] and len({r["id"] for r in rows}) == len(rows)
    assert all(r["square"] == r["value"] ** 2 and r["value"] >= 0 for r in rows)
    assert json.loads((out / "summary.json").read_text()) == s

    drops = read_jsonl(out / "dropped.jsonl")
    assert len(drops) == sum(s["dropped"].values())
    assert {d["reason"] for d in drops} == set(dropped)
    for d in drops:
        assert d["item"] and d["group"] in ("odd", "even")
        if d["reason"] == "negative":
            assert d["value"] < 0
        if d["reason"] == "repeat":  # `of` is a kept row with the same value
            assert next(r for r in rows if r["id"] == d["of"])["value"] in {r["value"] for r in rows}

    q = {(e["file"], e["field"]): e for e in read_jsonl(out / "quarantine.jsonl")}
    assert len(q) == s["quarantined"]
    assert "not valid JSON" in q[("0005.json", "json")]["problem"]
    assert q[("0007.json", "values")]["problem"] == "missing"
    unlucky = [e for e in q.values() if e["field"].startswith("values[")]
    assert all(e["problem"] == "unlucky number" and e["index"] >= 0 for e in unlucky)
    assert all(e["item"] == Path(e["file"]).stem for e in q.values())


def test_rerun_is_a_noop_and_another_config_is_refused(inputs, clean, tmp_path):
    src, _ = inputs
    out = tmp_path / "out"
    first = job(src, out)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "data").glob("*")}
    before |= {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "parts").glob("*")}

    class Refuses(Squares):  # same name and config: the same job, and it must not be asked for anything
        def __call__(self, item):
            raise AssertionError(f"item {item['id']} redone")

    again = run(Refuses(), items_of(src), out, driver=FirstOfEach(), part_rows=20, group_by="group")
    assert again == first
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in before}
    assert after == before and set((out / "parts").glob("*")) | set((out / "data").glob("*")) == set(before)

    class Changed(Squares):
        def config(self):
            return {"version": 2}

    with pytest.raises(InputError, match="another configuration"):
        run(Changed(), items_of(src), out, driver=FirstOfEach(), part_rows=20, group_by="group")


def test_a_failing_step_stops_the_job_and_a_rerun_completes_it(inputs, clean, tmp_path):
    src, _ = inputs
    out = tmp_path / "out"

    with pytest.raises(RuntimeError, match="'0150'.*disk gone"):
        run(BreaksAt("0150"), items_of(src), out, driver=FirstOfEach(), part_rows=20, group_by="group")
    done = [k for p in (out / "parts").glob("*.json") for k in json.loads(p.read_text())["items"]]
    assert 0 < len(done) < 150 and "0150" not in done
    job(src, out)
    assert files(out) == files(clean[0])


# ---------------------------------------------------------------- engines, resume


def test_one_worker_matches_two(inputs, clean, tmp_path):
    job(inputs[0], tmp_path / "one", workers=1)
    assert files(tmp_path / "one") == files(clean[0])


@pytest.fixture
def ray_by_value():
    """Ray, with this module's steps travelling by value (it is not importable on Ray's workers)."""
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        yield ray
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.mark.slow  # starting Ray takes ~20 s here
def test_ray_matches_local_and_the_caller_s_ray_stays_up(ray_by_value, inputs, clean, tmp_path):
    ray = ray_by_value
    assert not ray.is_initialized()  # every job that started Ray shut it down
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        job(inputs[0], tmp_path / "ray", workers=2, engine="ray")
        assert ray.is_initialized()  # the caller's Ray, not the job's to end
    finally:
        ray.shutdown()
    assert files(tmp_path / "ray") == files(clean[0])


@pytest.mark.slow  # starts Ray twice, ~20 s each here
def test_a_job_shuts_down_the_ray_it_started(ray_by_value, inputs, clean, tmp_path):
    ray = ray_by_value
    assert not ray.is_initialized()
    out = tmp_path / "ray"
    with pytest.raises(Exception, match="disk gone"):  # Ray wraps the step's error in its own
        run(BreaksAt("0150"), items_of(inputs[0]), out, driver=FirstOfEach(), workers=2, engine="ray",
            part_rows=20, group_by="group")  # fmt: skip
    assert not ray.is_initialized()  # ended on error too
    job(inputs[0], out, workers=2, engine="ray")  # a second job can start its own
    assert not ray.is_initialized()
    assert files(out) == files(clean[0])


def job_command(src: Path, out: Path, workers: int, delay: float) -> list[str]:
    return [sys.executable, __file__, str(src), str(out), str(workers), str(delay)]


def test_sigkilled_job_resumes_to_the_same_output(inputs, clean, tmp_path):
    """kill -9 mid-run (after a commit, so a part may be half written); the re-run's output equals an
    uninterrupted run's, byte for byte."""
    src, _ = inputs
    out = tmp_path / "out"
    done = kill_9_after_commits(job_command(src, out, workers=2, delay=0.01), out, 2)
    assert not (out / "summary.json").exists()
    assert 0 < len(done) < 300
    job(src, out, workers=1)
    assert files(out) == files(clean[0])


# ---------------------------------------------------------------- worker processes end with their parent


def live(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a killed orphan may linger as a zombie until init reaps it: that is gone)."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def assert_children_die_with(proc: subprocess.Popen, n: int, within: float = 5.0) -> None:
    """Wait for `n` child processes of `proc`, kill -9 `proc` alone, and require the children to be gone."""
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 60
    while len(parent.children(recursive=True)) < n and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    children = parent.children(recursive=True)
    assert len(children) >= n, proc.stderr.read().decode()[-2000:] if proc.poll() is not None else children
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.monotonic() + within
    while live(children) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = live(children)
    for p in alive:  # do not leave them behind for the rest of the suite
        p.kill()
    assert not alive, f"{len(alive)} worker process(es) outlived their killed parent"


def test_workers_end_when_the_job_is_killed(inputs, tmp_path):
    cmd = job_command(inputs[0], tmp_path / "out", workers=2, delay=0.05)
    assert_children_die_with(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), 2)


def test_watchdog_ends_an_orphan():
    """The fallback where the kernel cannot signal (not Linux): a process whose parent dies exits."""
    child = (
        "import sys, time; from medvl.jobs.workers import watch_parent; "
        "watch_parent(int(sys.argv[1]), interval=0.05); time.sleep(60)"
    )
    parent = (
        "import os, subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', {child!r}, str(os.getpid())]); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent], stderr=subprocess.PIPE)
    assert_children_die_with(proc, 1)


def main(argv: list[str]) -> None:
    src, out, workers, delay = Path(argv[0]), Path(argv[1]), int(argv[2]), float(argv[3])
    job(src, out, workers=workers, delay=delay)


if __name__ == "__main__":
    main(sys.argv[1:])
