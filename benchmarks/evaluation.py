"""Zero-shot evaluation speed: our packed scoring against the official BabyLM pipeline's strategy.

Both score the same items of a BabyLM-layout folder (or BLiMP folder) with the same model, causal
and MNTP at T = 1, in one process:

- ``pipeline strategy``: what evaluation_pipeline/sentence_zero_shot does, re-enacted on our model:
  items in batches of 64; causal rows padded to the longest sentence of the batch; for MNTP one
  masked copy per scored token, all copies of the batch padded to its longest sentence and run in
  mini-batches of 64 rows;
- ``ours``: every (sentence, copy) row sorted by length and cut under a token budget, the LM head
  only at scored positions (gptbert.evaluation.babylm.score_items).

With ``--official PIPELINE_DIR --official-python PY`` the real pipeline also runs, as a subprocess
on an export of the same model (``python -m evaluation_pipeline.sentence_zero_shot.run``), and its
wall time (model loading included) is printed beside ours. Scores of the two in-process strategies
are compared (max abs difference) so the speed-up is not bought with different numbers.

    python benchmarks/evaluation.py --data ../shared/data/babylm-eval-dev --preset small --max-items 200
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptbert.evaluation import babylm  # noqa: E402
from gptbert.model import build_blocked_mask  # noqa: E402
from gptbert.scoring import special_ids  # noqa: E402

OFFICIAL_TASK = {"blimp": "blimp", "supplement": "blimp", "ewok": "ewok", "entity_tracking": "entity_tracking",
                 "wug_adj": "wug_adj", "wug_past": "wug_past", "comps": "comps"}


def _forward_logprobs(model, rows: list[list[int]], pad: int, positions, targets, causal: bool,
                      width: int | None = None) -> torch.Tensor:
    """One batch padded to ``width`` (default: its longest row; padding masked out of attention),
    the LM head at every position, log-softmax, then gather."""
    width = width or max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    seg = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        seg[i, : len(r)] = 1
    logits = model.lm_logits(model(ids, build_blocked_mask(seg, torch.full((len(rows),), causal))))
    logp = torch.log_softmax(logits.float(), -1)
    return logp[positions[0], positions[1], targets]


@torch.inference_mode()
def pipeline_strategy(model, tokenizer, items, batch_size: int = 64, non_causal_batch_size: int = 64):
    """{mode: (items, candidates)} log-probs computed the way the official pipeline batches them."""
    ids, starts = {}, {}
    keys = sorted({(s, c) for it in items for s, c in zip(it.sentences, it.completions)})
    enc, first = babylm.completion_inputs(tokenizer, [k[0] for k in keys], [k[1] for k in keys])
    for k, e, f in zip(keys, enc, first):
        ids[k], starts[k] = e, f
    special = special_ids(tokenizer)
    width = max(len(it.sentences) for it in items)
    out = {m: np.full((len(items), width), -np.inf) for m in ("causal", "mntp")}
    for b in range(0, len(items), batch_size):
        batch = items[b: b + batch_size]
        for j in range(width):
            members = [(i, (it.sentences[j], it.completions[j])) for i, it in enumerate(batch, start=b)
                       if j < len(it.sentences)]
            # causal: inputs tokens[:-1], the phrase tokens' log-probs summed
            rows = [ids[k][:-1] for _, k in members]
            pos_r, pos_t, tgt, owner = [], [], [], []
            for r, (i, k) in enumerate(members):
                for t in range(starts[k], len(ids[k])):
                    pos_r.append(r); pos_t.append(t - 1); tgt.append(ids[k][t]); owner.append(i)
            lp = _forward_logprobs(model, rows, special["pad"], (torch.tensor(pos_r), torch.tensor(pos_t)),
                                   torch.tensor(tgt), causal=True)
            sums = np.zeros(len(items))
            np.add.at(sums, owner, lp.double().numpy())
            for i, _ in members:
                out["causal"][i, j] = sums[i]
            # mntp: one copy per phrase token, all copies of the batch padded together, 64 rows at a time
            copies, cpos, ctgt, cown = [], [], [], []
            for i, k in members:
                for t in range(starts[k], len(ids[k])):
                    row = list(ids[k]); row[t] = special["mask"]
                    copies.append(row); cpos.append(t - 1); ctgt.append(ids[k][t]); cown.append(i)
            full = max(len(r) for r in copies) if copies else 0
            sums = np.zeros(len(items))
            for c in range(0, len(copies), non_causal_batch_size):
                chunk = copies[c: c + non_causal_batch_size]
                n = len(chunk)
                lp = _forward_logprobs(model, chunk, special["pad"], (torch.arange(n), torch.tensor(cpos[c: c + n])),
                                       torch.tensor(ctgt[c: c + n]), causal=False, width=full)  # the batch's longest
                np.add.at(sums, cown[c: c + n], lp.double().numpy())
            for i, _ in members:
                out["mntp"][i, j] = sums[i]
    return out


def _model(args, tokenizer):
    from common.config import preset
    from gptbert.io import load_model_dir
    from gptbert.kernels import build_model

    if args.model:
        return load_model_dir(args.model)[0].eval()
    cfg = preset(args.preset).model
    torch.manual_seed(0)
    return build_model(cfg).eval()


def _tokenizer(args, items):
    if args.model:
        from gptbert.io import load_model_dir

        return load_model_dir(args.model)[1]
    from common.config import preset
    from tokenization.tokenizer import build_tokenizer, build_trainer

    cfg = preset(args.preset).tokenizer
    tok = build_tokenizer(cfg)
    tok.train_from_iterator([s for it in items for s in it.sentences], build_trainer(cfg))
    return tok


def _run_official(args, model, tokenizer, folder: Path, task: str, backend: str, tmp: Path) -> float:
    from gptbert.export import export_model
    from gptbert.io import save_model_dir

    hf = tmp / "hf"
    if not hf.exists():
        tokenizer.save(str(tmp / "tokenizer.json"))
        save_model_dir(tmp / "model", model, model.config, tmp / "tokenizer.json", {"steps": 0})
        export_model(tmp / "model", hf)
    data = tmp / "data" / task
    if not data.exists():
        data.mkdir(parents=True)
        for path in sorted(folder.glob("*.jsonl")):  # the same capped items
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            (data / path.name).write_text("\n".join(lines[: args.max_items]) + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(args.official),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    start = time.perf_counter()
    subprocess.run([args.official_python, "-m", "evaluation_pipeline.sentence_zero_shot.run", "--data_path", str(data),
                    "--task", OFFICIAL_TASK[task], "--model_path_or_name", str(hf), "--backend", backend,
                    "--output_dir", str(tmp / "results")], cwd=args.official, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "babylm-eval-dev"
    ap.add_argument("--data", default=str(default), help="BabyLM evaluation_data layout (or a full_eval folder)")
    ap.add_argument("--tasks", nargs="*", default=None, help="tasks to time (default: all found)")
    ap.add_argument("--max-items", type=int, default=200, help="items per file")
    ap.add_argument("--model", help="a model folder (default: a randomly initialised --preset model)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="our scoring under bf16 autocast (eval.precision); the baselines stay fp32")
    ap.add_argument("--official", help="checkout of babylm/evaluation-pipeline-2025 (also time the real pipeline)")
    ap.add_argument("--official-python", default=sys.executable, help="python of the pipeline's environment")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    found, _ = babylm.find_subtasks(args.data, "full", args.tasks)
    if not found:
        raise SystemExit(f"no BabyLM task folder under {args.data}")
    loaded = {name: _cap(name, folder, args.max_items) for name, folder in found.items()}
    tokenizer = _tokenizer(args, [it for items in loaded.values() for it in items])
    model = _model(args, tokenizer)
    params = sum(p.numel() for p in model.parameters())
    print(f"# model: {args.model or args.preset} ({params:,} parameters), {args.threads} threads, causal + mntp at T=1, "
          f"ours in {args.precision}")
    header = "| task | items | sentences | pipeline strategy s | ours s | speed-up | max abs diff |"
    if args.official:
        header += " official pipeline s (causal + mntp, with loading) | ours vs official |"
    print(header)
    print("|---|---|---|---|---|---|---|" + ("---|---|" if args.official else ""))
    totals = [0.0, 0.0, 0.0]
    with tempfile.TemporaryDirectory() as tmp:
        for name, items in loaded.items():
            sentences = sum(len(it.sentences) for it in items)
            t0 = time.perf_counter()
            ref = pipeline_strategy(model, tokenizer, items)
            t_ref = time.perf_counter() - t0
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                ours = babylm.score_items(model, tokenizer, items, ["causal", "mntp"], [1.0])
            t_ours = time.perf_counter() - t0
            diff = max(float(np.nanmax(np.abs(np.where(np.isinf(ref[m]), 0, ref[m] - ours[m][:, :, 0]))))
                       for m in ("causal", "mntp"))
            row = f"| {name} | {len(items)} | {sentences} | {t_ref:.1f} | {t_ours:.1f} | {t_ref / t_ours:.2f}x | {diff:.1e} |"
            totals[0] += t_ref
            totals[1] += t_ours
            if args.official:
                t_off = sum(_run_official(args, model, tokenizer, found[name], name, b, Path(tmp))
                            for b in ("causal", "mntp"))
                totals[2] += t_off
                row += f" {t_off:.1f} | {t_off / t_ours:.2f}x |"
            print(row, flush=True)
    line = f"| all | | | {totals[0]:.1f} | {totals[1]:.1f} | {totals[0] / totals[1]:.2f}x | |"
    if args.official:
        line += f" {totals[2]:.1f} | {totals[2] / totals[1]:.2f}x |"
    print(line)
    return 0


def _cap(name: str, folder: Path, max_items: int):
    """The first ``max_items`` items of each file of the task folder."""
    items = []
    for path in sorted(folder.glob("*.jsonl")):
        with tempfile.TemporaryDirectory() as tmp:
            lines = [line for line in path.read_text().splitlines() if line.strip()][:max_items]
            copy = Path(tmp) / path.name
            copy.write_text("\n".join(lines) + "\n")
            items += babylm.load_subtask(name, Path(tmp))
    return items


if __name__ == "__main__":
    sys.exit(main())
