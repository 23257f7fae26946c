"""The environment the tests run in is the locked one: every package pinned in constraints.txt is
installed at exactly its pinned version (what `make setup` installs on a fresh clone)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement

LOCK = Path(__file__).resolve().parent.parent / "constraints.txt"


def test_installed_versions_are_the_locked_ones():
    pins = [
        Requirement(line)
        for line in LOCK.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert len(pins) > 50 and all(str(r.specifier).startswith("==") for r in pins)
    wrong = []
    for req in pins:
        try:
            have = version(req.name)
        except PackageNotFoundError:
            have = "not installed"
        if have not in req.specifier:
            wrong.append(f"{req.name}: locked {req.specifier}, installed {have}")
    assert not wrong, "\n".join(wrong)


def test_lock_has_no_torch_pin():
    # torch is chosen by the Makefile (CUDA build on a GPU machine, the local CPU wheel here).
    names = {Requirement(line).name.lower() for line in LOCK.read_text().splitlines() if line[:1].isalnum()}
    assert "torch" not in names and "transformers" in names
