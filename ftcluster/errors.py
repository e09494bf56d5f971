"""One error family for ftcluster.

The CLI catches :class:`FtclusterError` in one place and prints ``str(err)`` (one line
per problem), exiting with ``err.exit_code``. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

from dataclasses import dataclass


class FtclusterError(Exception):
    """Base of every error ftcluster raises on purpose."""

    exit_code = 1


@dataclass(frozen=True)
class Problem:
    """One problem in a spec: where it is, which field, what is wrong and how to fix it."""

    file: str
    line: int | None
    column: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        field = f" {self.field}:" if self.field else ""
        return f"{where}:{field} {self.message}"


class SpecError(FtclusterError):
    """The job spec is invalid. Carries every problem found, not only the first."""

    exit_code = 2

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class UsageError(FtclusterError):
    """Options that do not go together (``--server`` without ``--dry-run``); the CLI shows its usage line."""

    exit_code = 2


class RenderError(FtclusterError):
    """A valid spec could not be rendered for the requested target."""

    exit_code = 2


class BackendError(FtclusterError):
    """A backend (local, Slurm, Kubernetes) failed to submit, query or cancel a job."""

    exit_code = 1


class RunNotFoundError(BackendError):
    """No run folder or job matches the given id."""


class TrainError(FtclusterError):
    """The training runtime cannot go on (bad model/data for this spec, a failed final save)."""


class StorageError(TrainError):
    """Object storage failed: an upload past its deadline, an unreadable checkpoint store or data URI."""
