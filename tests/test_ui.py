"""MLflow's UI on our runs, in a real browser (slow): `mlflow server` on 127.0.0.1 over a store
holding two pipeline runs of the tiny preset, driven by Playwright with the system Chromium.

What a user comparing runs needs: the runs table lists both parent runs by name and can show the
headline metrics as columns, the compare view of the two overlays their loss curves, and the
registered model page shows the `champion` alias. Screenshots are saved in the test's folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse

import pytest
from servers import chromium_path, free_port, screenshot, stop, wait_healthy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_runs(prefect_harness, tmp_path_factory):
    """Two pipeline runs of the tiny preset that differ in their causal fraction (shared stages cached)."""
    chromium_path()  # skip before paying for the runs
    from common.config import load_config
    from flows.demo import with_demo_data
    from flows.pipeline import pipeline

    workdir = tmp_path_factory.mktemp("ui-runs")
    summaries = []
    for fraction in ("0.25", "0.5"):
        cfg = with_demo_data(load_config(preset="tiny", overrides=[
            f"workdir={workdir}", "launch.backend=local", "train.steps=12", "train.checkpoint_every=6",
            "train.validate_every=6", "train.valid_examples=8", f"train.causal_fraction={fraction}",
            "train.word_milestones=[]", "eval.max_pairs_per_paradigm=10", "eval.temperatures=[1.0]",
            "eval.milestones=none", "tracking.experiment=ui-test", "tracking.registered_model=ui-test"]))
        summaries.append(pipeline(config=cfg))
    return summaries


@pytest.fixture(scope="module")
def mlflow_ui(two_runs, tmp_path_factory):
    """`mlflow server` on a free loopback port over the runs' store; yields its base URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("mlflow-server") / "server.log"
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # STACK.md: no job runner
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", two_runs[0]["tracking_uri"],
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(f"http://127.0.0.1:{port}/health", server, timeout=180)
            yield f"http://127.0.0.1:{port}"
        finally:
            stop(server)


@pytest.fixture
def page(mlflow_ui):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            yield browser.new_page(viewport={"width": 1800, "height": 800})
        finally:
            browser.close()


def test_runs_table_compare_view_and_registry(two_runs, mlflow_ui, page, tmp_path):
    from playwright.sync_api import expect

    expect.set_options(timeout=60_000)  # the UI renders slowly on a busy 2-core machine (5 s was too short)
    first, second = two_runs
    names = [first["run_name"], second["run_name"]]
    assert names[0] != names[1] and "causal 1/4" in names[0] and "causal 1/2" in names[1]
    experiment = first["experiment_id"]

    # The runs table: the experiment opens on its training runs; both parents are listed by name.
    page.goto(f"{mlflow_ui}/#/experiments/{experiment}/runs")
    expect(page.get_by_text("Training runs").first).to_be_visible(timeout=60_000)
    for name in names:
        expect(page.get_by_text(name, exact=True)).to_be_visible()
    # Headline metrics are on the parents, so the table shows them as columns (picked in "Columns").
    page.get_by_role("button", name="Close").click()  # the assistant panel: room for the table
    page.get_by_text("Columns", exact=True).click()
    headline = ("blimp.fused.best_accuracy", "blimp.causal.best_accuracy", "train.final.loss", "train.words")
    for column in ("Dataset", "Models", *headline):  # two default columns out, four metrics in
        page.locator(f"[title='{column}']").first.click()
    page.keyboard.press("Escape")
    for column in headline:
        expect(page.locator(f"[role=columnheader][col-id='metrics.`{column}`']")).to_be_visible()
    for run in two_runs:  # each parent's own numbers, as MLflow prints them
        expect(page.get_by_text(repr(run["training"]["final.loss"]), exact=True)).to_be_visible()
        expect(page.get_by_text(repr(run["evaluation"]["blimp.fused.best_accuracy"]), exact=True).first).to_be_visible()
    screenshot(page, tmp_path, "mlflow-runs-table")

    # The compare view of the two parents; its loss chart overlays both runs' curves.
    ids = json.dumps([first["mlflow_run_id"], second["mlflow_run_id"]], separators=(",", ":"))
    page.goto(f"{mlflow_ui}/#/compare-runs?runs={urllib.parse.quote(ids)}&experiments=[%22{experiment}%22]")
    expect(page.get_by_text("Comparing 2 Runs from 1 Experiment").first).to_be_visible(timeout=60_000)
    page.get_by_role("link", name="loss", exact=True).first.click()
    chart = page.locator(".js-plotly-plot").first
    expect(chart).to_be_visible(timeout=60_000)
    for name in names:  # the legend names both runs
        expect(page.get_by_text(f"{name} (loss)", exact=True).first).to_be_visible()
    screenshot(page, tmp_path, "mlflow-compare-loss")

    # The registered model: the better of the two holds `champion`.
    page.goto(f"{mlflow_ui}/#/models/ui-test")
    expect(page.get_by_text("champion").first).to_be_visible(timeout=60_000)
    screenshot(page, tmp_path, "mlflow-registered-model")
