"""Shared test fixtures: where the development data lives, and temporary run roots."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
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


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    # Keep third-party libraries offline and quiet in every test.
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
