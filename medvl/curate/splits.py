"""A record's split (train / validation / test) as its source defines it, never guessed: from split list
files (one item per line, e.g. Pascal VOC's ImageSets/Main/train.txt), from glob patterns on the
record's file, or from the adapter's own index (SLAKE's train/validate/test JSON files, an .npz's
`train_` / `val_` / `test_` arrays). A record in several splits is an error unless the card gives a
precedence; a record in none gets ""."""

from __future__ import annotations

from fnmatch import fnmatchcase
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import Field, field_validator, model_validator

from medvl.errors import InputError
from medvl.records import Strict

SPLITS = ("train", "validation", "test")
# Source spellings of the three splits (compared in lower case).
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "trn": "train",
    "val": "validation",
    "valid": "validation",
    "validate": "validation",
    "validation": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
    "tst": "test",
}


def normalize_split(name: str) -> str:
    """`name` as one of SPLITS; ValueError when it is none of their spellings."""
    split = SPLIT_ALIASES.get(name.strip().lower())
    if split is None:
        raise ValueError(f"unknown split {name!r}; expected train, validation or test (or val, dev, ...)")
    return split


class SplitRule(Strict):
    """The card's `split:` block."""

    from_: Literal["files", "pattern", "index"] = Field(alias="from")
    # files: split -> list file relative to the card's root, one entry per line
    files: dict[str, str] = {}
    # files: what a line names: the record file's stem (VOC's ImageSets) or its path relative to the root
    match: Literal["stem", "path"] = "stem"
    # pattern: glob on the record's file (relative to the root) -> split
    patterns: dict[str, str] = {}
    # A record listed in several splits takes the first of these; without it, it is an InputError.
    precedence: list[str] = []

    @field_validator("files")
    @classmethod
    def _files(cls, v: dict[str, str]) -> dict[str, str]:
        out = {normalize_split(k): f for k, f in v.items()}
        if len(out) != len(v):
            raise ValueError("two list files for one split")
        return out

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, v: dict[str, str]) -> dict[str, str]:
        return {k: normalize_split(s) for k, s in v.items()}

    @field_validator("precedence")
    @classmethod
    def _precedence(cls, v: list[str]) -> list[str]:
        out = [normalize_split(s) for s in v]
        if len(set(out)) != len(out):
            raise ValueError("a split is named twice")
        return out

    @model_validator(mode="after")
    def _mode(self) -> SplitRule:
        given = {"files": bool(self.files), "pattern": bool(self.patterns)}
        for mode, present in given.items():
            if present and mode != self.from_:
                raise ValueError(f"`{'patterns' if mode == 'pattern' else mode}` belongs to `from: {mode}`")
        if self.from_ in given and not given[self.from_]:
            raise ValueError(
                f"`from: {self.from_}` needs `{'patterns' if self.from_ == 'pattern' else 'files'}`"
            )
        return self

    def check(self, root: Path) -> None:
        """Read the list files now, so that a missing or unreadable one stops the run with its name
        instead of quarantining every record."""
        if self.from_ == "files":
            _listed(str(root), tuple(self.files.items()), self.match)

    def resolve(self, root: Path, file: str, given: list[str]) -> str:
        """The split of a record of `file` (relative to root); `given`: the adapter's own split names for
        it (`from: index`)."""
        if self.from_ == "files":
            found = _listed(str(root), tuple(self.files.items()), self.match).get(_key(file, self.match), [])
            where = [f"{s} ({self.files[s]})" for s in found]
        elif self.from_ == "pattern":
            found = list(dict.fromkeys(s for g, s in self.patterns.items() if fnmatchcase(file, g)))
            where = [f"{s} ({g})" for g, s in self.patterns.items() if fnmatchcase(file, g)]
        else:
            try:
                found = list(dict.fromkeys(normalize_split(s) for s in given))
            except ValueError as e:
                raise InputError(file, "split", str(e)) from None
            where = found
        if len(found) > 1:
            ranked = [s for s in self.precedence if s in found]
            if not ranked:
                raise InputError(
                    file, "split", f"listed in {len(found)} splits: {', '.join(where)} (no `precedence`)"
                )
            return ranked[0]
        return found[0] if found else ""


def _key(file: str, match: str) -> str:
    return PurePosixPath(file).stem if match == "stem" else PurePosixPath(file).as_posix()


@lru_cache(maxsize=8)
def _listed(root: str, files: tuple[tuple[str, str], ...], match: str) -> dict[str, list[str]]:
    """key -> the splits whose list file names it. Lines are stripped; blank lines and `#` comments are
    skipped; a line naming a path is reduced to its stem when `match` is stem."""
    out: dict[str, list[str]] = {}
    for split, rel in files:
        path = Path(root) / rel
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError(rel, "split", f"{split} list file not found under {root}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(
                rel, "split", f"{split} list file is not readable text ({type(e).__name__})"
            ) from None
        for line in text.splitlines():
            entry = line.strip()
            if entry and not entry.startswith("#"):
                key = _key(entry, match)
                if split not in out.setdefault(key, []):
                    out[key].append(split)
    return out
