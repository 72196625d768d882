"""POS_SWAP_REQUIRE_ALL=1 (set by CI) turns a skip for a missing dependency into a failure; other skips stay."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

PROBE = '''
import pytest
from conftest import skip_missing


def test_importorskip():
    pytest.importorskip("pos_swap_no_such_module")


def test_missing_checkpoint():
    skip_missing("the offline checkpoint needs a wheel")


def test_other_skip():
    pytest.skip("not about a dependency")
'''


def test_missing_dependencies_fail_under_require_all(tmp_path):
    """Without the flag these are ordinary skips (pytest's own behaviour)."""
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text(PROBE)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfs", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "POS_SWAP_REQUIRE_ALL": "1"},
    )  # fmt: skip
    summary = run.stdout.strip().splitlines()[-1]
    assert "2 failed, 1 skipped" in summary, run.stdout
    assert "FAILED test_probe.py::test_importorskip" in run.stdout and "missing dependency: the offline" in run.stdout
