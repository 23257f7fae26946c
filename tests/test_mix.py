"""`medvl mix`: stage mixtures by fraction, count or weight, deterministic by seed, with a manifest whose
counts add up, one-line errors for bad YAML, and an output that `medvl train` trains on."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import write_training_data

from medvl.data.mix import mix
from medvl.errors import InputError


def text_rows(path: Path, n: int, lang: str = "en") -> Path:
    rows = [
        {
            "id": f"t{i}",
            "conversations": [
                {"from": "human", "value": f"Question number {i} about anatomy?"},
                {"from": "gpt", "value": f"Answer number {i}."},
            ],
            "format": "text",
            "lang": lang,
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def sources(tmp_path, monkeypatch) -> Path:
    """A LLaVA JSON with images (32 samples, 24 with an image, in its own folder) and two text sets."""
    write_training_data(tmp_path / "vision", n=32)
    text_rows(tmp_path / "text_en.jsonl", 10)
    text_rows(tmp_path / "text_zh.jsonl", 6, lang="zh")
    monkeypatch.chdir(tmp_path)  # relative paths in a mixture are taken from the current directory
    return tmp_path


def write_mix(folder: Path, name: str, spec: dict) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


SPEC = {
    "seed": 3,
    "sources": [
        {"name": "vision", "path": "vision/train.json", "fraction": 0.5},
        {"name": "text-en", "path": "text_en.jsonl", "count": 25},
        {"name": "text-zh", "path": "text_zh.jsonl", "count": 4},
    ],
}


def test_mix_honours_fractions_and_counts_and_the_manifest_adds_up(sources):
    out = sources / "mix"
    m = mix(write_mix(sources, "stage2", SPEC), out)
    data = json.loads((out / "stage2.json").read_text())
    taken = {s["name"]: s["taken"] for s in m["sources"]}
    assert taken == {"vision": 16, "text-en": 25, "text-zh": 4}
    assert len(data) == m["total"] == sum(taken.values())
    by_source = Counter(r["id"].split("/")[0] for r in data)
    assert by_source == taken
    # a count above the source's size takes whole copies, then a sample of the rest
    en = Counter(r["id"].split("#")[0] for r in data if r["id"].startswith("text-en/"))
    assert sorted(Counter(en.values()).items()) == [(2, 5), (3, 5)]
    assert len({r["id"] for r in data}) == len(data)
    zh = next(s for s in m["sources"] if s["name"] == "text-zh")
    assert zh["by_language"] == {"zh": 4} and zh["by_format"] == {"text": 4} and zh["distinct"] == 4
    assert sum(m["by_format"].values()) == sum(m["by_language"].values()) == m["total"]
    assert json.loads((out / "stage2.manifest.json").read_text()) == m
    # image paths resolve from the output file's folder (a training data entry's default image root)
    with_images = [r for r in data if "image" in r]
    assert with_images and all((out / r["image"]).is_file() for r in with_images)


def test_mix_is_deterministic_by_seed(sources):
    a = mix(write_mix(sources, "s", SPEC), sources / "a")
    b = mix(write_mix(sources, "s", SPEC), sources / "b")
    assert (sources / "a" / "s.json").read_bytes() == (sources / "b" / "s.json").read_bytes()
    assert a["sha256"] == b["sha256"]
    c = mix(write_mix(sources, "s", {**SPEC, "seed": 4}), sources / "c")
    assert c["sha256"] != a["sha256"] and c["total"] == a["total"]
    # adding a source leaves the other sources' draws alone
    more = {**SPEC, "sources": [*SPEC["sources"], {"name": "extra", "path": "text_en.jsonl", "count": 3}]}
    mix(write_mix(sources, "s", more), sources / "d")
    ids = lambda f: sorted(r["id"] for r in json.loads(f.read_text()) if not r["id"].startswith("extra/"))  # noqa: E731
    assert ids(sources / "d" / "s.json") == ids(sources / "a" / "s.json")


def test_filters_pick_formats_languages_and_datasets(sources, tmp_path):
    rows = [
        {"id": f"s{i}", "format": fmt, "lang": lang, "provenance": {"source": ds},
         "conversations": [{"from": "human", "value": "q?"}, {"from": "gpt", "value": "a."}]}
        for i, (fmt, lang, ds) in enumerate(
            [("caption", "en", "a"), ("caption", "zh", "a"), ("text", "en", "a"), ("caption", "en", "b")] * 3
        )
    ]  # fmt: skip
    (sources / "kept.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"sources": [{"name": "x", "path": "kept.jsonl", "fraction": 1.0, "formats": ["caption"],
                         "languages": ["en"], "datasets": ["a"]}]}  # fmt: skip
    # the YAML may live anywhere: its paths are taken from the current directory
    (sources / "cfg").mkdir()
    m = mix(write_mix(sources / "cfg", "f", spec), sources / "f")
    (src,) = m["sources"]
    assert (src["read"], src["available"], src["taken"]) == (12, 3, 3)
    assert src["by_format_language"] == {"caption/en": 3}
    ids = sorted(r["id"] for r in json.loads((sources / "f" / "f.json").read_text()))
    assert ids == ["x/s0", "x/s4", "x/s8"]


def test_weights_share_a_total(sources):
    spec = {
        "total": 30,
        "sources": [
            {"name": "vision", "path": "vision/train.json", "weight": 2},
            {"name": "text", "path": "text_en.jsonl", "weight": 1},
        ],
    }
    m = mix(write_mix(sources, "w", spec), sources / "w")
    assert {s["name"]: s["taken"] for s in m["sources"]} == {"vision": 20, "text": 10}


@pytest.mark.parametrize(
    "change, key",
    [
        (
            {"sources": [{"name": "x", "path": "text_en.jsonl", "fraktion": 1}]},
            r"sources\.0\.fraktion: unknown key",
        ),
        (
            {"sources": [{"name": "x", "path": "text_en.jsonl", "count": 2, "fraction": 1}]},
            r"sources\.0: give exactly",
        ),
        ({"sources": [{"name": "x", "path": "text_en.jsonl", "count": -1}]}, r"sources\.0\.count: "),
        (
            {"sources": [{"name": "x", "path": "text_en.jsonl", "weight": 1}]},
            r"<top level>: weights need `total`",
        ),
        ({"sources": [{"name": "x", "path": "missing.json", "count": 1}]}, r"missing\.json: file: not found"),
    ],
)
def test_bad_mix_files_fail_in_one_line_naming_file_and_key(sources, change, key):
    path = write_mix(sources, "bad", {"seed": 0, **change})
    with pytest.raises(InputError, match=key) as e:
        mix(path, sources / "out")
    assert "\n" not in str(e.value)
    if "missing" not in key:
        assert str(e.value).startswith(str(path))


def test_a_missing_image_names_the_source_and_sample(sources):
    (sources / "vision" / "img" / "0.png").unlink()
    path = write_mix(sources, "m", {"sources": [{"name": "v", "path": "vision/train.json", "fraction": 1.0}]})
    with pytest.raises(InputError, match=r"train\.json: \[0\]\.image: image file not found"):
        mix(path, sources / "out")


def test_a_mix_trains_with_the_tiny_preset(sources, tiny_model_dir, tmp_path):
    from test_train import stage_yaml

    from medvl.train.config import load_config
    from medvl.train.loop import train_stage

    out = sources / "mix"
    mix(write_mix(sources, "stage1", SPEC), out)
    cfg = load_config(stage_yaml(tmp_path, tiny_model_dir, out / "stage1.json", "mixed", max_steps=2))
    final = train_stage(cfg)
    history = json.loads((cfg.output_dir / "history.json").read_text())
    assert len(history) == 2 and all(h["loss"] > 0 for h in history)
    assert (final / "config.json").is_file()


def test_shipped_stage_mixtures_parse():
    from medvl.data.mix import load_mix

    repo = Path(__file__).resolve().parent.parent
    files = sorted((repo / "configs" / "mix").glob("*.yaml"))
    assert [f.stem for f in files] == ["stage1", "stage2", "stage3"]
    for f in files:
        assert load_mix(f).sources
