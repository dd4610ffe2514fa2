"""recipes/babylm-strict-small.yaml: it loads and validates, it is the BabyLM 2025 strict-small
budget for the `small` model, and docs/recipes.md states its token budget and wall-time estimate
as computed from it."""

from __future__ import annotations

from pathlib import Path

from common.config import load_config
from gptbert.flops import parameter_count, training_flops, training_tokens

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "babylm-strict-small.yaml"
DOCS = (ROOT / "docs" / "recipes.md").read_text()
PEAKS = {"H100 SXM, H200": 989e12, "H100 PCIe": 756e12}


def test_recipe_is_the_strict_small_budget_of_the_small_model():
    cfg = load_config(path=RECIPE)
    assert parameter_count(cfg.model) == 29_892_164  # the `small` preset
    tokens = training_tokens(cfg.train)
    assert tokens == 162_037_888
    assert abs(tokens / 1.62 - 100e6) < 0.1e6  # about 100M words (10 epochs of 10M) at 1.62 tokens/word
    assert cfg.train.micro_batch_tokens == "auto" and cfg.train.device == "cuda"
    assert 100_000_000 in cfg.train.milestone_words()  # chck_100M: the 100M-word model is saved
    assert cfg.train.seq_len_stages == [128, 256, 512]


def test_docs_state_the_budget_and_the_estimate_computed_from_the_recipe():
    cfg = load_config(path=RECIPE)
    tokens, flops = training_tokens(cfg.train), training_flops(cfg.model, cfg.train)
    section = DOCS[DOCS.index("## BabyLM 2025 strict-small"):DOCS.index("## On a GPU")]
    assert f"{tokens:,} token slots" in section and f"{cfg.train.steps:,} steps" in section
    assert f"{flops:.3g}".replace("e+", "e") in section  # 3.05e16
    assert "an estimate, not a measurement" in section and "benchmarks/gpu.sh" in section
    for gpu, peak in PEAKS.items():
        row = next(line for line in section.splitlines() if line.startswith(f"| {gpu} ("))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:4] == [f"{flops / (mfu * peak) / 60:.1f} min" for mfu in (0.10, 0.15, 0.25)], row
        assert cells[4] == f"{0.15 * peak / (flops / tokens):,.0f}"
    for target in ("| 70.4 | 63.7 | about 50 | 40.0 |",):
        assert target in section
