"""The README's test command is plain ``pytest``; it must collect the suite as written.

``python -m pytest`` puts the working directory on ``sys.path`` by itself, ``pytest`` does not, so test modules
that import shared helpers as ``tests.<package>.<module>`` collected only under the former (the CI command)
and failed with ``No module named 'tests'`` under the latter (the README's). Python's isolated mode (``-I``)
starts the interpreter the way the ``pytest`` entry point does: no working directory on the path.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# two modules that import helpers through the `tests.` package path
MODULES = ["tests/planning/test_planner.py", "tests/inference/test_predict.py"]


def test_plain_pytest_collects_modules_that_import_test_helpers():
    code = "import sys, pytest; sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', *sys.argv[1:]]))"
    result = subprocess.run(
        [sys.executable, "-I", "-c", code, *MODULES], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "error" not in result.stdout.lower().splitlines()[-1]
    assert "tests collected" in result.stdout or "test collected" in result.stdout
