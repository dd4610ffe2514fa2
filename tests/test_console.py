"""The CLI console: library output goes to the log file, our lines to the terminal, JSON alone on stdout."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

from cli.console import Console, log_path_for, progress_line
from flows import events
from gptbert.metrics import Chain, ProgressFile, read_progress


def test_progress_line_shows_step_losses_rates_and_eta():
    doc = {"step": 50, "total_steps": 200, "loss": 4.1234, "loss_masked": 4.3, "loss_causal": 3.9,
           "tokens_per_s": 23456.0, "words_per_s": 1700.4}
    line = progress_line(doc, rate_steps_s=2.0, width=10)
    assert line == ("[##--------] step 50/200  loss 4.123 (masked 4.300, causal 3.900)  23.5k tok/s  "
                    "1,700 words/s  ETA 1:15")
    # No causal examples (fraction 0): no causal part; the last step: no ETA.
    done = progress_line({"step": 200, "total_steps": 200, "loss": 2.0, "loss_masked": 2.0, "loss_causal": 0.0,
                          "tokens_per_s": 100.0}, rate_steps_s=2.0, width=4)
    assert done == "[####] step 200/200  loss 2.000 (masked 2.000)  100 tok/s"


def test_progress_file_keeps_the_latest_step(tmp_path):
    seen = []
    callback = Chain(ProgressFile(tmp_path / "progress.json", total_steps=3, min_interval_s=0), lambda m, s: seen.append(s), None)
    for step in (1, 2):
        callback({"loss": 5.0 - step, "tokens_per_s": 10.0, "grad_norm": None, "note": "x"}, step)
    doc = read_progress(tmp_path / "progress.json")
    assert seen == [1, 2]
    assert {k: doc[k] for k in ("step", "total_steps", "loss", "tokens_per_s")} == \
        {"step": 2, "total_steps": 3, "loss": 3.0, "tokens_per_s": 10.0}
    assert "grad_norm" not in doc and "note" not in doc
    assert read_progress(tmp_path / "missing.json") is None
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"]  # no temporary file left
    # On the training step's path it writes at most every 0.25 s, and always at the last step.
    throttled = ProgressFile(tmp_path / "throttled.json", total_steps=5)
    throttled({"loss": 1.0}, 1)
    throttled({"loss": 0.5}, 2)
    assert read_progress(tmp_path / "throttled.json")["step"] == 1
    throttled({"loss": 0.1}, 5)
    assert read_progress(tmp_path / "throttled.json")["step"] == 5


def test_log_path_is_new_under_the_run_root(tmp_path):
    first = log_path_for(tmp_path, "demo")
    first.parent.mkdir()
    first.write_text("")
    second = log_path_for(tmp_path, "demo")
    assert first.parent == tmp_path / "logs" and first.name.startswith("demo-") and second != first


def test_library_output_goes_to_the_log_and_our_lines_to_the_terminal(tmp_path, capfd):
    log = tmp_path / "logs" / "run.log"
    capfd.readouterr()
    with Console(log, title="gptbert test: run root X") as console:
        print("a library print")
        sys.stderr.write("a library warning on stderr\n")
        subprocess.run([sys.executable, "-c", "import sys; print('from a subprocess'); "
                        "print('subprocess stderr', file=sys.stderr)"], check=True)
        logging.getLogger("some.library").warning("a library's own warning")
        logging.getLogger("gptbert.test").warning("the corpus has 3 empty files")  # logged by our code
        events.emit("stage_started", stage="clean")
        events.emit("stage_finished", stage="clean", cached=False, duration_s=1.0, path="/x")
        events.emit("stage_finished", stage="tokenizer", cached=True, duration_s=0.0, path="/y")
        events.emit("stage_skipped", stage="export", reason="transformers is not installed")
        print(json.dumps({"answer": 42}), file=console.out)
    out, err = capfd.readouterr()
    assert json.loads(out) == {"answer": 42}  # stdout: only what the command printed for the user
    text = log.read_text()
    for line in ("a library print", "a library warning on stderr", "from a subprocess", "subprocess stderr"):
        assert line in text and line not in err
    assert "a library's own warning" not in err  # (pytest's log capture holds it here)
    lines = err.splitlines()
    assert lines[0] == "gptbert test: run root X" and str(log) in lines[1]
    assert "  warning: the corpus has 3 empty files" in lines
    assert "  clean corpus           running" in lines
    assert any(line.startswith("  clean corpus           done in 0:0") for line in lines)
    assert "  train tokenizer        cached" in lines
    assert "  export (transformers)  skipped: transformers is not installed" in lines
    # After the block everything is back where it was, and no listener is left behind.
    print("after")
    assert capfd.readouterr().out == "after\n"
    assert events._listeners == []


def test_progress_from_another_process_and_a_failure(tmp_path, capfd):
    """The bar follows the progress file rank 0 writes (here: a subprocess); a non-terminal gets at
    most one line per tenth of the run, and the final step."""
    progress = tmp_path / "progress.json"
    writer = ("import sys, time; sys.path.insert(0, %r)\n"
              "from gptbert.metrics import ProgressFile\n"
              "p = ProgressFile(%r, 20)\n"
              "for step in range(1, 21):\n"
              "    p({'loss': 8.0 - step * 0.1, 'tokens_per_s': 1000.0}, step); time.sleep(0.15)\n")
    import gptbert

    root = str(gptbert.__file__).rsplit("/gptbert/", 1)[0]
    capfd.readouterr()
    try:
        with Console(tmp_path / "run.log") as console:
            console.event("progress_file", {"stage": "pretrain", "path": str(progress), "total_steps": 20})
            console.event("stage_started", {"stage": "pretrain"})
            subprocess.run([sys.executable, "-c", writer % (root, str(progress))], check=True)
            time.sleep(2.5)  # the watcher polls every 2 s when not on a terminal
            console.event("stage_finished", {"stage": "pretrain", "cached": False, "path": str(tmp_path)})
            console.event("stage_started", {"stage": "evaluate"})
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    err = capfd.readouterr().err
    bars = [line for line in err.splitlines() if "step " in line and "/20" in line]
    assert 1 <= len(bars) <= 11
    assert bars[-1].startswith("  [####################] step 20/20  loss 6.000")
    assert "  pretrain               running" in err and "pretrain               done in" in err
    assert f"failed; the libraries' output is in {tmp_path / 'run.log'}" in err
