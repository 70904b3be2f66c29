"""`evolve demo` end to end: a real server subprocess, the three bundled tasks,
then a second run on the same state directory that must train nothing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("digits", "digits_parity", "digits_loops")


def run_demo(state_dir: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "demo", "--quick", "--state-dir", str(state_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.mark.slow
def test_demo_trains_reports_and_a_second_run_reuses_the_state(tmp_path):
    state_dir = tmp_path / "demo"
    first = run_demo(state_dir).stdout
    for task in TASKS:
        assert f"submitted {task}" in first
        assert f"[{task}] search SUCCEEDED" in first
        assert re.search(rf"^{task}: READY, \d+ classes", first, re.MULTILINE)
    assert len(re.findall(r"^  test accuracy \d+\.\d%", first, re.MULTILINE)) == 3
    assert len(re.findall(r"^  checked here: \d+\.\d% of 300 test images right", first, re.MULTILINE)) == 3
    assert len(re.findall(r"^    test image 0  ", first, re.MULTILINE)) == 3  # predicted vs true
    assert "PREDICTED" in first and "TRUE" in first
    assert "  gen   path" in first and "parent task" in first  # the live candidate table
    assert "== the system ==" in first and "sharing graph" in first
    assert (state_dir / "system.dot").is_file()
    assert "server exited with code 0" in first

    second = run_demo(state_dir).stdout
    assert "submitted" not in second and "generation" not in second  # nothing trained again
    for task in TASKS:
        assert f"{task}: already READY" in second
    assert second.count("bit-identical to the previous run: nothing was lost") == 3
    assert "server exited with code 0" in second
