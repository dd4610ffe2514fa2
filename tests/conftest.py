"""Shared test fixtures: where the development data lives, and temporary run roots."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What the libraries need offline, for imports at collection time and the session's servers too
# (the project sets the same where it starts them: flows/__init__.py, the DeepSpeed backend).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# DeepSpeed's accelerator follows the device: cpu where no CUDA is visible (its probe warns
# otherwise); on a CUDA machine the project sets it per rank by device (select_accelerator).
_NO_CUDA = not __import__("torch").cuda.is_available()
if _NO_CUDA:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
# CI clones the repo next to a read-only copy of shared/; GPTBERT_SHARED_DATA overrides.
SHARED_DATA = Path(os.environ.get("GPTBERT_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """A path under the shared development data; skips the test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"development data not available: {path}")
    return path


@pytest.fixture
def shared_data():
    return shared_path


@pytest.fixture
def one_thread():
    """Run a test's torch work on one thread, restoring the setting afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Services the tests start (Ray's daemons and workers, Prefect's API server) that must be gone when
# the session ends: a leftover one, reparented to init, keeps ports and memory after CI.
SERVICE_PATTERNS = ("ray::", "raylet", "gcs_server", "prefect.server.api.server", "dashboard/agent.py",
                    "runtime_env/agent", "moto.server", "postgresql/", "postgres: ", "mlflow.server")
# Every process this session starts inherits this variable (also one that detaches from the process
# tree, as daemons do): what the leftover check counts, so that services another user's job runs on
# the same machine (a Ray cluster, a Prefect server) are never blamed on the tests.
SESSION_MARKER = "GPTBERT_TEST_SESSION"
os.environ.setdefault(SESSION_MARKER, f"{os.getpid()}-{int.from_bytes(os.urandom(4), 'big'):08x}")


def _proc_text(pid: int | str, name: str) -> str:
    try:
        return (Path("/proc") / str(pid) / name).read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # gone, or another user's
        return ""


def _parent(pid: int) -> int:
    stat = _proc_text(pid, "stat")
    return int(stat.rsplit(")", 1)[1].split()[1]) if ")" in stat else 0


def _started_by_session(pid: int, session: str, root: int) -> bool:
    """A descendant of the session's process, or a process carrying the session's marker."""
    if f"{SESSION_MARKER}={session} " in _proc_text(pid, "environ") + " ":
        return True
    seen = set()
    while pid > 1 and pid not in seen:
        if pid == root:
            return True
        seen.add(pid)
        pid = _parent(pid)
    return False


def service_processes(session: str | None = None, root: int | None = None) -> dict[int, str]:
    """Running service processes (``SERVICE_PATTERNS``) as pid -> command line; with ``session``,
    only those this test session started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        cmd = _proc_text(entry.name, "cmdline").strip()
        if any(p in cmd for p in SERVICE_PATTERNS) and (
                session is None or _started_by_session(int(entry.name), session, root or os.getpid())):
            found[int(entry.name)] = cmd[:160]
    return found


@pytest.fixture(scope="session", autouse=True)
def _no_services_left_behind():
    """Fail the session when a test left a service process running that this session started
    (running before the session, or started by anything else, is not counted)."""
    import time

    if not Path("/proc").is_dir():
        yield
        return
    session = os.environ[SESSION_MARKER]
    before = set(service_processes(session))
    yield
    deadline = time.time() + 30  # Ray and uvicorn need a moment to exit after shutdown
    while True:
        left = {pid: cmd for pid, cmd in service_processes(session).items() if pid not in before}
        if not left or time.time() > deadline:
            break
        time.sleep(0.5)
    assert not left, "processes left behind by the tests:\n" + "\n".join(f"{p} {c}" for p, c in left.items())


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    # Keep third-party libraries offline and quiet in every test.
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if _NO_CUDA:
        monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """A temporary Prefect server for the session (PREFECT_HOME in a temporary folder)."""
    home = tmp_path_factory.mktemp("prefect-home")
    saved = {k: os.environ.get(k) for k in ("PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED")}
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    # Prefect binds its console log handler to whatever sys.stderr is when `prefect.main` is first
    # imported; imported here, that is pytest's session-long capture, not a test's capfd/capsys
    # stream, which is closed when that test ends (later tests' flow logs would hit a closed file).
    import prefect.main  # noqa: F401
    from prefect.testing.utilities import prefect_test_harness

    try:
        with prefect_test_harness(server_startup_timeout=180):
            yield home
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """An S3 API server on loopback (moto in server mode: real HTTP, not an in-process patch) for
    the session, with the session's environment pointed at it the standard way (AWS_* variables)
    and the gptbert cache in a temporary folder. ``s3.bucket(name)`` creates a bucket and
    returns its ``s3://`` URI."""
    from types import SimpleNamespace

    pytest.importorskip("moto.server", reason="moto is not installed (pip install -e '.[dev]')")
    pytest.importorskip("boto3", reason="boto3 is not installed (pip install -e '.[dev]')")
    from servers import S3_ENV, create_bucket, start_s3_server, stop

    folder = tmp_path_factory.mktemp("s3")
    proc, endpoint, env = start_s3_server(folder)
    env["GPTBERT_CACHE_DIR"] = str(folder / "cache")
    saved = {k: os.environ.get(k) for k in (*S3_ENV, "GPTBERT_CACHE_DIR")}
    os.environ.update(env)

    def bucket(name: str) -> str:
        create_bucket(endpoint, env, name)
        return f"s3://{name}"

    try:
        yield SimpleNamespace(endpoint=endpoint, env=env, bucket=bucket, cache=folder / "cache")
    finally:
        stop(proc)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
