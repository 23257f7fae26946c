"""Dataset cards: one YAML file per source says which adapter reads it, where the files are, and how
its modality, labels, department and licence map onto the shared vocabularies (medvl/vocab.py)."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from medvl.imaging import CT_WINDOWS, MAX_PIXELS
from medvl.records import Strict
from medvl.vocab import BODY_REGIONS, CLINICAL_TASKS, ORIGINAL_TASKS, check_department, normalize_modality

from .splits import SplitRule


class CardError(ValueError):
    pass


class Dedup(Strict):
    # What happens to the later of two duplicates (cards are ranked in the order given, then by provenance
    # id): drop it (counted as a duplicate), flag it (kept, `duplicate_of` set) or keep it silently.
    exact: Literal["drop", "flag", "keep"] = "drop"
    near: Literal["drop", "flag", "keep"] = "flag"
    near_distance: int = Field(4, ge=0, le=16)  # pHash Hamming distance (of 64 bits)


class Card(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    adapter: str
    root: str
    license: str
    description: str = ""
    research_only: Literal[True] = True  # every source we curate is for research, never for diagnosis
    modality: str | None = None  # None: each item says (DICOM Modality tag, SLAKE's json)
    modality_map: dict[str, str] = {}
    body_region: str | None = None
    body_region_map: dict[str, str] = {}  # source spelling -> BODY_REGIONS
    department: str | None = None
    department_by_region: dict[str, str] = {}
    original_task: str
    clinical_task: str
    clinical_task_by_label: dict[str, str] = {}
    label_map: dict[str, str] = {}  # source label -> label used in records
    label_names: dict[int, str] = {}  # mask / label-volume value (or class index) -> label
    # Labels of this source known up front (record spelling), on top of label_names and label_map values.
    label_space: list[str] = []
    # True only when the source annotates every label of its label space on every image, so that a label
    # absent from a record is a verified negative.
    exhaustive_labels: bool = False
    split: SplitRule | None = None  # None: the source defines no split; every record gets ""
    ct_window: str = "auto"  # "auto" picks the window by body region (images.WINDOW_BY_REGION)
    max_side: int = Field(1024, ge=16)
    max_pixels: int = Field(MAX_PIXELS, ge=1)
    dedup: Dedup = Dedup()
    options: dict = {}  # adapter-specific, checked against the adapter's own model

    @field_validator("ct_window")
    @classmethod
    def _window(cls, v: str) -> str:
        return _check(v, ("auto", *CT_WINDOWS), "CT window")

    @field_validator("modality")
    @classmethod
    def _modality(cls, v: str | None) -> str | None:
        return None if v is None else normalize_modality(v)

    @field_validator("modality_map")
    @classmethod
    def _modality_map(cls, v: dict[str, str]) -> dict[str, str]:
        return {k: normalize_modality(m) for k, m in v.items()}

    @field_validator("department")
    @classmethod
    def _department(cls, v: str | None) -> str | None:
        return None if v is None else check_department(v)

    @field_validator("department_by_region")
    @classmethod
    def _departments(cls, v: dict[str, str]) -> dict[str, str]:
        for region, dept in v.items():
            check_department(dept)
            _check(region, BODY_REGIONS, "body region")
        return v

    @field_validator("body_region")
    @classmethod
    def _region(cls, v: str | None) -> str | None:
        return None if v is None else _check(v, BODY_REGIONS, "body region")

    @field_validator("body_region_map")
    @classmethod
    def _regions(cls, v: dict[str, str]) -> dict[str, str]:
        return {k: _check(r, BODY_REGIONS, "body region") for k, r in v.items()}

    @field_validator("original_task")
    @classmethod
    def _otask(cls, v: str) -> str:
        return _check(v, ORIGINAL_TASKS, "original task")

    @field_validator("clinical_task")
    @classmethod
    def _ctask(cls, v: str) -> str:
        return _check(v, CLINICAL_TASKS, "clinical task")

    @field_validator("clinical_task_by_label")
    @classmethod
    def _ctasks(cls, v: dict[str, str]) -> dict[str, str]:
        return {k: _check(t, CLINICAL_TASKS, "clinical task") for k, t in v.items()}

    @model_validator(mode="after")
    def _adapter(self) -> Card:
        from .adapters import ADAPTERS

        if self.adapter not in ADAPTERS:
            raise ValueError(f"unknown adapter {self.adapter!r}; registered: {', '.join(sorted(ADAPTERS))}")
        if self.department is None and not self.department_by_region:
            raise ValueError("give `department` or `department_by_region`")
        if self.exhaustive_labels and not self.labels():
            raise ValueError(
                "`exhaustive_labels: true` needs a label space (label_space, label_names or label_map)"
            )
        if (
            self.split
            and self.split.from_ == "index"
            and not getattr(ADAPTERS[self.adapter], "SPLITS", False)
        ):
            raise ValueError(
                f"adapter {self.adapter!r} reads no splits of its own; use `from: files` or `pattern`"
            )
        return self

    def labels(self) -> list[str]:
        """The label space: `label_space`, `label_names` values and `label_map` values, all in record
        spelling (after `label_map`), sorted. A record's labels must lie in it when it is not empty."""
        m = self.label_map
        return sorted(
            {m.get(x, x) for x in [*self.label_space, *self.label_names.values()]} | set(m.values())
        )

    _path: Path | None = PrivateAttr(None)  # the YAML file, set by load_card

    def root_dir(self) -> Path:
        return resolve_root(self.root, self._path.parent if self._path else Path.cwd())

    def opts(self):  # the adapter's validated options
        from .adapters import ADAPTERS

        return ADAPTERS[self.adapter].Options(**self.options)


def _check(v: str, vocab: tuple[str, ...], what: str) -> str:
    if v not in vocab:
        raise ValueError(f"unknown {what} {v!r}; expected one of {', '.join(vocab)}")
    return v


_ENV = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def resolve_root(root: str, base: Path) -> Path:
    """`${VAR:-default}` is expanded; `pkg:module/sub/dir` is a folder inside an installed package (the
    real samples shipped with pydicom, pydicom-data and nibabel); relative paths are from the card."""
    root = _ENV.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), root)
    if root.startswith("pkg:"):
        mod, _, sub = root[4:].partition("/")
        spec = importlib.util.find_spec(mod)
        if spec is None or not spec.submodule_search_locations:
            raise CardError(f"root {root!r}: package {mod!r} is not installed")
        return Path(list(spec.submodule_search_locations)[0]) / sub
    p = Path(root).expanduser()
    return p if p.is_absolute() else (base / p)


def load_card(path: str | Path) -> Card:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CardError(f"{path}: cannot read card: {e}") from None
    if not isinstance(raw, dict):
        raise CardError(f"{path}: a card is a YAML mapping, got {type(raw).__name__}")
    try:
        card = Card(**raw)
    except ValidationError as e:
        raise CardError(_explain(path, e, "")) from None
    card._path = path
    try:
        card.opts()
    except ValidationError as e:
        raise CardError(_explain(path, e, "options.")) from None
    return card


def _explain(path: Path, e: ValidationError, prefix: str) -> str:
    keys = [(prefix + ".".join(str(p) for p in err["loc"])).rstrip(".") or "<card>" for err in e.errors()]
    return f"{path}: " + "; ".join(
        f"key '{k}': {err['msg']}" for k, err in zip(keys, e.errors(), strict=True)
    )
