"""CLI: `gptbert model-info PRESET`: parameter count, config and FLOPs per token as JSON."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    """Add the ``model-info`` subcommand."""
    p = subparsers.add_parser("model-info", help="parameters, config and FLOPs per token of a model config (JSON)")
    p.add_argument("preset", nargs="?", default=None, help="named preset: tiny, mini, small, base")
    p.add_argument("--config", help="YAML file with a (partial) PipelineConfig")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, e.g. --set model.gate=false (repeatable)")
    p.add_argument("--seq-len", type=int, default=128, help="sequence length for the FLOP counts (default 128)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="sequences per batch; the position table is projected once per batch (default 8)")
    p.add_argument("--masked-target-fraction", type=float, default=0.15,
                   help="share of tokens with a target in a masked example (default 0.15)")
    p.add_argument("--causal-target-fraction", type=float, default=1.0,
                   help="share of tokens with a target in a causal example (default 1.0)")
    p.set_defaults(func=model_info_command)


def model_info(cfg, seq_len: int = 128, batch_size: int = 8, masked_target_fraction: float = 0.15,
               causal_target_fraction: float = 1.0) -> dict:
    """The JSON-able summary printed by ``model-info``; builds the model on the meta device to
    count its parameters by construction as well as by formula."""
    import torch

    from common.config import to_dict
    from gptbert.flops import (
        flops_per_token,
        forward_flops_breakdown,
        layer_weighting_flops_per_token,
        parameter_count,
    )
    from gptbert.model import GPTBERT, num_parameters

    with torch.device("meta"):
        built = num_parameters(GPTBERT(cfg))
    analytic = parameter_count(cfg)
    if built != analytic:
        raise RuntimeError(f"parameter count by construction ({built}) differs from the formula ({analytic})")

    def example(fraction: float) -> dict:
        return {
            "target_fraction": fraction,
            "train_flops_per_token": flops_per_token(cfg, seq_len, fraction, True, batch_size),
            "forward_flops_per_token": flops_per_token(cfg, seq_len, fraction, False, batch_size),
            "forward_breakdown": forward_flops_breakdown(cfg, seq_len, fraction, batch_size),
        }

    return {
        "parameters": built,
        "non_embedding_parameters": built - cfg.vocab_size * cfg.hidden_size,
        "config": to_dict(cfg),
        "flops": {
            "seq_len": seq_len,
            "batch_size": batch_size,
            "note": "matmul FLOPs (2 per multiply-add); training = forward + backward = 3x forward",
            "masked": example(masked_target_fraction),
            "causal": example(causal_target_fraction),
            "layer_weighting_train_flops_per_token": layer_weighting_flops_per_token(cfg, True),
        },
    }


def model_info_command(args: argparse.Namespace) -> int:
    """Print ``model_info`` of the configured model as JSON."""
    from common.config import load_config

    cfg = load_config(preset=args.preset, path=args.config, overrides=args.overrides)
    info = model_info(cfg.model, args.seq_len, args.batch_size, args.masked_target_fraction,
                      args.causal_target_fraction)
    print(json.dumps(info, indent=2))
    return 0
