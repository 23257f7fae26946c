"""medvl.records: the strict base model, the curated-record schema and the one row-file reader."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from medvl.errors import InputError
from medvl.records import CURATED_COLUMNS, Strict, curated_features, curated_schema, read_rows, with_defaults

ROWS = [
    {"id": "a", "n": 1, "tags": ["x"]},
    {"id": "b", "n": 2, "tags": []},
    {"id": "c", "n": 3, "tags": ["y", "z"]},
]


def test_read_rows_reads_every_format_alike(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(ROWS, indent=2))
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in ROWS))  # JSONL under .json
    parts = tmp_path / "parts"
    parts.mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS[:2]), parts / "part-00000.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[2:]), parts / "part-00001.parquet")
    for path in ("list.json", "rows.jsonl", "lines.json", "parts", "parts/part-00000.parquet"):
        want = ROWS[:2] if path.endswith("00000.parquet") else ROWS
        assert read_rows(tmp_path / path) == want, path
    assert (
        read_rows([tmp_path / "parts" / "part-00001.parquet", str(tmp_path / "rows.jsonl")])
        == ROWS[2:] + ROWS
    )


def test_read_rows_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"id": "b", \n')
    with pytest.raises(InputError) as e:
        read_rows(bad)
    assert (e.value.file, e.value.field) == (str(bad), "line 3") and "not valid JSON" in e.value.problem
    listed = tmp_path / "bad.json"
    listed.write_text('[\n  {"id": "a"},\n  {"id": }\n]')
    with pytest.raises(InputError) as e:
        read_rows(listed)
    assert str(e.value).startswith(f"{listed}: line 3: not valid JSON")
    listed.write_text('[{"id": "a"}, 5]')
    with pytest.raises(InputError, match=r"bad.json: \[1\]: expected a JSON object, got int"):
        read_rows(listed)
    bad.write_text('{"id": "a"}\n[1, 2]\n')
    with pytest.raises(InputError, match="bad.jsonl: line 2: expected a JSON object, got list"):
        read_rows(bad)
    with pytest.raises(InputError, match="missing.jsonl: file: not found"):
        read_rows(tmp_path / "missing.jsonl")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="broken.parquet: file: not a readable Parquet file"):
        read_rows(tmp_path / "broken.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no .parquet files"):
        read_rows(tmp_path / "empty")


def test_strict_refuses_unknown_keys():
    class Conf(Strict):
        lr: float = 1e-3

    assert Conf(lr=0.1).lr == 0.1
    with pytest.raises(ValidationError, match="lrr"):
        Conf(lrr=0.1)


def test_curated_schema_is_documented_and_decodes_images():
    names = [c.name for c in CURATED_COLUMNS]
    assert len(set(names)) == len(names) and all(c.doc.strip() for c in CURATED_COLUMNS)
    schema = curated_schema()
    assert schema.names == names
    features = curated_features()
    # The Hugging Face metadata travels with the Arrow schema: a reader gets the image decoded.
    import io

    import datasets
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (5, 4), 7).save(buf, format="PNG")
    row = {c.name: None for c in CURATED_COLUMNS} | {"image": {"bytes": buf.getvalue(), "path": None}}
    table = pa.Table.from_pylist([row], schema=schema)
    ds = datasets.Dataset(table)
    assert ds.features == features and ds[0]["image"].size == (5, 4)


def test_older_curated_rows_read_with_the_documented_defaults(tmp_path):
    # A curated part written before split / annotation / regions existed: read_rows returns what is
    # there, with_defaults adds the later columns as documented, and a value present is never replaced.
    old = [c.name for c in CURATED_COLUMNS if c.default is None]
    assert {"split", "annotation", "regions"} <= {c.name for c in CURATED_COLUMNS} - set(old)
    pq.write_table(pa.Table.from_pylist([{"id": "a", "labels": ["x"]}]), tmp_path / "part-00000.parquet")
    (row,) = read_rows(tmp_path)
    assert "split" not in row
    full = with_defaults(row)
    assert full["split"] == "" and json.loads(full["regions"]) == []
    assert json.loads(full["annotation"]) == {"exhaustive": False, "label_space": []}
    assert full["id"] == "a" and full["labels"] == ["x"]
    assert with_defaults({"split": "test"})["split"] == "test"
