"""Bounded memory (issue 30): oneDNN's per-shape kernel caches are capped, the shard reader does not
pull pandas in, and a stage's work can run in a fresh process that hands back its result, its
exception, its events and its logs."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter (nothing imported yet) and return the JSON it prints last."""
    clean = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**clean, "PYTHONPATH": str(REPO), **env},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# A bf16 linear layer, forward and backward, at one new row count after another: what a training run
# does as its batch ramps and its LM head sees a different number of targets at every step.
NEW_SHAPES = """
import json, os, resource, torch
{setup}
linear = torch.nn.Linear(128, 512)
def run(rows):
    x = torch.randn(rows, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear(x).float().sum().backward()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
for rows in range(1, 40):
    run(rows)
before = rss()
for rows in range(40, 400):
    run(rows)
print(json.dumps({{"growth_mb": rss() - before, "caps": [os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"),
                                                         os.environ.get("LRU_CACHE_CAPACITY")]}}))
"""


def test_importing_gptbert_caps_the_cpu_kernel_caches_and_a_users_setting_wins():
    result = _python(NEW_SHAPES.format(setup="import gptbert"))
    assert result["caps"] == ["128", "128"]
    # 360 new shapes: about 0.6 GB uncapped on an AMX CPU (1,024 cached kernels of ~1 MB in each of
    # two caches); capped, the caches stop at 128 entries.
    assert result["growth_mb"] < 200, result
    assert _python("import gptbert, json, os; print(json.dumps(os.environ['LRU_CACHE_CAPACITY']))",
                   LRU_CACHE_CAPACITY="7") == "7"


def test_reading_shards_does_not_import_pandas(tmp_path):
    from common.config import CleanConfig, ShardConfig, TokenizerConfig
    from tokenization.clean import clean_corpus
    from tokenization.shards import write_shards
    from tokenization.tokenizer import train_tokenizer

    (tmp_path / "corpus.txt").write_text("\n".join(f"line {i} of a small corpus" for i in range(200)) + "\n")
    clean_corpus(CleanConfig(inputs=[str(tmp_path / "corpus.txt")]), tmp_path / "clean", progress_bar=False)
    train_tokenizer(tmp_path / "clean", TokenizerConfig(vocab_size=300), tmp_path / "tok", progress_bar=False)
    write_shards(tmp_path / "clean", tmp_path / "tok", ShardConfig(validation_fraction=0.1), tmp_path / "shards",
                 progress_bar=False)
    result = _python(f"""
import json, sys
from tokenization.shards import ShardReader
reader = ShardReader({str(tmp_path / "shards")!r})
print(json.dumps({{"docs": len(reader), "first": reader.document(0).tolist(), "words": int(reader.words.sum()),
                  "pandas": "pandas" in sys.modules}}))
""")
    from tokenization.shards import ShardReader

    reader = ShardReader(tmp_path / "shards")
    assert result == {"docs": len(reader), "first": reader.document(0).tolist(), "words": reader.num_words,
                      "pandas": False}


# ----------------------------------------------------------------------------- flows.isolation

def child_work(value: int, callback=None) -> dict:
    """Runs in the child: emits an event, logs a warning, calls the callback and its method, returns
    its pid."""
    from flows import events

    events.emit("stage_skipped", stage="isolated", reason=f"value {value}")
    logging.getLogger("gptbert.test").warning("from the child: %d", value)
    if callback is not None:
        callback({"loss": 1.5}, 1)
        callback({"loss": 1.25}, step=2)
        callback.flush()
        assert not hasattr(callback, "calls")  # only its methods reach the child, not its state
    return {"pid": os.getpid(), "value": value * 2}


class Recorder:
    """A callback that must stay in the parent (like the MLflow step logger)."""

    def __init__(self):
        self.calls = []

    def __call__(self, metrics, step):
        self.calls.append((metrics, step, os.getpid()))

    def flush(self):
        self.calls.append("flushed")


def child_fails(kind: str):
    from common.errors import DataError

    if kind == "data":
        raise DataError("some/file.json: not what was expected")
    if kind == "unpicklable":
        class Local(Exception):  # a class the parent cannot import
            pass

        raise Local("a local failure")
    if kind == "interrupt":
        raise KeyboardInterrupt
    os._exit(3)


