"""The sbatch template, shipped compiled.

``templates/sbatch.sh.j2`` is the source of truth. Jinja2 compiles it to Python
(:func:`compile_source`), and that module is committed as ``ftcluster/render/_sbatch_j2.py``,
so ``ftcluster render`` does not lex, parse and compile the template on every start
(start-up speed: docs/BENCHMARKS.md). After editing the template, regenerate it::

    python -m ftcluster.render.template > ftcluster/render/_sbatch_j2.py

``tests/unit/render/test_render_slurm.py`` fails while the two differ.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

from ..errors import RenderError

NAME = "sbatch.sh.j2"
GENERATED = "ftcluster/render/_sbatch_j2.py"
# At the end of the file, so that the line numbers in the code's debug_info (which map a traceback
# to template lines) stay those of Jinja2's output.
FOOTER = (f"\n# Generated from templates/{NAME} by Jinja2: `python -m ftcluster.render.template > {GENERATED}`.\n"
          "# Do not edit; edit the template and regenerate.\n"
          "# ruff: noqa\n")


def environment() -> Any:
    """The Jinja2 environment the template is compiled and rendered in: ``StrictUndefined`` (a
    misspelled variable is an error, not an empty string), no autoescaping (shell, not HTML)."""
    import jinja2

    return jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True,
                              trim_blocks=True, lstrip_blocks=True)


def source_path() -> Path:
    """The template source: in the package (wheel) or the repository (editable install)."""
    here = Path(__file__).resolve().parent.parent
    folders = (here / "templates", here.parent / "templates")
    for folder in folders:
        if (folder / NAME).is_file():
            return folder / NAME
    raise RenderError(f"{NAME} not found in {folders[0]} or {folders[1]}; reinstall ftcluster")


def compile_source() -> str:
    """The text of ``_sbatch_j2.py``: the template compiled by Jinja2, as the module loader expects it."""
    code = environment().compile(source_path().read_text(encoding="utf-8"), NAME, raw=True, defer_init=True)
    return code + "\n" + FOOTER


@functools.lru_cache(maxsize=1)
def sbatch_template() -> Any:
    """The compiled sbatch template, ready to ``render(**variables)``."""
    from . import _sbatch_j2

    env = environment()
    return env.template_class.from_module_dict(env, vars(_sbatch_j2), env.make_globals(None))


if __name__ == "__main__":
    sys.stdout.write(compile_source())
