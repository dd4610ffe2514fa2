"""Time of a strict-small BabyLM submission (``gptbert submission``) on this machine.

Builds a run folder of a ``--preset`` model (random weights: the time does not depend on training)
with the 19 strict-small milestone models (each perturbed, so none is reused), the evaluation
tree of tests/test_submission.py (the dev files of ../shared/data and small official-format files
for the tasks they lack), and times, in one process:

- the submission, cold (every file scored: zero-shot full, GLUE fine-tuning, fast_eval x 19,
  collation), by phase;
- the same submission again into the same folder (every file reused by digest);
- with ``--official PIPELINE_DIR`` (a folder holding the official ``evaluation_pipeline/``), the
  official ``collate_preds.py`` on the same folder (its count tables set to the data's counts).

The official zero-shot and fine-tuning scripts need their own environment (``datasets``, the pinned
``transformers``) and an export; benchmarks/evaluation.py times the zero-shot one where it runs.

    python benchmarks/submission.py --preset mini --tokenizer TOKENIZER.json --layout 2026
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def make_run(root: Path, preset_name: str, tokenizer: Path | None, revisions) -> Path:
    import torch

    from common.config import preset
    from gptbert.io import save_model_dir
    from gptbert.model import GPTBERT
    from test_scoring import make_tokenizer

    cfg = preset(preset_name).model
    tok = root / "tokenizer.json"
    root.mkdir(parents=True)
    if tokenizer is not None:
        shutil.copy(tokenizer, tok)
    else:
        make_tokenizer().save(str(tok))
    from tokenization.tokenizer import load_tokenizer

    vocab = load_tokenizer(tok).get_vocab_size()
    import dataclasses

    cfg = dataclasses.replace(cfg, vocab_size=max(vocab, cfg.vocab_size) if tokenizer is None else vocab)
    torch.manual_seed(0)
    model = GPTBERT(cfg).float().eval()
    save_model_dir(root / "model", model, cfg, tok, {"steps": 0})
    for k, name in enumerate(revisions):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3 * torch.randn_like(p))
        save_model_dir(root / "milestones" / name, model, cfg, tok, {"milestone": name, "milestone_words": (k + 1) * 10**6})
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer.json of the preset's vocabulary")
    parser.add_argument("--layout", default="2026", choices=["2025", "2026"])
    parser.add_argument("--official", type=Path, default=None)
    args = parser.parse_args()

    import json

    import test_submission as T
    from conftest import shared_path
    from gptbert.submission import build_submission

    root = Path(tempfile.mkdtemp(prefix="gptbert-submission-bench-"))
    data = T.build_data(root / "data", shared_path)
    sizes = T.data_sizes(data, args.layout)
    contract = T.dev_contract(args.layout, sizes)
    run = make_run(root / "run", args.preset, args.tokenizer, contract.revisions)
    aoa = root / "aoa"
    aoa.mkdir()
    (aoa / "surprisal.json").write_text(json.dumps({"results": [
        {"step": r, "word": w, "surprisal": 1.0} for r in contract.revisions for w in "abc"]}))
    phases: dict[str, float] = {}
    last = [time.perf_counter()]

    def log(line: str) -> None:
        now = time.perf_counter()
        kind = ("finetune" if "/finetune/" in line else "zero-shot full" if line.split()[1].startswith("main/")
                else "fast x revisions") if line.startswith(("scored", "reused")) else "other"
        phases[kind] = phases.get(kind, 0.0) + now - last[0]
        last[0] = now

    rows = []
    for label in ("cold", "rerun (reused)"):
        start = time.perf_counter()
        last[0] = start
        phases.clear()
        build_submission(run, root / "sub", data, layout=args.layout, name="bench", aoa_dir=aoa, cfg=T.small_cfg(),
                         contract=contract, log=log)
        total = time.perf_counter() - start
        rows.append((label, total, dict(phases)))
    official_s = None
    if args.official is not None:
        import argparse as ap

        copy = root / "copy"
        shutil.copytree(root / "sub" / "results", copy)
        module = T._module(args.official / "evaluation_pipeline" / "collate_preds.py", "official_collate")
        T.set_official_counts(module, sizes, args.layout)
        start = time.perf_counter()
        module.collate_preds(ap.Namespace(model_path_or_name=Path("bench"), backend="causal", results_dir=copy,
                                          revision_name="main", fast=True, fast_eval_dir=data / "fast_eval",
                                          track="strict-small", multimodal=False))
        official_s = time.perf_counter() - start
    print(f"\n{args.preset} model, layout {args.layout}, 19 milestones, data: {data}\n")
    print("| run | total s | zero-shot full s | finetune s | fast x 19 s | collate + rest s |")
    print("|---|---|---|---|---|---|")
    for label, total, p in rows:
        print(f"| {label} | {total:.1f} | {p.get('zero-shot full', 0):.1f} | {p.get('finetune', 0):.1f} | "
              f"{p.get('fast x revisions', 0):.1f} | {total - sum(v for k, v in p.items() if k != 'other'):.1f} |")
    if official_s is not None:
        print(f"\nofficial collate_preds.py on the same folder: {official_s:.2f} s")
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
