"""Helpers for tests that start real servers on loopback (Prefect, MLflow) and drive a browser."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Wait until ``url`` answers 200, failing early when ``proc`` exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"server not healthy after {timeout} s: {url}")


def stop(proc: subprocess.Popen | None, log=None) -> None:
    """Stop a server started with ``start_new_session=True`` and everything it started.
    STACK.md: a Prefect worker ignored the first SIGTERM; SIGINT, twice if needed, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    for _ in range(2):
        _signal_group(proc, signal.SIGINT)
        try:
            proc.wait(timeout=20)
            break
        except subprocess.TimeoutExpired:
            continue
    else:
        _signal_group(proc, signal.SIGKILL)
        proc.wait(timeout=10)
    _signal_group(proc, signal.SIGKILL)  # children (uvicorn workers) that outlived their parent


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass


def browser_missing() -> str | None:
    """Why the browser checks cannot run here (None when they can): they need Playwright and the
    system Chromium (Debian's ``chromium`` package); `.ci/run` installs both."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    return None if _chromium() else "no Chromium on PATH (apt-get install chromium)"


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium_path() -> str:
    """The system Chromium that Playwright drives; skips the test where the browser checks cannot run."""
    why = browser_missing()
    if why:
        pytest.skip(why)
    return _chromium()


def screenshot(page, folder: Path, name: str) -> Path:
    """Save a full-page screenshot under ``folder`` (and under $GPTBERT_SCREENSHOTS when set, which
    is how docs/ got its pictures)."""
    path = folder / f"{name}.png"
    page.screenshot(path=str(path))
    extra = os.environ.get("GPTBERT_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(extra) / path.name)
    return path
