"""The suite's leftover-process check (conftest.py) blames the tests for a service they left
running, also one that detached from the process tree, and never for one that something else on the
machine started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SESSION_MARKER, service_processes

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")


def _detached(env: dict[str, str]) -> int:
    """A process named like a Ray daemon, started through a parent that exits at once (so that it
    is reparented, as a daemon is): its pid."""
    grandchild = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)', "
                  "'raylet-leftover-probe'], start_new_session=True, stdin=subprocess.DEVNULL, "
                  "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid)")
    out = subprocess.run([sys.executable, "-c", grandchild], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def _wait_listed(pid: int, **kwargs) -> bool:
    for _ in range(50):  # the exec of the new interpreter may not have happened yet
        if "raylet-leftover-probe" in service_processes(**kwargs).get(pid, ""):
            return True
        time.sleep(0.1)
    return False


def test_a_detached_service_the_session_started_is_caught_and_a_foreign_one_is_not():
    session = os.environ[SESSION_MARKER]
    foreign_env = {k: v for k, v in os.environ.items() if k != SESSION_MARKER}
    ours, theirs = _detached(dict(os.environ)), _detached(foreign_env)
    try:
        assert _wait_listed(ours) and _wait_listed(theirs)  # both run and look like services
        assert _wait_listed(ours, session=session)  # reparented, yet ours: counted as a leak
        ours_only = service_processes(session=session)
        assert ours in ours_only and theirs not in ours_only  # started outside the session: not counted
    finally:
        for pid in (ours, theirs):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in (ours, theirs):  # reaped by init: gone from the listing before the session check
            for _ in range(50):
                if pid not in service_processes():
                    break
                time.sleep(0.1)
