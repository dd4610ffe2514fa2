"""The embedded demo's data and config: a generated grammar corpus and its minimal pairs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from common.config import PipelineConfig, from_dict, load_config, to_dict

DEMO_CONFIG = Path(__file__).resolve().parent / "demo.yaml"
DEMO_DOCUMENTS = 3000
DEMO_PAIRS_PER_PARADIGM = 50
DEMO_SEED = 0


def demo_config(workdir: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """flows/demo.yaml (mini preset, short schedule, Ray + DeepSpeed with two CPU workers)."""
    extra = list(overrides)
    if workdir is not None:
        extra = [f"workdir={workdir}"] + extra
    return load_config(path=DEMO_CONFIG, overrides=extra)


def write_demo_data(folder: str | Path, n_documents: int = DEMO_DOCUMENTS,
                    n_pairs: int = DEMO_PAIRS_PER_PARADIGM, seed: int = DEMO_SEED) -> tuple[Path, Path]:
    """Generate (once) the grammar corpus and minimal pairs; returns (corpus file, pairs folder)."""
    from tokenization import grammar

    folder = Path(folder).resolve()
    corpus = folder / f"grammar-{n_documents}-{seed}.txt.gz"
    pairs = folder / f"minimal-pairs-{n_pairs}-{seed}"
    if not corpus.exists():
        grammar.write_corpus(corpus, n_documents, seed)
    if not pairs.exists():
        tmp = pairs.with_name(f".{pairs.name}.tmp-{os.getpid()}")
        grammar.write_minimal_pairs(tmp, n_pairs, seed)
        try:
            os.replace(tmp, pairs)
        except OSError:  # generated concurrently by another process: same content
            shutil.rmtree(tmp, ignore_errors=True)
    return corpus, pairs


def with_demo_data(cfg: PipelineConfig, corpus: str | None = None) -> PipelineConfig:
    """Point the config at the demo data (generated under <workdir>/data) where it names none."""
    data = to_dict(cfg)
    gen_corpus, pairs = write_demo_data(Path(cfg.workdir) / "data")
    if corpus is not None:
        data["clean"]["inputs"] = [str(Path(corpus).resolve())]
    elif not data["clean"]["inputs"]:
        data["clean"]["inputs"] = [str(gen_corpus)]
    if not data["eval"]["blimp_dir"]:
        data["eval"]["blimp_dir"] = str(pairs)
    return from_dict(PipelineConfig, data)
