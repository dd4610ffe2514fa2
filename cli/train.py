"""CLI: `gptbert pretrain` (recipe §2, §3, §5)."""

from __future__ import annotations


from common import storage
from common.errors import error_line

from .options import add_config_args, config_from_args


def register(subparsers) -> None:
    """Add the ``pretrain`` and ``show-batch`` subcommands."""
    p = subparsers.add_parser(
        "pretrain", help="pretrain a GPT-BERT model (resumes from OUT/checkpoints; writes OUT/model)")
    p.add_argument("--data", required=True,
                   help="a shard folder (manifest.json) or a token file (.txt: one document per line "
                        "of space-separated ids; .npz: arrays ids + offsets)")
    p.add_argument("--out", required=True, help="run folder: checkpoints/ and the final model/")
    p.add_argument("--tokenizer", help="tokenizer.json to ship with the model (default: the shard folder's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show the libraries' logs live (always in OUT/logs)")
    p.add_argument("--stop-after", type=int, help="stop after this many steps (resumable), without the model folder")
    add_config_args(p)
    p.set_defaults(func=pretrain_command)

    b = subparsers.add_parser(
        "show-batch", help="decode the examples the trainer sees at a step: segments, <s>, masks, targets")
    b.add_argument("--data", required=True, help="a shard folder (with its tokenizer.json)")
    b.add_argument("--step", type=int, default=0, help="global step to show (default 0)")
    b.add_argument("--examples", type=int, default=2, help="examples of each kind to show (default 2)")
    b.add_argument("--width", type=int, default=0, help="show at most this many positions per example (0 = all)")
    add_config_args(b)
    b.set_defaults(func=show_batch_command)


def pretrain_command(args) -> int:
    """Pretrain with the configured launcher, then print the model folder and its final losses."""
    from gptbert.distributed import check_launch, run_pretraining
    from gptbert.metrics import ProgressFile
    from gptbert.pretraining import PROGRESS_FILE, check_run_folder

    from .console import Console, log_path_for

    cfg = config_from_args(args)
    check_launch(cfg)  # an unknown launcher or a missing GPU: one line, nothing written
    out = storage.normalize(args.out)
    # A run folder on an object store trains in its local home and is published at the end.
    local = storage.local_home(out)
    if not storage.is_remote(out):
        check_run_folder(local)  # a bad --out is refused before the console writes its log under it
    total = min(cfg.train.steps, args.stop_after or cfg.train.steps)
    console = Console(log_path_for(local, "pretrain"), verbose=args.verbose, title=f"gptbert pretrain: {out}")
    with console:
        callback = None
        if not args.no_progress:
            local.mkdir(parents=True, exist_ok=True)
            callback = ProgressFile(local / PROGRESS_FILE, cfg.train.steps)
            console.event("progress_file", {"stage": "pretrain", "path": callback.path, "total_steps": total})
        console.event("stage_started", {"stage": "pretrain"})
        try:
            result = run_pretraining(cfg, args.data, out, tokenizer=args.tokenizer, callback=callback,
                                     stop_after=args.stop_after)
        except BaseException as exc:
            console.event("stage_failed", {"stage": "pretrain", "error": error_line(exc)})
            raise
        console.event("stage_finished", {"stage": "pretrain", "cached": False, "path": str(result)})
    print(f"pretrain: wrote {result}", file=console.out)
    summary = storage.read_json(storage.join(result, "training.json"))
    if isinstance(summary, dict):
        final = summary.get("final", {})
        keys = ("loss", "loss_masked", "loss_causal", "valid_loss_masked_ema", "valid_loss_causal_ema")
        print("  " + "  ".join(f"{k}={final[k]:.4f}" for k in keys if isinstance(final.get(k), float)),
              file=console.out)
    return 0


def show_batch_command(args) -> int:
    """Print the examples the trainer sees at ``--step``, decoded, up to ``--examples`` of each kind."""
    from tokenization.tokenizer import load_tokenizer

    from gptbert.data import open_data
    from gptbert.objective import TrainingStream, describe_example

    cfg = config_from_args(args)
    data = open_data(args.data)
    if data.tokenizer is None:
        raise FileNotFoundError(f"{args.data}: no tokenizer.json to decode with")
    tokenizer = load_tokenizer(data.tokenizer)
    stream = TrainingStream(data.train, cfg.train, cfg.model.vocab_size)
    cursor = stream.cursor
    for step in range(args.step + 1):  # the plan of a step depends on the data position before it
        plan, cursor = stream.plan_from(step, cursor)
    print(f"step {plan.step}: {plan.batch_size} examples of {plan.seq_len} positions, mask rate "
          f"{plan.mask_rate:.3f}, {int(plan.causal.sum())} causal")
    shown = {True: 0, False: 0}
    for i in range(plan.batch_size):
        kind = bool(plan.causal[i])
        if shown[kind] >= args.examples:
            continue
        shown[kind] += 1
        batch = stream.batch(plan, [i])
        print()
        print(describe_example(batch, 0, tokenizer.id_to_token, plan.examples[i], width=args.width))
    return 0
