"""The typed config tree: presets pin SPEC numbers; invalid values fail with the field name."""

import dataclasses
from pathlib import Path

import pytest

from common.config import (
    ConfigError,
    PipelineConfig,
    digest,
    flatten,
    from_dict,
    load_config,
    preset_names,
    to_dict,
)


def test_presets_load_and_pin_spec_numbers():
    assert {"tiny", "mini", "small", "base"} <= set(preset_names())
    small, base = load_config("small"), load_config("base")
    assert (small.model.num_layers, small.model.hidden_size, small.model.num_heads) == (12, 384, 6)
    assert (small.model.intermediate_size, small.model.vocab_size) == (1280, 8192)
    assert (base.model.num_layers, base.model.hidden_size, base.model.num_heads) == (12, 768, 12)
    assert (base.model.intermediate_size, base.model.vocab_size) == (2560, 16384)
    for cfg in (small, base):
        assert cfg.model.max_position_embeddings == 512 and cfg.model.position_buckets == 32
        assert cfg.model.hidden_dropout == 0.1 and cfg.model.attention_dropout == 0.1
        assert cfg.model.layer_norm_eps == 1e-5 and cfg.model.head_dim == 64
    assert (small.train.steps, small.train.lr) == (7812, 1.41e-2)
    assert (base.train.steps, base.train.lr) == (15625, 1e-2)


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = load_config("small", overrides=["train.seed=7", "model.gate=false"])
    assert cfg.train.seed == 7 and cfg.model.gate is False
    again = from_dict(PipelineConfig, to_dict(cfg))
    assert again == cfg and digest(again) == digest(cfg)
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\ntrain:\n  seed: 3\n")
    from_file = load_config(path=path)
    assert from_file.model.hidden_size == 64 and from_file.train.seed == 3
    assert digest(from_file) != digest(load_config("tiny"))


def test_flatten_gives_dotted_scalar_keys():
    flat = flatten(load_config("tiny"))
    assert flat["model.hidden_size"] == 64
    assert all("." in k or k == "workdir" for k in flat)
    assert not any(isinstance(v, dict) for v in flat.values())


@pytest.mark.parametrize(
    "override, field",
    [
        ("model.hidden_size=100", "model.hidden_size"),
        ("model.gate=3", "model.gate"),
        ("model.attention_impl=flash", "model.attention_impl"),
        ("model.hidden_dropout=1.5", "model.hidden_dropout"),
        ("train.nonexistent=1", "train.nonexistent"),
        ("model.vocab_size=1000", "model.vocab_size"),
    ],
)
def test_invalid_values_fail_at_load_with_field_name(override, field):
    with pytest.raises(ConfigError) as info:
        load_config("small", overrides=[override])
    assert info.value.field == field
    assert field in str(info.value)


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("huge")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path=bad)
    with pytest.raises(FileNotFoundError):
        load_config(path=tmp_path / "missing.yaml")


def test_configs_are_plain_dataclasses():
    cfg = load_config("tiny")
    assert dataclasses.is_dataclass(cfg) and dataclasses.is_dataclass(cfg.model)


@pytest.mark.parametrize("recipe", sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_recipes_load(recipe):
    cfg = load_config(path=recipe)
    assert cfg.sweep.fractions and cfg.train.steps > 0


def test_the_cpu_realtext_recipe_is_the_run_its_documentation_reports():
    """docs/recipes.md reports one measured run of recipes/cpu-realtext.yaml: the file must still
    describe that run (budget, mix, model), or the numbers beside it describe another."""
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(path=root / "recipes" / "cpu-realtext.yaml")
    assert cfg.train.steps * cfg.train.batch_tokens_start == cfg.train.steps * cfg.train.batch_tokens_end == 12_288_000
    assert (cfg.train.steps, cfg.train.lr, cfg.train.causal_fraction, cfg.train.ema_decay) == (1500, 2e-2, 0.5, 0.99)
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.vocab_size) == (4, 128, 8192)
    assert cfg.model.hidden_dropout == cfg.model.attention_dropout == 0.0
    docs = (root / "docs" / "recipes.md").read_text()
    assert "1,500 steps of 8,192 tokens = 12.29M tokens" in docs and "causal fraction 1/2" in docs


@pytest.mark.parametrize("override", ["workdir=s3://bucket/run", 'clean.inputs=["gs://b/corpus"]',
                                      "eval.blimp_dir=file:///data/blimp", "eval.finetune.data_dir=hdfs://nn/glue"])
def test_uris_of_known_filesystems_are_accepted_where_locations_are_read(override):
    load_config("tiny", overrides=[override])


@pytest.mark.parametrize("override, field", [("workdir=s4://bucket/run", "workdir"),
                                             ('clean.inputs=["ftp://b/corpus"]', "clean.inputs[0]"),
                                             ("eval.blimp_dir=http://host/blimp", "eval.blimp_dir")])
def test_uris_of_unknown_schemes_are_refused_by_name(override, field):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides=[override])
    assert err.value.field == field and "scheme" in str(err.value)


def test_demo_with_an_unknown_uri_scheme_fails_before_writing_anything(tmp_path, monkeypatch, capsys):
    from cli.main import main

    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--workdir", "s4://bucket/demo"]) == 1
    assert "config field 'workdir'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no folder named "s4:"
