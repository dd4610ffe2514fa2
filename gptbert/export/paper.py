"""The paper's checkpoint layout (github: ltgoslo/gpt-bert, and its released weights) <-> ours.

The paper's model names its parameters ``embedding.*``, ``transformer.attention_layers.N.*``,
``transformer.mlp_layers.N.*``, ``transformer.dwa_modules.alphas.K`` and ``classifier.*``; ours
follow ``gptbert.model``. The forward-parity test loads the paper's weights through this mapping,
and the export and training-parity code use it the same way.
"""

from __future__ import annotations

from typing import Mapping

import torch

from common.config.model import ModelConfig

from ..model import GPTBERT, position_index_table


def reference_name_map(config: ModelConfig) -> dict[str, str]:
    """reference name -> our name, for every parameter of the reference layout."""
    names = {
        "embedding.word_embedding.weight": "word_embedding.weight",
        "embedding.relative_embedding": "relative_embedding",
        "embedding.relative_layer_norm.weight": "relative_norm.weight",
        "embedding.relative_layer_norm.bias": "relative_norm.bias",
        "classifier.nonlinearity.1.weight": "head_dense.weight",
        "classifier.nonlinearity.1.bias": "head_dense.bias",
        "classifier.nonlinearity.5.bias": "head_bias",
    }
    for i in range(config.num_layers):
        ref, ours = f"transformer.attention_layers.{i}", f"layers.{i}.attention"
        for lin in ("in_proj_qk", "in_proj_vg", "out_proj"):
            for kind in ("weight", "bias"):
                names[f"{ref}.{lin}.{kind}"] = f"{ours}.{lin}.{kind}"
        names[f"transformer.mlp_layers.{i}.mlp.1.weight"] = f"layers.{i}.mlp.up.weight"
        names[f"transformer.mlp_layers.{i}.mlp.4.weight"] = f"layers.{i}.mlp.down.weight"
    if config.layer_weighting:
        for k in range(2 * config.num_layers):
            names[f"transformer.dwa_modules.alphas.{k}"] = f"layer_weights.{k}"
    return names


def load_reference_state_dict(model: GPTBERT, state: Mapping[str, torch.Tensor]) -> None:
    """Load a state dict in the paper's (and the released checkpoints') layout into ``model``.

    Every reference parameter must be present with our shape. The tied LM-head weight
    (``classifier.nonlinearity.5.weight``) must equal the word embedding; the ``position_indices``
    buffers must equal our bucket table. Raises ValueError naming the first offending key.
    """
    state = {k.removeprefix("module."): torch.as_tensor(v) for k, v in state.items()}
    names = reference_name_map(model.config)
    ours = dict(model.named_parameters())
    new: dict[str, torch.Tensor] = {}
    for ref_name, our_name in names.items():
        if ref_name not in state:
            raise ValueError(f"reference state dict lacks {ref_name!r} (needed for {our_name!r})")
        value = state[ref_name]
        if tuple(value.shape) != tuple(ours[our_name].shape):
            raise ValueError(f"reference {ref_name!r} has shape {tuple(value.shape)}, "
                             f"expected {tuple(ours[our_name].shape)} for this ModelConfig")
        new[our_name] = value
    tied = state.get("classifier.nonlinearity.5.weight")
    if tied is not None and not torch.equal(tied, state["embedding.word_embedding.weight"]):
        raise ValueError("reference 'classifier.nonlinearity.5.weight' differs from the word embedding; "
                         "GPT-BERT ties them")
    known = set(names) | {"classifier.nonlinearity.5.weight"}
    for key, value in state.items():
        if key.endswith("position_indices"):
            n = value.size(0)
            mine = position_index_table(n, model.config.position_buckets, model.config.max_position_embeddings)
            if not torch.equal(value.long(), mine):
                raise ValueError(f"reference {key!r} differs from this model's relative-position buckets")
            known.add(key)
    unknown = sorted(set(state) - known)
    if unknown:
        raise ValueError(f"reference state dict has unexpected key {unknown[0]!r} "
                         f"({len(unknown)} unexpected in all); is the ModelConfig right?")
    with torch.no_grad():
        for name, value in new.items():
            ours[name].copy_(value.to(ours[name].dtype))


def export_reference_state_dict(model: GPTBERT) -> dict[str, torch.Tensor]:
    """Our weights under the reference names (inverse of ``load_reference_state_dict``), including
    the tied head weight and the ``position_indices`` buffers the reference code stores."""
    ours = dict(model.named_parameters())
    out = {ref: ours[name].detach().clone() for ref, name in reference_name_map(model.config).items()}
    out["classifier.nonlinearity.5.weight"] = out["embedding.word_embedding.weight"].clone()
    n = model.config.max_position_embeddings
    table = position_index_table(n, model.config.position_buckets, n)
    for i in range(model.config.num_layers):
        out[f"transformer.attention_layers.{i}.position_indices"] = table.clone()
    return out

__all__ = ["export_reference_state_dict", "load_reference_state_dict", "reference_name_map"]
