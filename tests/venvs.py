"""Interpreters the tests start themselves: the same whether the suite runs in the system Python or
inside a virtual environment (where `venv --system-site-packages` would give the *base*
interpreter's packages, not the ones the suite runs with)."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

PTH_NAME = "_gptbert_tests_running_interpreter.pth"


def running_site_dirs() -> list[str]:
    """The site-packages folders of the interpreter running the tests (a venv's own, plus its base's
    when it was made with --system-site-packages, plus the user site when enabled)."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def venv_seeing_this_interpreter(venv: Path, *, clear: bool = False) -> Path:
    """A virtual environment at `venv` (created when missing, or anew with `clear`) whose own
    site-packages come first and which also imports what the running interpreter has installed;
    returns its python.

    The running interpreter's folders are listed in a .pth file, as plain paths: Python appends them
    to sys.path without running the .pth files inside them, so an editable install of this checkout
    there (its import hook) does not reach the new environment. Rewritten on every call, so a cached
    environment follows the interpreter of the current run."""
    python = venv / "bin" / "python"
    if clear or not python.exists():
        subprocess.run([sys.executable, "-m", "venv", *(["--clear"] if clear else []), str(venv)], check=True,
                       capture_output=True, timeout=300)
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    lines = [d for d in running_site_dirs() if Path(d).resolve() != Path(own).resolve()]
    (Path(own) / PTH_NAME).write_text("".join(f"{d}\n" for d in lines))
    return python


def env_with_this_interpreter_first(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with the running interpreter's bin folder first on PATH, so a
    script that calls `python3`, `ray` or `mlflow` gets this environment's, activated or not."""
    env = dict(os.environ if env is None else env)
    bin_dir = str(Path(sys.executable).parent)  # not resolved: a venv's python links to the base one
    env["PATH"] = os.pathsep.join([bin_dir, *[p for p in env.get("PATH", "").split(os.pathsep) if p]])
    return env
