"""CLI: `gptbert score`, `gptbert generate`, `gptbert evaluate` (recipe §6)."""

from __future__ import annotations

import argparse

from common import storage

from .options import add_config_args, config_from_args


DEVICE_HELP = ("where the model computes: auto (CUDA when present), cpu, cuda or cuda:N; sets eval.device "
               "(default: the config's, auto)")


def register(subparsers) -> None:
    """Add the ``score``, ``generate`` and ``evaluate`` subcommands (each computes on ``eval.device``,
    which ``--device`` sets)."""

    p = subparsers.add_parser("score", help="log-likelihood of sentences in causal, mntp and fused mode")
    p.add_argument("model_dir", help="a trained model folder (model.safetensors, config.json, tokenizer.json)")
    p.add_argument("sentences", nargs="+", help="sentences to score")
    p.add_argument("--mode", dest="modes", action="append", choices=["causal", "mntp", "fused"],
                   help="scoring mode (repeatable; default: all three)")
    p.add_argument("--temperature", dest="temperatures", action="append", type=float,
                   help="divide logits by T before the log-softmax (repeatable; default 1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--device", help=DEVICE_HELP)
    add_config_args(p)
    p.set_defaults(func=score_command)

    g = subparsers.add_parser("generate", help="continue a prompt in causal mode")
    g.add_argument("model_dir")
    g.add_argument("prompt")
    g.add_argument("--greedy", action="store_true", help="greedy decoding (default: sampling)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="CTRL repetition penalty (1 = off; the paper uses 1.5 to stop greedy loops)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--seed", type=int, default=None, help="sampling seed")
    g.add_argument("--device", help=DEVICE_HELP)
    add_config_args(g)
    g.set_defaults(func=generate_command)

    e = subparsers.add_parser("evaluate", help="BLiMP-style minimal pairs (and fine-tuning) -> results.json, report.md")
    e.add_argument("model_dir", help="a trained model folder; with --baseline ngram, a shard folder whose "
                                     "training split the n-gram counts come from")
    e.add_argument("--blimp", help="folder of BLiMP jsonl files (overrides eval.blimp_dir)")
    e.add_argument("--suite", choices=["babylm"],
                   help="run the BabyLM 2025 zero-shot suite on --data instead of the configured tasks")
    e.add_argument("--data", help="with --suite babylm: a folder laid out like the official evaluation_data/ "
                                  "(full_eval/, fast_eval/) or one of those folders (overrides eval.babylm_dir)")
    e.add_argument("--fast", action="store_true", help="with --suite babylm: the fast_eval subsets "
                                                       "(zero-shot only, as the official fast suite)")
    e.add_argument("--no-finetune", action="store_true",
                   help="with --suite babylm: skip the fine-tuning tasks of full_eval/glue_filtered/")
    e.add_argument("--out", required=True, help="output folder for results.json and report.md")
    e.add_argument("--max-pairs", type=int, help="at most this many pairs per paradigm (quick runs)")
    e.add_argument("--baseline", choices=["ngram"],
                   help="evaluate a count n-gram model of the shards (same tokenizer) instead of a model")
    e.add_argument("--order", type=int, default=2, help="n-gram order of --baseline ngram (default 2)")
    e.add_argument("--smoothing", choices=["witten-bell", "add-k"], default="witten-bell",
                   help="n-gram smoothing (default witten-bell; add-k uses k = 0.01)")
    e.add_argument("--device", help=DEVICE_HELP)
    add_config_args(e)
    e.set_defaults(func=evaluate_command)


def eval_config(args: argparse.Namespace, **changes):
    """The validated EvalConfig of ``--config``/``--preset``/``--set``, with ``--device`` as
    ``eval.device`` and ``changes`` applied."""
    from common.config import from_dict, to_dict
    from common.config.eval import EvalConfig

    cfg = config_from_args(args).eval
    if args.device is not None:
        changes["device"] = args.device
    return from_dict(EvalConfig, {**to_dict(cfg), **changes}) if changes else cfg  # re-validates


def _load(model_dir: str, cfg):
    from gptbert.evaluation import resolve_eval_device
    from gptbert.io import load_model_dir

    model, tokenizer = load_model_dir(model_dir, device=resolve_eval_device(cfg))
    if tokenizer is None:
        raise FileNotFoundError(f"model folder {model_dir} lacks tokenizer.json (needed to encode text)")
    return model, tokenizer


def _ngram_baseline(shard_dir: str, order: int, smoothing: str):
    """An n-gram model counted over a shard folder's training split, and the shards' tokenizer."""
    from tokenization.tokenizer import load_tokenizer

    from gptbert.data import open_data
    from gptbert.ngram import NGramLM

    data = open_data(shard_dir)
    if data.tokenizer is None:
        raise FileNotFoundError(f"{shard_dir}: no tokenizer.json with the manifest's sha256 in the shard folder "
                                "(needed to encode the sentences)")
    model = NGramLM.fit(data.train, order, smoothing=smoothing)
    return model, load_tokenizer(data.tokenizer)


def score_command(args: argparse.Namespace) -> int:
    """Print each sentence's log-likelihood per scoring mode and temperature, as a table or JSON."""
    import json

    from gptbert.scoring import score_sentences

    modes = args.modes or ["causal", "mntp", "fused"]
    temperatures = args.temperatures or [1.0]
    cfg = eval_config(args)
    model, tokenizer = _load(args.model_dir, cfg)
    scores = score_sentences(model, tokenizer, args.sentences, modes=modes, temperatures=temperatures,
                             max_tokens=cfg.max_tokens)
    if args.json:
        out = [{"sentence": s, "scores": {m: {str(t): float(scores[m][i, k]) for k, t in enumerate(temperatures)}
                                          for m in modes}} for i, s in enumerate(args.sentences)]
        print(json.dumps(out, indent=2))
        return 0
    header = [f"{m}@T={t:g}" if len(temperatures) > 1 else m for m in modes for t in temperatures]
    print("\t".join(header + ["sentence"]))
    for i, s in enumerate(args.sentences):
        cells = [f"{scores[m][i, k]:.4f}" for m in modes for k in range(len(temperatures))]
        print("\t".join(cells + [s]))
    return 0


def generate_command(args: argparse.Namespace) -> int:
    """Print the prompt followed by its continuation under the given decoding settings."""
    from gptbert.generate import GenerationSettings, generate

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, greedy=args.greedy,
                                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  repetition_penalty=args.repetition_penalty, seed=args.seed)
    settings.validate()
    model, tokenizer = _load(args.model_dir, eval_config(args))
    print(args.prompt + " " + generate(model, tokenizer, args.prompt, settings).lstrip())
    return 0


