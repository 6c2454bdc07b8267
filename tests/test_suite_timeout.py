"""The suite's per-test time limit (pyproject.toml's pytest-timeout settings and the root conftest.py),
proved on a throwaway test file run by pytest in a scratch folder with this repository's own
configuration and hooks, the limit shortened on the command line:

- a test hung on a child process, whose own clean-up would hang on it again, fails with
  pytest-timeout's line; the child is killed, and the next test runs;
- a test that no signal reaches (as if blocked in C code) is ended by the backstop: stacks dumped,
  its child killed, the run ends.

Either way pytest exits non-zero, so ``.ci/run`` (``set -e``, pytest last) fails.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

from .conftest import REPO, clean_env

CHILD = """
import signal
import subprocess
import sys
import time
from pathlib import Path


def start_child() -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    Path("child.pid").write_text(str(child.pid))
    return child
"""

HUNG_ON_A_CHILD = """
def test_hangs_on_a_child():
    child = start_child()
    try:
        child.wait()
    finally:
        child.wait()  # clean-up that joins the child, as a Pool or a ProcessPoolExecutor does


def test_runs_after_the_hung_one():
    pass
"""

NO_SIGNAL_REACHES = """
def test_hangs_where_no_signal_reaches():
    start_child()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # as a main thread stuck in C code
    time.sleep(3600)
"""


def run_pytest(folder: Path, tests: str) -> tuple[subprocess.CompletedProcess, int, float]:
    """pytest on ``tests`` with this repository's configuration and hooks, limit 3 s, backstop 2 s later;
    the run, the pid of the child the test started, and the run's seconds."""
    folder.mkdir()
    for name in ("pyproject.toml", "conftest.py"):
        shutil.copy(REPO / name, folder / name)
    (folder / "test_hangs.py").write_text(CHILD + tests)
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "timeout=3", "-o", "timeout_backstop=2"],
        cwd=folder,
        env=clean_env(COLUMNS="200"),  # the summary line whole
        capture_output=True,
        text=True,
        timeout=60,
    )
    return run, int((folder / "child.pid").read_text()), time.monotonic() - started


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_test_hung_on_a_child_fails_with_one_line_its_child_killed_and_the_run_goes_on(tmp_path: Path) -> None:
    run, child, seconds = run_pytest(tmp_path / "signal", HUNG_ON_A_CHILD)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert re.search(
        r"^FAILED test_hangs\.py::test_hangs_on_a_child - Failed: Timeout \(>3\.0s\) from pytest-timeout\.$", out, re.M
    ), out
    assert re.search(
        rf"test_hangs_on_a_child timed out; killed the \d+ processes it left running:\n(  .*\n)*  pid {child} ", out
    ), out
    assert "1 failed, 1 passed" in out, out
    assert gone(child) and seconds < 60, f"{seconds:.0f} s\n{out}"


def test_a_test_no_signal_reaches_is_ended_by_the_backstop_with_its_child(tmp_path: Path) -> None:
    run, child, seconds = run_pytest(tmp_path / "backstop", NO_SIGNAL_REACHES)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert re.search(rf"test_hangs_where_no_signal_reaches timed out; killed .*\n(  .*\n)*  pid {child} ", out), out
    assert "+ Timeout +" in out and "time.sleep(3600)" in out, out  # every thread's stack, where it hung
    assert gone(child) and seconds < 60, f"{seconds:.0f} s\n{out}"