def test_in_fresh_process_returns_the_result_and_replays_events_and_logs(caplog):
    from flows import events
    from flows.isolation import in_fresh_process

    seen = []
    unsubscribe = events.subscribe(lambda kind, fields: seen.append((kind, fields)))
    try:
        with caplog.at_level(logging.WARNING, logger="gptbert"):
            result = in_fresh_process(child_work, 21)
    finally:
        unsubscribe()
    assert result["value"] == 42 and result["pid"] != os.getpid()
    assert seen == [("stage_skipped", {"stage": "isolated", "reason": "value 21"})]
    assert [(r.name, r.getMessage()) for r in caplog.records if r.name == "gptbert.test"] == \
        [("gptbert.test", "from the child: 21")]


def test_in_parent_callbacks_run_here_in_order():
    from flows.isolation import InParent, in_fresh_process

    recorder = Recorder()
    result = in_fresh_process(child_work, 1, callback=InParent(recorder))
    me = os.getpid()
    assert result["pid"] != me
    assert recorder.calls == [({"loss": 1.5}, 1, me), ({"loss": 1.25}, 2, me), "flushed"]


def test_in_fresh_process_raises_the_childs_error_here():
    from common.errors import DataError
    from flows.isolation import in_fresh_process

    with pytest.raises(DataError, match="^some/file.json: not what was expected") as info:
        in_fresh_process(child_fails, "data")
    assert any("raised in a fresh process" in note for note in info.value.__notes__)  # --debug shows it
    with pytest.raises(RuntimeError, match="a local failure"):
        in_fresh_process(child_fails, "unpicklable")
    with pytest.raises(KeyboardInterrupt):
        in_fresh_process(child_fails, "interrupt")
    with pytest.raises(RuntimeError, match="ended without a result .exit code 3."):
        in_fresh_process(child_fails, "exit")


# ----------------------------------------------------------------------------- a trial in one process

@pytest.mark.slow
def test_a_trial_in_this_process_leaves_no_model_optimizer_or_thread_behind(tmp_path):
    """With sweep.isolate_trials off, trials train and evaluate in the sweep's process: once a
    trial's stages return, its model, optimizer, trainer and data thread must all be gone (weakly
    referenced, collected), whatever the allocator keeps."""
    import gc
    import threading
    import weakref

    from common.config import load_config
    from flows import stages
    from flows.demo import with_demo_data
    from flows.sweep import trial_config
    from gptbert.model import GPTBERT
    from gptbert.optim import LAMB
    from gptbert.trainer import Trainer

    built: list[tuple[str, weakref.ref]] = []
    originals = {cls: cls.__init__ for cls in (GPTBERT, LAMB, Trainer)}

    def tracking(cls):
        def init(self, *args, **kwargs):
            originals[cls](self, *args, **kwargs)
            built.append((cls.__name__, weakref.ref(self)))
        return init

    cfg = with_demo_data(load_config(preset="tiny", overrides=[
        f"workdir={tmp_path}", "train.steps=3", "train.checkpoint_every=0", "train.validate_every=0",
        "train.batch_tokens_start=512", "train.batch_tokens_end=512", "eval.max_pairs_per_paradigm=4",
        "eval.temperatures=[1.0]", "eval.milestones=none", "tracking.enabled=false"]))
    corpus = stages.clean(cfg)
    tokenizer = stages.train_tokenizer(cfg, corpus)
    shards = stages.shard(cfg, corpus, tokenizer)
    try:
        for cls in originals:
            cls.__init__ = tracking(cls)
        trial = trial_config(cfg, 0.5, 0)
        stages.evaluate(trial, stages.pretrain(trial, shards, tokenizer))
        gc.collect()
        assert {name for name, _ in built} == {"GPTBERT", "LAMB", "Trainer"}  # the trial built them here
        assert [name for name, ref in built if ref() is not None] == []
        assert not [t.name for t in threading.enumerate() if t.name.startswith("gptbert-data")]
    finally:
        for cls, init in originals.items():
            cls.__init__ = init
