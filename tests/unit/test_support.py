"""The suite's own hygiene (tests/support): what a test's processes leave in the temp folder stays in
pytest's temp folder, which pytest prunes."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path


def test_each_test_gives_its_processes_a_temp_folder_of_its_own(tmp_path_factory):
    tmpdir = Path(os.environ["TMPDIR"])
    assert tmpdir.parent == tmp_path_factory.getbasetemp() and tmpdir.is_dir()
    child = subprocess.run([sys.executable, "-c", "import tempfile; print(tempfile.mkdtemp(prefix='ftcluster-exit-'))"],
                           capture_output=True, text=True, timeout=60)
    assert Path(child.stdout.strip()).parent == tmpdir  # e.g. a SIGKILLed launcher's exit folder
    assert Path(tempfile.gettempdir()) != tmpdir  # this process keeps its own
