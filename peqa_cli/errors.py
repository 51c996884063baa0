"""User-facing errors.

Anything a user controls (a path, a recipe key, a flag value) that is wrong raises one of
these with a one-line message naming the bad thing and what is allowed. The CLI prints the
message to stderr and exits with ``exit_code``; internal invariants use ``assert`` instead.
"""

from __future__ import annotations


class PeqaError(Exception):
    """Base class: a problem the user can fix. Exit code 2 (bad usage or input)."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(PeqaError):
    """A recipe or override is invalid. Carries every problem found, not just the first."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        where = f"{source}: " if source else ""
        if len(problems) == 1:
            msg = f"{where}{problems[0]}"
        else:
            msg = f"{where}{len(problems)} problems: " + "; ".join(problems)
        super().__init__(msg)


class InputError(PeqaError):
    """A model, checkpoint, delta or data file that cannot be used as given."""


class CheckpointError(InputError):
    """A checkpoint or delta file is missing, corrupt, or does not match its base."""


class RunError(PeqaError):
    """A job failed while running (e.g. NaN loss). Exit code 1."""

    exit_code = 1
