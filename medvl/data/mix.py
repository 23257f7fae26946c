"""Stage mixtures (`medvl mix`): one YAML per training stage names its sources (quality-kept sets,
existing LLaVA JSON, text-only sets) and how much of each to take, as the columns of GMAI-VL's
Table 7 do (the share of each dataset used in a stage). The output is one LLaVA JSON per stage that a
`medvl train` stage config reads as it is (`data: [{path: mix/stage2.json}]`), plus a manifest.

    seed: 0
    sources:
      - name: slake-captions         # unique; prefixes the sample ids (slake-captions/<id>)
        path: work/q/kept.jsonl      # JSON list or JSONL; relative paths from the current directory
        image_root: null             # image paths are relative to it (default: the file's folder)
        datasets: [slake]            # optional filters: provenance.source, format, lang
        formats: [caption, region]
        languages: [en, zh]
        fraction: 1.0                # Table 7's share of the (filtered) source; above 1 repeats it
      - name: text
        path: general_text.json
        count: 500                   # or a number of samples
      - name: bccd
        path: work/q/kept.jsonl
        datasets: [bccd]
        weight: 2                    # or a relative weight of `total`
    total: 2000                      # only with weights: what the weighted sources share

Rows without `format` count as "text" (no image) or "unknown"; without `lang`, py3langid names it.

Sampling is deterministic: each source draws from its own generator, seeded by the mixture's seed and
the source's name (so adding a source leaves the others' draws alone); a count above the source's size
takes whole copies and then a sample of the rest; the mixture is then shuffled by the seed. Image paths
in the output are relative to the output file's folder, the default `image_root` of a training data
entry, so they resolve wherever the tree (sources and mixture) is moved together. Relative paths in the
YAML are taken from the current directory, as in stage configs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Annotated, TypeVar

import numpy as np
import typer
import yaml
from pydantic import Field, ValidationError, model_validator

from medvl.errors import InputError
from medvl.records import Strict, read_rows

M = TypeVar("M", bound=Strict)


def read_yaml(path: str | Path) -> dict:
    """A YAML file holding a mapping (empty: {}); an `InputError` naming the file otherwise."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(str(path), "file", "not found") from None
    except yaml.YAMLError as e:
        raise InputError(str(path), "yaml", f"not valid YAML ({' '.join(str(e).split())})") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise InputError(str(path), "<top level>", "expected a mapping of keys to values")
    return raw


