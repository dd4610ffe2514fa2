"""Helpers for tests that start real servers on loopback (Prefect, MLflow) and drive a browser."""

from __future__ import annotations

import os
import sys
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


# ----------------------------------------------------------------------------- object store, database

S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_EC2_METADATA_DISABLED")


def start_s3_server(log_dir: Path) -> tuple[subprocess.Popen, str, dict[str, str]]:
    """moto's S3 API server (a real HTTP S3 endpoint) on 127.0.0.1: ``(process, endpoint, env)``,
    where ``env`` is what a client needs (test credentials, the endpoint, no instance metadata)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(log_dir / "moto.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(f"{endpoint}/moto-api/", proc, timeout=60)
    except BaseException:
        stop(proc)
        raise
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
    return proc, endpoint, env


def create_bucket(endpoint: str, env: dict[str, str], name: str) -> None:
    """Create a bucket through the S3 API (boto3, as any client would)."""
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                 region_name=env["AWS_DEFAULT_REGION"]).create_bucket(Bucket=name)


def postgres_bin() -> Path | None:
    """The folder of Debian's PostgreSQL server binaries (initdb, pg_ctl), or None."""
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").is_file():
            return candidate
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


def start_postgres(folder: Path) -> tuple[Path, str]:
    """A PostgreSQL server in ``folder`` on a loopback port (trust auth, database ``mlflow``):
    ``(data dir, SQLAlchemy URI)``. Stop it with ``stop_postgres``. Debian's server refuses to run
    as root, so as root it runs as the ``nobody``-like ``postgres`` user when that exists."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    data = folder / "pgdata"
    sock = folder / "sock"
    sock.mkdir(parents=True)
    port = free_port()
    run_as = _postgres_user()
    if run_as:
        shutil.chown(folder, run_as)
        shutil.chown(sock, run_as)
    def call(*cmd: str) -> None:
        full = ["runuser", "-u", run_as, "--", *cmd] if run_as else list(cmd)
        result = subprocess.run(full, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"

    call(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "mlflow", "--no-sync")
    call(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "postgres.log"), "-w", "-t", "60",
         "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {sock} -c fsync=off", "start")
    call(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow")
    return data, f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow"


def stop_postgres(data: Path) -> None:
    """Stop the server ``start_postgres`` started (fast shutdown, waiting for it)."""
    bindir = postgres_bin()
    run_as = _postgres_user()
    cmd = [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]
    subprocess.run(["runuser", "-u", run_as, "--", *cmd] if run_as else cmd, capture_output=True, timeout=60)


def _postgres_user() -> str | None:
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam("postgres")
        return "postgres"
    except KeyError:
        pytest.skip("running as root without a 'postgres' user: PostgreSQL refuses to run as root")
