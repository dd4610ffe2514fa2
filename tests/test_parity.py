"""Parity with the paper's own model code: the reference fixture (weights, inputs, outputs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import shared_path

from common.config import ModelConfig, preset
from gptbert.export.paper import export_reference_state_dict, load_reference_state_dict
from gptbert.model import GPTBERT, position_index_table

FIXTURE = ("reference", "gptbert_ref_tiny.npz")


@pytest.fixture(scope="module")
def fixture():
    with np.load(shared_path(*FIXTURE), allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    data["config"] = json.loads(bytes(data.pop("config_json")))
    data["state"] = {k.removeprefix("param/"): torch.from_numpy(v) for k, v in data.items() if k.startswith("param/")}
    return data


def config_for(fixture, impl: str) -> ModelConfig:
    c = fixture["config"]
    return ModelConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
                       num_heads=c["num_attention_heads"], intermediate_size=c["intermediate_size"],
                       max_position_embeddings=c["max_position_embeddings"], position_buckets=c["position_bucket_size"],
                       layer_norm_eps=c["layer_norm_eps"], attention_impl=impl)


def test_tiny_preset_matches_fixture_shape(fixture):
    cfg, tiny = config_for(fixture, "fused"), preset("tiny").model
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                 "max_position_embeddings", "position_buckets", "layer_norm_eps"):
        assert getattr(cfg, name) == getattr(tiny, name), name


def test_bucket_table_matches_reference_buffer(fixture):
    table = position_index_table(512, 32, 512)
    assert torch.equal(table, fixture["state"]["transformer.attention_layers.0.position_indices"])


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_outputs_match_reference_code(fixture, impl):
    model = GPTBERT(config_for(fixture, impl)).eval()
    load_reference_state_dict(model, fixture["state"])
    ids = torch.from_numpy(fixture["input_ids"])
    blocked = torch.from_numpy(fixture["blocked"])
    with torch.no_grad():
        hidden = model(ids, blocked)
        logits = model.lm_logits(hidden)
    assert (hidden - torch.from_numpy(fixture["hidden"])).abs().max() < 1e-5
    assert (logits - torch.from_numpy(fixture["logits"])).abs().max() < 1e-5


def test_export_restores_reference_names(fixture):
    model = GPTBERT(config_for(fixture, "fused"))
    load_reference_state_dict(model, fixture["state"])
    exported = export_reference_state_dict(model)
    assert exported.keys() == fixture["state"].keys()
    for key, value in fixture["state"].items():
        assert torch.equal(exported[key], value), key