def as_model(raw: dict, model: type[M], path: str | Path) -> M:
    """`raw` as a strict pydantic model; a problem is an `InputError` naming `path` and the first
    offending key (`sources.1.count`)."""
    try:
        return model(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "<top level>"
        if err["type"] == "extra_forbidden":
            problem = "unknown key"
        else:
            problem = f"{err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})"
        raise InputError(str(path), key, problem) from None


class MixSource(Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    path: Path
    image_root: Path | None = None
    datasets: list[str] | None = None
    formats: list[str] | None = None
    languages: list[str] | None = None
    fraction: float | None = Field(None, gt=0)
    count: int | None = Field(None, ge=0)
    weight: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_amount(self) -> MixSource:
        given = [k for k in ("fraction", "count", "weight") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of fraction, count, weight (got {given or 'none'})")
        return self


class Mix(Strict):
    seed: int = 0
    total: int | None = Field(None, gt=0)
    sources: list[MixSource] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> Mix:
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
        weighted = any(s.weight is not None for s in self.sources)
        if weighted != (self.total is not None):
            raise ValueError("weights need `total` (the samples they share), and `total` needs weights")
        return self


def load_mix(path: str | Path) -> Mix:
    return as_model(read_yaml(path), Mix, path)


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")])


def take(n_rows: int, n: int, rng: np.random.Generator) -> list[int]:
    """`n` row indices out of `n_rows`: whole copies first, then a sample without replacement of the
    rest, each in source order."""
    if n_rows == 0:
        return []
    copies, rest = divmod(n, n_rows)
    return [i for _ in range(copies) for i in range(n_rows)] + sorted(
        rng.choice(n_rows, rest, replace=False).tolist()
    )


def _amounts(mix: Mix, sizes: list[int]) -> list[int]:
    weights = sum(s.weight or 0 for s in mix.sources)
    out = []
    for s, size in zip(mix.sources, sizes, strict=True):
        if s.count is not None:
            out.append(s.count)
        elif s.fraction is not None:
            out.append(round(s.fraction * size))
        else:
            assert s.weight is not None and mix.total is not None
            out.append(round(mix.total * s.weight / weights))
    return out


def _format_and_lang(row: dict) -> tuple[str, str]:
    from medvl.samples import lang_of

    fmt = row.get("format") or ("text" if not (row.get("image") or row.get("volume")) else "unknown")
    lang = row.get("lang")
    if not lang:
        text = " ".join(t.get("value", "") for t in row.get("conversations") or [] if isinstance(t, dict))
        lang = lang_of(text)[0] if text.strip() else "unknown"
    return str(fmt), str(lang)


def _dataset(row: dict) -> str:
    prov = row.get("provenance")
    return str(prov.get("source", "")) if isinstance(prov, dict) else ""


def _selected(s: MixSource, rows: list[dict]) -> list[tuple[int, dict, tuple[str, str]]]:
    """The source's rows that pass its filters: (index in the file, row, (format, language))."""
    out = []
    for i, row in enumerate(rows):
        fmt, lang = _format_and_lang(row)
        if s.formats is not None and fmt not in s.formats:
            continue
        if s.languages is not None and lang not in s.languages:
            continue
        if s.datasets is not None and _dataset(row) not in s.datasets:
            continue
        out.append((i, row, (fmt, lang)))
    return out


def _resolve(p: Path, base: Path) -> Path:
    return p if p.is_absolute() else base / p


def mix(path: str | Path, out: str | Path, base_dir: str | Path | None = None) -> dict:
    """Write `<out>/<yaml stem>.json` (LLaVA JSON) and `<out>/<yaml stem>.manifest.json`; returns the
    manifest. Relative paths in the YAML are taken from `base_dir` (default: the current directory,
    as in stage configs). Every image or volume a sample names must exist (an `InputError` names the source
    file and the sample otherwise)."""
    path, out = Path(path), Path(out)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    spec = load_mix(path)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{path.stem}.json"
    sources, sizes = [], []
    for s in spec.sources:
        file = _resolve(s.path, base)
        rows = read_rows(file)
        sources.append((s, file, len(rows), _selected(s, rows)))
        sizes.append(len(sources[-1][3]))
    manifest: dict = {"mix": str(path), "seed": spec.seed, "output": target.name, "sources": []}
    chosen: list[dict] = []
    for (s, file, n_read, rows), n in zip(sources, _amounts(spec, sizes), strict=True):
        root = (_resolve(s.image_root, base) if s.image_root is not None else file.parent).resolve()
        if n and not rows:
            raise InputError(
                str(file), "rows", f"source {s.name!r} has no rows (after its filters) to take {n} of"
            )
        picks = take(len(rows), n, _rng(spec.seed, s.name))
        seen: Counter = Counter()
        by: Counter = Counter()
        for k in picks:
            i, row, kind = rows[k][0], dict(rows[k][1]), rows[k][2]
            if not isinstance(row.get("conversations"), list) or not row["conversations"]:
                raise InputError(str(file), f"[{i}].conversations", "missing or empty")
            images = row.get("image")
            if images:
                paths = [images] if isinstance(images, str) else list(images)
                moved = []
                for p in paths:
                    full = root / p
                    if not full.is_file():
                        raise InputError(str(file), f"[{i}].image", f"image file not found under {root}: {p}")
                    moved.append(os.path.relpath(full, out.resolve()))
                row["image"] = moved[0] if isinstance(images, str) else moved
            if row.get("volume"):  # a stored volume (docs/3d.md), relative to the same root
                full = root / str(row["volume"])
                if not full.is_file():
                    raise InputError(str(file), f"[{i}].volume", f"volume file not found under {root}")
                row["volume"] = os.path.relpath(full, out.resolve())
            rid = f"{s.name}/{row.get('id', i)}"
            seen[rid] += 1
            row["id"] = rid if seen[rid] == 1 else f"{rid}#{seen[rid]}"
            by[kind] += 1
            chosen.append(row)
        manifest["sources"].append(
            {
                "name": s.name,
                "path": str(file),
                "image_root": str(root),
                "read": n_read,
                "available": len(rows),  # after the filters
                "filters": {k: getattr(s, k) for k in ("datasets", "formats", "languages") if getattr(s, k)},
                "asked": {
                    k: getattr(s, k) for k in ("fraction", "count", "weight") if getattr(s, k) is not None
                },
                "taken": len(picks),
                "distinct": len(set(picks)),
                "by_format": _tally(by, 0),
                "by_language": _tally(by, 1),
                "by_format_language": {f"{f}/{lang}": c for (f, lang), c in sorted(by.items())},
            }
        )
    order = np.random.default_rng(spec.seed).permutation(len(chosen)).tolist()
    chosen = [chosen[i] for i in order]
    text = json.dumps(chosen, ensure_ascii=False, indent=None)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)
    manifest["total"] = len(chosen)
    manifest["sha256"] = hashlib.sha256(text.encode()).hexdigest()
    for key in ("by_format", "by_language"):
        manifest[key] = dict(sorted(sum((Counter(x[key]) for x in manifest["sources"]), Counter()).items()))
    if sum(x["taken"] for x in manifest["sources"]) != manifest["total"]:
        raise RuntimeError(f"{target}: the manifest's counts do not add up")
    (out / f"{path.stem}.manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    return manifest


def _tally(by: Counter, k: int) -> dict[str, int]:
    c: Counter = Counter()
    for key, n in by.items():
        c[key[k]] += n
    return dict(sorted(c.items()))


def mix_command(
    files: Annotated[list[Path], typer.Argument(help="Mixture YAML files, one per training stage.")],
    out: Annotated[
        Path, typer.Option("--out", help="Output folder: <stage>.json and <stage>.manifest.json.")
    ],
) -> None:
    """Sample training stages' data mixtures (Table 7 style: sources with fractions, counts or weights),
    deterministically by seed; a stage config reads the output as `data: [{path: <out>/<stage>.json}]`."""
    for f in files:
        m = mix(f, out)
        parts = ", ".join(f"{s['name']} {s['taken']}" for s in m["sources"])
        typer.echo(f"{out / m['output']}: {m['total']} samples ({parts}); manifest {f.stem}.manifest.json")
