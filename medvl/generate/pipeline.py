"""Curated records -> validated instruction samples, on `medvl.jobs` (workers, Ray, resume after kill -9).

One item is one curated record. A volume record (`kind == "volume"`) gets 3D samples
(:mod:`medvl.generate.volume`) from its facts (:func:`medvl.volume_facts.volume_facts`), naming its stored
array, copied once to `volumes/<sha256>.npy` (and, for plane questions, the array turned to another
plane); a backend without volume support (`Backend.volumes`) skips it with the reason `SKIP_VOLUME`
(its slices, curated as image records, are generated as usual). Any other record's step computes the fact
sheet (a bad record — missing field,
unreadable image, box outside the image — is quarantined with its id and the reason), writes the image
once as `images/<sha256>.png`, asks the backend for every requested format in English and, for a share
of (record, format) pairs drawn from the seed, in Chinese, validates each sample against the fact sheet
and keeps it or rejects it with its reasons.

Output folder (besides the job files of `medvl.jobs`: `data/part-*.parquet` = the Parquet copy, one row
per kept sample with its provenance columns; `parts/`, `dropped.jsonl`, `quarantine.jsonl`):

    images/<sha256>.png   each record's image, written once (SHA-256 of the PNG file)
    volumes/<sha256>.npy  each volume record's array (and its turned copies), written once
    samples.jsonl         the kept samples, LLaVA rows (`medvl train` with image_root = this folder)
    rejected.jsonl        every rejected sample with its reasons (and records that gave no sample)
    report.json           counts: read = kept + rejected + quarantined + skipped, by source x format x
                          language
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from medvl.errors import InputError
from medvl.jobs import Drop, Step, atomic_write, run
from medvl.records import read_rows
from medvl.samples import FORMATS, decode_image, fact_sheet, validate

from .backend import Backend, seeded

DEFAULT_SPLITS = ("train",)
DEFAULT_ZH_SHARE = 0.3
SKIP_VOLUME = "volume: this backend writes from 2D images (volume records: the template backend)"


class GenerateStep(Step):
    name = "generate"

    def __init__(
        self,
        backend: Backend,
        out: str | Path,
        formats: Sequence[str],
        zh_share: float,
        seed: int,
        run_modalities: Sequence[str] = (),
        run_regions: Sequence[str] = (),
    ) -> None:
        unknown = [f for f in formats if f not in FORMATS]
        if unknown or not formats:
            raise ValueError(
                f"formats must be among {', '.join(FORMATS)}; got {', '.join(formats) or 'none'}"
            )
        if not 0 <= zh_share <= 1:
            raise ValueError(f"zh share must be within 0-1, got {zh_share}")
        self.backend, self.images = backend, Path(out) / "images"
        self.formats, self.zh_share, self.seed = tuple(formats), float(zh_share), int(seed)
        self.run_modalities, self.run_regions = list(run_modalities), list(run_regions)

    def config(self) -> dict:
        return {
            **self.backend.config(),
            "formats": self.formats,
            "zh_share": self.zh_share,
            "seed": self.seed,
            "run_modalities": self.run_modalities,
            "run_regions": self.run_regions,
        }

    def schema(self):
        import pyarrow as pa

        s = pa.string()
        return pa.schema(
            [("id", s), ("record_id", s), ("source", s), ("split", s), ("format", s), ("lang", s),
             ("pair_id", s), ("image", s), ("modality", s), ("backend", s), ("model", s),
             ("prompt_version", s), ("seed", pa.int64()), ("sample", s)]
        )  # fmt: skip

    def setup(self) -> None:
        self.backend.setup()

    def write_image(self, png: bytes, sha: str) -> None:
        """images/<sha>.png, atomically; a file already there has these very bytes (its name is their
        hash). The temp name carries the pid: two workers may hold records with the same image."""
        path = self.images / f"{sha}.png"
        if path.exists():
            return
        self.images.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(png)
        os.replace(tmp, path)

    def finish(
        self, raw: dict, facts, fmt: str, lang: str, i: int, pair: str | None, volume: str | None = None
    ) -> dict:
        """A backend's raw sample -> the output sample: id, image (or the stored `volume` it names),
        format, language, provenance, facts."""
        sid = f"{facts.record_id}:{fmt}:{i}:{lang}"
        s: dict = {"id": sid}
        if fmt != "text" and volume is not None:
            s["volume"] = volume
        elif fmt != "text":
            s["image"] = f"images/{facts.image_sha256}.png"
        s["conversations"] = raw.get("conversations")
        for key in ("options", "answer", "kind", "box", "plane"):
            if key in raw:
                s[key] = raw[key]
        s["format"], s["lang"] = fmt, lang
        if lang == "zh":
            s["pair_id"] = pair
        s["provenance"] = {
            "record_id": facts.record_id,
            "source": facts.source,
            "split": facts.split,
            "format": fmt,
            "lang": lang,
            "prompt_version": self.backend.prompt_version,
            "backend": self.backend.name,
            "model": self.backend.model,
            "seed": self.seed,
        }
        s["facts"] = self.facts_json(facts)
        return s

    def facts_json(self, facts) -> dict:
        """The sheet as JSON, once per record (every sample of a record carries the same)."""
        if getattr(self, "_facts", (None,))[0] is not facts:
            self._facts = (facts, json.loads(facts.to_json()))
        return self._facts[1]

    def row(self, s: dict, facts) -> dict:
        p = s["provenance"]
        return {
            "id": s["id"], "record_id": facts.record_id, "source": facts.source, "split": facts.split,
            "format": s["format"], "lang": s["lang"], "pair_id": s.get("pair_id"),
            "image": s.get("image") or s.get("volume"),
            "modality": facts.modality, "backend": p["backend"], "model": p["model"],
            "prompt_version": p["prompt_version"], "seed": self.seed,
            "sample": json.dumps(s, ensure_ascii=False, sort_keys=True),
        }  # fmt: skip

    def __call__(self, item: dict) -> Iterable[dict | Drop]:
        record = item["record"]
        if record.get("kind") == "volume":
            if not self.backend.volumes:
                yield Drop(SKIP_VOLUME)
                return
            yield from self.volume_samples(record, Path(item["root"]))
            return
        png, im = decode_image(record)
        facts = fact_sheet(record, (png, im))
        facts.run_modalities, facts.run_regions = self.run_modalities, self.run_regions
        if any(f != "text" for f in self.formats):
            self.write_image(png, facts.image_sha256)
        for fmt in self.formats:
            rid = facts.record_id
            with_zh = seeded(self.seed, rid, fmt, "zh").random() < self.zh_share
            english = self.backend.write(facts, fmt, "en", seeded(self.seed, rid, fmt))
            kept: dict[int, dict] = {}
            for i, raw in enumerate(english):
                s = self.finish(raw, facts, fmt, "en", i, None)
                reasons = validate(s, facts)
                if reasons:
                    yield self.reject(s, raw, reasons)
                else:
                    kept[i] = s
                    yield self.row(s, facts)
            if not (with_zh and kept):
                continue
            for i, raw in enumerate(self.backend.write(facts, fmt, "zh", seeded(self.seed, rid, fmt))):
                original = kept.get(i)
                pair = original["id"] if original else f"{rid}:{fmt}:{i}:en"
                s = self.finish(raw, facts, fmt, "zh", i, pair)
                reasons = validate(s, facts, original) if original else ["english rejected"]
                yield self.reject(s, raw, reasons) if reasons else self.row(s, facts)

    def volume_samples(self, record: dict, root: Path) -> Iterable[dict | Drop]:
        """The 2D loop for a volume record: its facts, its stored array copied into the output folder,
        every format in English and a seeded share in Chinese, each sample validated against the facts."""
        import numpy as np

        from medvl.imaging import store_volume
        from medvl.samples import validate_volume
        from medvl.volume_facts import reformat, volume_facts

        from .volume import write_volume

        rid = str(record.get("id"))
        try:
            facts = volume_facts(record)
        except (KeyError, ValueError, TypeError) as e:
            raise InputError(rid, "volume", str(e)) from e
        path = root / facts.file
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(rid, "volume", f"stored array {path} unreadable: {e}") from e
        if array.ndim != 4 or list(array.shape) != list(facts.shape):
            raise InputError(rid, "volume", f"stored array shape {array.shape}, record says {facts.shape}")
        out = self.images.parent
        axial = store_volume(out, array)
        files: dict[str, str] = {}

        def file_for(raw: dict) -> str:
            plane = raw.get("plane", "axial")
            if plane not in files:
                files[plane] = axial if plane == "axial" else store_volume(out, reformat(array, plane))
            return files[plane]

        for fmt in self.formats:
            with_zh = seeded(self.seed, rid, fmt, "zh").random() < self.zh_share
            kept: dict[int, dict] = {}
            for lang in ("en", "zh") if with_zh else ("en",):
                raws = write_volume(facts, fmt, lang, seeded(self.seed, rid, fmt))
                for i, raw in enumerate(raws):
                    original = kept.get(i)
                    if lang == "zh" and original is None:
                        continue  # its English sample was rejected: no pair to keep
                    pair = original["id"] if original else None
                    s = self.finish(raw, facts, fmt, lang, i, pair, volume=file_for(raw))
                    reasons = validate_volume(s, facts, original)
                    if reasons:
                        yield self.reject(s, raw, reasons)
                        continue
                    if lang == "en":
                        kept[i] = s
                    yield self.row(s, facts)

    @staticmethod
    def reject(s: dict, raw: dict, reasons: list[str]) -> Drop:
        extra = {k: raw[k] for k in ("error", "reply") if k in raw}  # a backend's own account of a failure
        return Drop(
            reasons[0],
            {"reasons": reasons, "format": s["format"], "lang": s["lang"], "sample": {**s, **extra}},
        )


def load_records(paths: Sequence[str | Path]) -> list[dict]:
    """Curated records from curated output folders (their `data/`), Parquet files or folders of them, in
    order; a record id seen twice is an error (two curated copies of one source)."""
    return [r for r, _ in load_records_with_roots(paths)]


def curated_root(path: Path) -> Path:
    """The curated folder (where `volumes/` lies) of a path given to :func:`load_records`."""
    if (path / "data").is_dir():
        return path
    folder = path if path.is_dir() else path.parent
    return folder.parent if folder.name == "data" else folder


def load_records_with_roots(paths: Sequence[str | Path]) -> list[tuple[dict, Path]]:
    """:func:`load_records`, each record with its curated folder."""
    rows, seen = [], {}
    for p in paths:
        p = Path(p)
        src = p / "data" if (p / "data").is_dir() else p
        for r in read_rows(src):
            rid = r.get("id")
            if not isinstance(rid, str) or not rid:
                raise InputError(str(p), "id", "a record without an id")
            if rid in seen:
                raise InputError(str(p), "id", f"record {rid!r} also in {seen[rid]}")
            seen[rid] = str(p)
            rows.append((r, curated_root(p)))
    return rows


def select(records: Iterable[dict], splits: Sequence[str]) -> list[dict]:
    """The records of the named splits, plus those of sources that define no split (split "": nothing
    of theirs is held out for evaluation)."""
    return [r for r in records if (r.get("split") or "") in (*splits, "")]


def generate(
    curated: Sequence[str | Path],
    out: str | Path,
    backend: Backend,
    *,
    splits: Sequence[str] = DEFAULT_SPLITS,
    formats: Sequence[str] = FORMATS,
    zh_share: float = DEFAULT_ZH_SHARE,
    seed: int = 0,
    workers: int = 1,
    engine: str = "local",
    limit: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    prepare: Callable[[GenerateStep, list[dict]], bool] | None = None,
) -> dict | None:
    """Run (or resume) a generation job; returns the report (also out/report.json). `prepare(step,
    items)` runs first (a backend's dry run, batch files or prefetching); when it returns True the job
    stops there and None is returned."""
    out = Path(out)
    loaded = load_records_with_roots(curated)
    roots = {id(r): root for r, root in loaded}
    records = select([r for r, _ in loaded], splits)
    items = [
        {"id": r["id"], "source": str(r.get("source") or ""), "record": r, "root": str(roots[id(r)])}
        for r in records
    ]
    step = GenerateStep(
        backend,
        out,
        formats,
        zh_share,
        seed,
        run_modalities=sorted({str(r["modality"]) for r in records if r.get("modality")}),
        run_regions=sorted({str(r["body_region"]) for r in records if r.get("body_region")}),
    )
    if prepare is not None and prepare(step, items):
        return None
    run(
        step,
        items,
        out,
        workers=workers,
        engine=engine,
        group_by="source",
        limit=limit,
        on_progress=on_progress,
    )
    return finalize(out)


def finalize(out: str | Path) -> dict:
    """samples.jsonl, rejected.jsonl and report.json from the committed parts (all of them: a resumed job
    writes the same files as one never stopped)."""
    import pyarrow.parquet as pq

    from medvl.jobs import summarize

    out = Path(out)
    summary = summarize(out)
    parts = [out / d for d in summary["data"]]
    rows = pq.read_table(parts, columns=["source", "format", "lang", "sample"]).to_pylist() if parts else []
    atomic_write(out / "samples.jsonl", lambda p: p.write_text("".join(r["sample"] + "\n" for r in rows)))
    dropped = read_rows(out / "dropped.jsonl") if (out / "dropped.jsonl").stat().st_size else []
    quarantined = read_rows(out / "quarantine.jsonl") if (out / "quarantine.jsonl").stat().st_size else []
    skipped = [d for d in dropped if d["reason"] == SKIP_VOLUME]
    rejected = [
        {"record_id": d["item"], "source": d["source"], "format": d.get("format", ""),
         "lang": d.get("lang", ""), "reason": d["reason"], "reasons": d.get("reasons", [d["reason"]]),
         "sample": d.get("sample")}
        for d in dropped
        if d["reason"] != SKIP_VOLUME
    ]  # fmt: skip
    atomic_write(
        out / "rejected.jsonl",
        lambda p: p.write_text(
            "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rejected)
        ),
    )
    by: dict = {}
    for r in rows:
        cell = by.setdefault(r["source"], {}).setdefault(r["format"], {}).setdefault(r["lang"], _cell())
        cell["kept"] += 1
    for r in rejected:
        cell = (
            by.setdefault(r["source"], {})
            .setdefault(r["format"] or "-", {})
            .setdefault(r["lang"] or "-", _cell())
        )
        cell["rejected"] += 1
        cell["reasons"][r["reason"]] = cell["reasons"].get(r["reason"], 0) + 1
    report = {
        "read": summary["read"],
        "kept": len(rows),
        "rejected": len(rejected),
        "quarantined": len(quarantined),
        "skipped": len(skipped),
        "records": summary["items"],
        "reasons": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "quarantined_by_source": dict(sorted(Counter(q["source"] for q in quarantined).items())),
        "skipped_reasons": dict(sorted(Counter(d["reason"] for d in skipped).items())),
        "skipped_by_source": dict(sorted(Counter(d["source"] for d in skipped).items())),
        "by": by,
    }
    if report["read"] != report["kept"] + report["rejected"] + report["quarantined"] + report["skipped"]:
        raise RuntimeError(f"{out}: counts do not add up: {report}")
    atomic_write(out / "report.json", lambda p: p.write_text(json.dumps(report, indent=1, sort_keys=True)))
    return report


def _cell() -> dict:
    return {"kept": 0, "rejected": 0, "reasons": {}}
