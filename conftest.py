"""Suite-wide hooks (tests/ and plugins/*/tests): a test that hangs is stopped, processes and all.

pytest-timeout (``timeout`` and ``timeout_method = signal`` in pyproject.toml) raises in the main
thread when a test outlives its limit: that test fails with "Timeout (>N s) from pytest-timeout"
and the run goes on. The "thread" method would instead end the whole run with ``os._exit``, leaving
every child behind, so signal is the right one here, but on its own it is not enough for tests that
start processes:

- a test hung on a child (a worker stuck on a lock inherited at fork, a rank waiting in a
  collective) would hang again in its own clean-up: ``with Pool()``/``ProcessPoolExecutor`` and
  multiprocessing's exit handler join their children. So the test's descendant processes are killed
  first, then pytest-timeout raises.
- a signal handler runs only when the main thread gets back to Python; one blocked inside C code
  (a futex, a gloo wait) never does. A backstop thread then ends the children and the run
  (pytest-timeout's own thread method: stacks dumped, exit status 1) ``timeout_backstop`` seconds
  later (an ini option, 60 by default).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Generator
from types import FrameType
from typing import Any

import psutil
import pytest
import pytest_timeout


def pytest_configure(config: pytest.Config) -> None:
    # Runs of configs with ``precision_by_machine`` (the tiny run) train in float32 in every test,
    # tests/ and plugins/*/tests alike, whatever the CPU, so a test means the same on every machine;
    # tests/test_machine_precision.py lifts this pin. Subprocesses inherit it.
    os.environ["MOEFRAME_MACHINE_PRECISION"] = "32-true"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "timeout_backstop",
        "seconds after a test's timeout before the whole run is ended (its own clean-up hangs too)",
        default="60",
    )


def end_descendants() -> list[str]:
    """Kill every process this one started, grandchildren included; their descriptions."""
    children = psutil.Process().children(recursive=True)
    ended = []
    for child in children:
        try:
            ended.append(f"pid {child.pid} ({' '.join(child.cmdline())[:120]})")
            child.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(children, timeout=10)
    return ended


def _say_ended(item: pytest.Item, ended: list[str]) -> None:
    if ended:
        writer = item.config.get_terminal_writer()
        writer.line(f"pytest-timeout: {item.nodeid} timed out; killed the {len(ended)} processes it left running:")
        for line in ended:
            writer.line(f"  {line}")


def _debugging(settings: Any) -> bool:
    return not settings.disable_debugger_detection and pytest_timeout.is_debugging()


def _end_the_run(item: pytest.Item, settings: Any) -> None:
    if not _debugging(settings):
        _say_ended(item, end_descendants())
        pytest_timeout.timeout_timer(item, settings)  # dumps every thread's stack, then os._exit(1)


@pytest.hookimpl(wrapper=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> Generator[None, bool, bool]:
    armed = yield
    if settings.method != "signal" or threading.current_thread() is not threading.main_thread():
        return armed  # pytest-timeout fell back to its thread method: it ends the run itself
    raise_timeout = signal.getsignal(signal.SIGALRM)

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        __tracebackhide__ = True  # the failure points at the test's line, not at this hook
        if not _debugging(settings):
            _say_ended(item, end_descendants())
        raise_timeout(signum, frame)  # type: ignore[operator]

    signal.signal(signal.SIGALRM, on_alarm)
    backstop_s = settings.timeout + float(item.config.getini("timeout_backstop"))
    backstop = threading.Timer(backstop_s, _end_the_run, (item, settings))
    backstop.daemon = True
    backstop.name = f"timeout backstop {item.nodeid}"
    backstop.start()
    cancel = item.cancel_timeout

    def cancel_both() -> None:
        backstop.cancel()
        cancel()

    item.cancel_timeout = cancel_both
    return armed
