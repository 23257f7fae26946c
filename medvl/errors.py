"""The one error type for bad inputs, shared by every stage.

A user who hands medvl a broken file must learn which file, which field and what is wrong in one
line; the command-line entry point prints exactly `str(error)` and exits non-zero (the traceback
only with `--debug`). Batch jobs quarantine the item with the same three parts.
"""

from __future__ import annotations


class InputError(ValueError):
    """A bad input: `file: field: problem`. A ValueError, so callers that catch those keep working."""

    def __init__(self, file: str, field: str, problem: str):
        super().__init__(f"{file}: {field}: {problem}")
        self.file, self.field, self.problem = str(file), field, problem

    def __reduce__(self):  # picklable across worker processes (ValueError's default passes one arg)
        return (type(self), (self.file, self.field, self.problem))
