"""The domain terms ``tokenizer.add_tokens`` adds: a list in the spec, or a file of one term per line.

A terms file is UTF-8, one term per line; blank lines and lines whose first non-blank character is
``#`` are skipped, and each term loses its surrounding whitespace (a ``#`` inside a term, as in
``C#``, is kept). The loader reads the file once, when the spec's paths are this machine's or the
file sits beside the spec, and puts the list in the spec (:func:`inline_terms`): the compiled
payload then carries the terms to every process, Kubernetes pods included, which do not see the
submitter's files. A file it cannot see here (a path on the cluster) stays a path, read by the
runtime where the job runs (``ftcluster.train.tokenizer``). Torch-free: the planner counts the new
rows from here (:func:`added_count`).
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import Problem

FIELD = "tokenizer.add_tokens"


class TermsFileError(ValueError):
    """A terms file that cannot be used; ``line`` is 1-based, or None for the whole file."""

    def __init__(self, path: str, line: int | None, message: str):
        self.path, self.line, self.message = path, line, message
        super().__init__(f"{path}{f':{line}' if line else ''}: {message}")


def parse_terms(text: str) -> list[str]:
    """The terms of a terms file's text, in file order (duplicates kept: the tokenizer skips them)."""
    out = []
    for raw in text.splitlines():
        term = raw.strip()
        if term and not term.startswith("#"):
            out.append(term)
    return out


def read_terms(path: str) -> list[str]:
    """The terms of the local file ``path`` (``file://`` allowed). Raises :class:`TermsFileError`."""
    local = path.removeprefix("file://")
    try:
        with open(os.path.expanduser(local), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise TermsFileError(path, None, "no such file") from None
    except IsADirectoryError:
        raise TermsFileError(path, None, "is a folder, not a file of terms") from None
    except OSError as exc:
        raise TermsFileError(path, None, f"cannot be read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise TermsFileError(path, line, "not UTF-8 text; save the terms file as UTF-8") from None
    return parse_terms(text.removeprefix("\ufeff"))


def added_count(tokenizer_spec: Any) -> int:
    """How many tokens the spec adds (terms plus special tokens, each counted once), without a
    tokenizer: an upper bound, since terms the vocabulary already holds are not added. A terms file
    this machine cannot read counts 0."""
    terms = tokenizer_spec.add_tokens
    if isinstance(terms, str):
        try:
            terms = read_terms(terms)
        except TermsFileError:
            terms = []
    return len(set(terms) | set(tokenizer_spec.add_special_tokens))


def inline_terms(spec: Any, doc: Any, here: bool) -> Problem | None:
    """Replace a terms file in ``spec.tokenizer.add_tokens`` by its terms (see the module docstring).

    ``here``: the spec's local paths are this machine's (the path was rebased against the current
    directory), so a missing file is a problem now, before a job is queued. Otherwise a relative
    path is tried against the spec file's folder and left as it is when there is no file there.
    Returns the problem, located at the field (or at the file's line), or None.
    """
    value = spec.tokenizer.add_tokens
    if not isinstance(value, str):
        return None
    from .problems import problem_at
    from .relpaths import is_relative, local_path, spec_folder

    local = local_path(value)
    if local is None:  # s3://... : the runtime reads it
        return None
    if not here:
        folder = spec_folder(doc.source)
        if is_relative(value) and folder:
            local = os.path.join(folder, local)
        if not os.path.isfile(os.path.expanduser(local)):
            return None
    try:
        spec.tokenizer.add_tokens = read_terms(local)
    except TermsFileError as exc:
        if exc.line is not None:  # located in the terms file, named as the missing-file case names it
            return Problem(os.path.abspath(os.path.expanduser(local)), exc.line, None, FIELD, exc.message)
        return problem_at(doc, ("tokenizer", "add_tokens"),
                          f"{os.path.abspath(os.path.expanduser(local))}: {exc.message}; give a file of one "
                          "term per line (relative to the spec file's folder) or a list of terms")
    return None
