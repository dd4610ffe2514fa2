"""A Prefect server and a process worker on loopback run a deployment of the pipeline (slow).

Everything is real and offline: `prefect server start` on 127.0.0.1, a `process` work pool, the
`pipeline` deployment from prefect.yaml (`prefect deploy`), `prefect worker start`, and
`prefect deployment run --watch`. The run is the demo pipeline at toy size; afterwards the MLflow
store written by the worker's flow run holds the parent run linked to that flow run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from servers import browser_missing, chromium_path, free_port, screenshot, stop, wait_healthy

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_worker_runs_the_pipeline_deployment(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    # The UI asks the API at PREFECT_UI_API_URL (default port 4200), so point it at this server.
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api, PREFECT_UI_API_URL=api,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", TOKENIZERS_PARALLELISM="false")
    if not torch.cuda.is_available():  # on a CUDA machine DeepSpeed's accelerator follows the device
        env["DS_ACCELERATOR"] = "cpu"
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
                                  env=env, stdout=server_log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                  start_new_session=True)
        wait_healthy(f"{api}/health", server, timeout=180)

        def cli(*args: str, timeout: float = 180) -> str:
            done = subprocess.run([*prefect, *args], env=env, cwd=REPO, capture_output=True, text=True,
                                  timeout=timeout)
            assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
            return done.stdout

        cli("work-pool", "create", "test-pool", "--type", "process")
        cli("--no-prompt", "deploy", "--name", "pipeline", "--pool", "test-pool")
        worker = subprocess.Popen([*prefect, "worker", "start", "--pool", "test-pool"], env=env,
                                  stdout=worker_log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                  start_new_session=True)
        out = cli("deployment", "run", "gptbert-pipeline/pipeline", "--param", f"config_file={config}",
                  "--param", "demo_data=true", "--watch", "--watch-timeout", "420", timeout=480)
        assert "Completed" in out, out

        # Every deployment of prefect.yaml, as `docs/deploy.md` applies them, seen in the Prefect UI.
        cli("work-pool", "create", "gptbert-process", "--type", "process")
        cli("--no-prompt", "deploy", "--all")
        if browser_missing() is None:
            _check_prefect_ui(f"http://127.0.0.1:{port}", tmp_path)
    finally:
        stop(worker, worker_log)
        stop(server, server_log)
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
    if browser_missing():
        pytest.skip(f"the deployment ran and was checked; the Prefect UI check was not: {browser_missing()}")


def _check_prefect_ui(base: str, folder: Path) -> None:
    """Headless Chromium on the server's UI: the deployments page lists every deployment of
    prefect.yaml, and the retraining deployment's weekly schedule."""
    import yaml
    from playwright.sync_api import expect, sync_playwright

    names = [d["name"] for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(f"{base}/deployments")
            expect(page.get_by_text(f"{len(names)} Deployments")).to_be_visible(timeout=60_000)
            rows = page.locator("tr", has=page.get_by_text("gptbert-", exact=False))
            for name in names:
                expect(page.get_by_text(name, exact=True).first).to_be_visible()
            retrain = rows.filter(has=page.get_by_text("retrain", exact=True))
            expect(retrain.get_by_text("At 03:00 AM, only on Sunday")).to_be_visible()
            screenshot(page, folder, "prefect-deployments")
        finally:
            browser.close()