def _babylm_finetune(data_dir: str, fast: bool, skip: bool) -> tuple[dict, str | None]:
    """The eval.finetune fields that fine-tune the official set found under ``data_dir``
    (``full_eval/glue_filtered`` or ``glue_filtered``), and a note on what is not run."""
    from common.config.eval import BABYLM_FINETUNE_TASKS
    from gptbert.evaluation.babylm import FINETUNE_FOLDER, suite_root

    folder = suite_root(data_dir, "full") / FINETUNE_FOLDER
    if not folder.is_dir():
        return {}, None if fast else f"skipped: {folder} not found"
    if fast or skip:
        return {}, "skipped (" + ("--fast: the official fast suite is zero-shot only" if fast else "--no-finetune") + ")"
    present = [t for t in BABYLM_FINETUNE_TASKS if any(folder.glob(f"{t}.*.jsonl"))]
    if not present:
        return {}, f"skipped: {folder} holds none of {', '.join(BABYLM_FINETUNE_TASKS)}"
    return {"data_dir": str(folder), "tasks": present, "recipe": "babylm", "skip_missing": True}, None


def evaluate_command(args: argparse.Namespace) -> int:
    """Evaluate a model folder (or an n-gram baseline of a shard folder) into results.json and
    report.md, and print the headline metrics."""
    from tqdm import tqdm

    from common.config import to_dict
    from gptbert import evaluation

    cfg = eval_config(args)
    changes = {}
    if args.blimp:
        changes["blimp_dir"] = args.blimp
    if args.max_pairs is not None:
        changes["max_pairs_per_paradigm"] = args.max_pairs
    if args.suite == "babylm":
        if not (args.data or cfg.babylm_dir):
            raise ValueError("--suite babylm needs --data DIR (the official evaluation_data/ layout)")
        changes["tasks"] = ["babylm", "global_piqa"]  # Global PIQA: the 2026 suite's, when the folder has it
        changes["babylm_dir"] = args.data or cfg.babylm_dir
        if args.fast:
            changes["babylm_split"] = "fast"
        finetune, note = _babylm_finetune(changes["babylm_dir"], args.fast, args.no_finetune)
        if finetune:
            changes["tasks"] = ["babylm", "global_piqa", "glue"]
            changes["finetune"] = {**to_dict(cfg.finetune), **finetune}
        if note:
            print(f"fine-tuning: {note}")
    elif args.data or args.fast or args.no_finetune:
        raise ValueError("--data, --fast and --no-finetune go with --suite babylm")
    if args.baseline == "ngram":
        changes["tasks"] = ["blimp"]  # a count model scores sentences; it cannot be fine-tuned
    cfg = eval_config(args, **changes)
    evaluation.preflight(cfg)  # unknown tasks, CUDA missing: one line before anything is read or written
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="row", desc="scoring")
        bar.update(done)

    try:
        if args.baseline == "ngram":
            model, tokenizer = _ngram_baseline(args.model_dir, args.order, args.smoothing)
            results = evaluation.evaluate(model, tokenizer, cfg, progress=progress, model_dir=args.model_dir)
            path = evaluation.write_results(results, args.out)
            metrics = evaluation.summary_metrics(results)
        else:
            record = evaluation.evaluate_model_dir(args.model_dir, cfg, args.out, progress=progress)
            path, metrics = storage.join(args.out, evaluation.RESULTS_FILE), record["stats"]
    finally:
        if bar is not None:
            bar.close()
    for name, value in metrics.items():
        print(f"{name}\t{value:.4f}")
    print(f"wrote {path} and {evaluation.REPORT_FILE} beside it")
    return 0
