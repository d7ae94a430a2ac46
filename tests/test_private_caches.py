"""The test run's own caches: no test reads or writes the user's ~/.cache/blazil."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_tests_use_a_private_blazil_home(tmp_path_factory):
    from blazil_ai.models.store import blazil_home, models_dir

    run_temp = tmp_path_factory.getbasetemp()
    assert blazil_home().is_relative_to(run_temp) and models_dir().is_relative_to(run_temp)
    assert not blazil_home().is_relative_to(Path.home() / ".cache")
    code = "from blazil_ai.models.store import blazil_home; print(blazil_home())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert Path(child.stdout.strip()) == blazil_home()  # processes a test starts inherit it
    assert Path(os.environ["HF_HOME"]).is_relative_to(run_temp)
