"""A Prefect server and a process worker on loopback run a deployment of the pipeline (slow).

Everything is real and offline: `prefect server start` on 127.0.0.1, a `process` work pool, the
`pipeline` deployment from prefect.yaml (`prefect deploy`), `prefect worker start`, and
`prefect deployment run --watch`. The run is the demo pipeline at toy size; afterwards the MLflow
store written by the worker's flow run holds the parent run linked to that flow run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"prefect server not healthy after {timeout} s: {url}")


def _stop(proc: subprocess.Popen | None, log) -> None:
    if proc is None or proc.poll() is not None:
        return
    # STACK.md: a worker ignored the first SIGTERM; SIGINT by PID, twice if needed.
    for _ in range(2):
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.kill()
    proc.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_worker_runs_the_pipeline_deployment(tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    workdir = tmp_path / "run"
    db = workdir / "mlflow" / "mlflow.db"
    config = tmp_path / "deploy-test.yaml"
    config.write_text(
        f"""preset: mini
workdir: {workdir}
shard: {{validation_fraction: 0.05}}
train: {{steps: 3, checkpoint_every: 2, validate_every: 2, valid_examples: 8,
        batch_tokens_start: 512, batch_tokens_end: 512, micro_batch_tokens: 512}}
eval: {{max_pairs_per_paradigm: 5, temperatures: [1.0]}}
tracking: {{tracking_uri: "sqlite:///{db}", experiment: deploy-test, registered_model: deploy-test}}
""")
    prefect = [sys.executable, "-m", "prefect"]
    logs = tmp_path / "logs"
    logs.mkdir()
    server = worker = None
    server_log = open(logs / "server.log", "w")
    worker_log = open(logs / "worker.log", "w")
    try:
        server = subprocess.Popen([*prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=server_log, stderr=subprocess.STDOUT, cwd=tmp_path)
        _wait_healthy(f"{api}/health", server, timeout=180)

        def cli(*args: str, timeout: float = 180) -> str:
            done = subprocess.run([*prefect, *args], env=env, cwd=REPO, capture_output=True, text=True,
                                  timeout=timeout)
            assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
            return done.stdout

        cli("work-pool", "create", "test-pool", "--type", "process")
        cli("--no-prompt", "deploy", "--name", "pipeline", "--pool", "test-pool")
        worker = subprocess.Popen([*prefect, "worker", "start", "--pool", "test-pool"], env=env,
                                  stdout=worker_log, stderr=subprocess.STDOUT, cwd=tmp_path)
        out = cli("deployment", "run", "gptbert-pipeline/pipeline", "--param", f"config_file={config}",
                  "--param", "demo_data=true", "--watch", "--watch-timeout", "420", timeout=480)
        assert "Completed" in out, out
    finally:
        _stop(worker, worker_log)
        _stop(server, server_log)
        server_log.close()
        worker_log.close()

    # The worker's flow run tracked to the configured store and linked itself to the Prefect run.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("deploy-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["prefect.flow_run_id"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["gptbert.stage"] for r in children) == sorted(
        ["clean", "tokenizer", "shard", "pretrain", "export", "evaluate"])
    assert str(client.get_model_version_by_alias("deploy-test", "champion").version) == "1"
    assert (workdir / "data").is_dir()  # demo_data generated the grammar corpus in the run root
