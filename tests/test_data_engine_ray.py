"""The data engine on a cluster: `generate` and `quality` with `engine="ray"` write what the local engine
writes (the same job through medvl/jobs' Ray executor, two workers), with a benchmark of the engine's own
multiple-choice items as quality's contamination guard."""

from __future__ import annotations

import json

import pytest
from test_generate import png, record, write_curated

from medvl.generate.benchmark import write_benchmark
from medvl.generate.pipeline import generate
from medvl.generate.template import TemplateBackend
from medvl.quality.config import load_thresholds
from medvl.quality.pipeline import quality
from medvl.records import read_rows


def run(curated, bench_tsv, out, engine: str) -> tuple[dict, dict]:
    gen = generate([curated], out / "gen", TemplateBackend(), zh_share=0.5, workers=2, engine=engine)
    q = quality([out / "gen"], out / "q", load_thresholds(), benchmarks=[bench_tsv], workers=2, engine=engine)
    return gen, q


@pytest.mark.slow  # starts Ray twice, ~20 s each here
def test_generate_and_quality_on_ray_write_what_local_writes(tmp_path):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # another test's Ray: each job here must start (and end) its own
        ray.shutdown()
    rows = [record(i, split="test" if i >= 10 else "train") for i in range(12)]
    rows[3] = record(3, image={"bytes": png(seed=10), "path": None})  # a train copy of a test image
    curated = write_curated(tmp_path / "curated", rows)
    bench = tmp_path / "bench"
    generate([curated], bench, TemplateBackend(), splits=("test",), formats=("perception",), zh_share=0)
    tsv = write_benchmark(read_rows(bench / "samples.jsonl"), bench, tmp_path / "mc.tsv")

    local_gen, local_q = run(curated, tsv, tmp_path / "local", "local")
    ray_gen, ray_q = run(curated, tsv, tmp_path / "ray", "ray")
    assert not ray.is_initialized()  # each job shut down the Ray it started

    assert local_gen["kept"] > 0 and local_q["counts"]["kept"] > 0 and local_q["benchmark"]["dropped"]
    for name in ("gen/samples.jsonl", "gen/rejected.jsonl", "q/kept.jsonl"):
        local, on_ray = (tmp_path / side / name for side in ("local", "ray"))
        assert sorted(local.read_text().splitlines()) == sorted(on_ray.read_text().splitlines()), name
    assert {k: ray_gen[k] for k in ("read", "kept", "rejected")} == {
        k: local_gen[k] for k in ("read", "kept", "rejected")
    }
    assert ray_q["counts"] == local_q["counts"]
    assert json.dumps(ray_q["benchmark"], sort_keys=True) == json.dumps(local_q["benchmark"], sort_keys=True)
