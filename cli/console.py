"""What the long-running commands show on the terminal: stages, one progress bar, warnings, summary.

Ray, DeepSpeed, Prefect and MLflow log a great deal, from this process and from the processes it
starts (Ray workers, the Prefect server), much of it meant for their developers. ``Console``
points file descriptors 1 and 2 at a log file in the run root for the duration of a command, so
everything those libraries and their subprocesses write lands there, and draws its own lines on
the terminal's original descriptors: the stage list (from ``flows.events``), a progress bar fed
by the trainer's progress file, and the warnings our own code logs. ``-v`` copies the log to the
terminal as it is written. The summary (or ``--json``) goes to the original stdout, so
``--json`` output is one JSON document and nothing else.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

# Our own packages: warnings logged by them (or through Prefect's run loggers from their files)
# are shown on the console; everything else stays in the log file.
_OWN_PACKAGES = ("cli", "common", "flows", "gptbert", "tokenization")
_OWN_CODE = tuple(str(Path(__file__).resolve().parents[1] / d) + os.sep for d in _OWN_PACKAGES)


def _is_own(record: logging.LogRecord) -> bool:
    if record.name.split(".", 1)[0] in _OWN_PACKAGES:
        return True
    return record.name.startswith("prefect.") and str(record.pathname).startswith(_OWN_CODE)
STAGE_LABELS = {"clean": "clean corpus", "tokenizer": "train tokenizer", "shard": "shard tokens",
                "pretrain": "pretrain", "export": "export (transformers)", "evaluate": "evaluate",
                "register": "register model"}


def log_path_for(workdir: str | Path, command: str) -> Path:
    """A new log file path for ``command`` under ``<workdir>/logs`` (named by the start time)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = Path(workdir).resolve() / "logs"
    path = folder / f"{command}-{stamp}.log"
    n = 1
    while path.exists():
        n += 1
        path = folder / f"{command}-{stamp}-{n}.log"
    return path


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _fmt_rate(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1000:.1f}k" if x >= 10_000 else f"{x:,.0f}"


def progress_line(doc: dict[str, Any], rate_steps_s: float | None, width: int = 20) -> str:
    """One line for a progress document: bar, step, losses, tokens/s, words/s and ETA."""
    step, total = int(doc.get("step", 0)), max(1, int(doc.get("total_steps", 1)))
    filled = min(width, int(width * step / total))
    bar = "#" * filled + "-" * (width - filled)
    parts = [f"[{bar}] step {step}/{total}"]
    if isinstance(doc.get("loss"), (int, float)):
        loss = f"loss {doc['loss']:.3f}"
        split = [f"{name} {doc[key]:.3f}" for key, name in (("loss_masked", "masked"), ("loss_causal", "causal"))
                 if isinstance(doc.get(key), (int, float)) and doc[key] > 0]
        parts.append(loss + (f" ({', '.join(split)})" if split else ""))
    parts.append(f"{_fmt_rate(doc.get('tokens_per_s'))} tok/s")
    if isinstance(doc.get("words_per_s"), (int, float)):
        parts.append(f"{_fmt_rate(doc['words_per_s'])} words/s")
    if rate_steps_s and step < total:
        parts.append(f"ETA {_fmt_duration((total - step) / rate_steps_s)}")
    return "  ".join(parts)


class _OwnWarnings(logging.Handler):
    """Passes WARNING and above logged by our own code (not by libraries) to the console."""

    def __init__(self, console: "Console"):
        super().__init__(logging.WARNING)
        self.console = console
        self._seen: set[int] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if not _is_own(record) or id(record) in self._seen:
            return
        self._seen.add(id(record))
        try:
            self.console.warn(record.getMessage())
        except Exception:  # noqa: BLE001
            self.handleError(record)


class Console:
    """Context manager for one command: library output to ``log_path``, our lines to the terminal.

    ``verbose`` also copies the library output to the terminal. ``ui`` and ``out`` are the streams
    for the stage lines and for the summary; by default the terminal's stderr and stdout as they
    were before the redirection.
    """

    def __init__(self, log_path: str | Path, verbose: bool = False, title: str | None = None):
        self.log_path = Path(log_path)
        self.verbose = verbose
        self.title = title
        self.ui: TextIO = sys.stderr
        self.out: TextIO = sys.stdout
        self._saved: dict[int, int] = {}
        self._tee: threading.Thread | None = None
        self._pipe_w: int | None = None
        self._log_file = None
        self._unsubscribe = None
        self._handler: _OwnWarnings | None = None
        self._root_handler: logging.Handler | None = None
        self._sys_streams: tuple[TextIO, TextIO] | None = None
        self._loggers: list[logging.Logger] = []
        self._lock = threading.Lock()
        self._bar_shown = False
        self._stages: dict[str, float] = {}
        self._progress: dict[str, Any] | None = None  # {"path", "stop", "thread"}
        self.tty = False

    # -- redirection -------------------------------------------------------------------------
    def __enter__(self) -> "Console":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        self._saved = {fd: os.dup(fd) for fd in (1, 2)}
        self.out = io.TextIOWrapper(os.fdopen(os.dup(self._saved[1]), "wb", buffering=0), write_through=True)
        self.ui = io.TextIOWrapper(os.fdopen(os.dup(self._saved[2]), "wb", buffering=0), write_through=True)
        self.tty = self.ui.isatty()
        self._log_file = open(self.log_path, "ab", buffering=0)
        if self.verbose:
            read_fd, self._pipe_w = os.pipe()
            target = self._pipe_w
            self._tee = threading.Thread(target=self._copy, args=(read_fd,), name="gptbert-log-tee", daemon=True)
            self._tee.start()
        else:
            target = self._log_file.fileno()
        os.dup2(target, 1)
        os.dup2(target, 2)
        # Python-level writes follow the descriptors even where sys.stdout was replaced (pytest, IDEs).
        self._sys_streams = (sys.stdout, sys.stderr)
        sys.stdout = open(1, "w", buffering=1, closefd=False, encoding="utf-8", errors="replace")
        sys.stderr = open(2, "w", buffering=1, closefd=False, encoding="utf-8", errors="replace")
        self._handler = _OwnWarnings(self)
        root = logging.getLogger()
        if not root.handlers:  # else the libraries' warnings would reach no file at all
            self._root_handler = logging.StreamHandler(sys.stderr)
            self._root_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            root.addHandler(self._root_handler)
        for logger in (root, logging.getLogger("prefect")):
            logger.addHandler(self._handler)
            self._loggers.append(logger)
        from flows import events

        self._unsubscribe = events.subscribe(self.event)
        if self.title:
            self.line(self.title)
        self.line(f"  logs: {self.log_path}" + ("" if self.verbose else "  (-v shows them here)"))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop_progress()
        if self._unsubscribe is not None:
            self._unsubscribe()
        for logger in self._loggers:
            logger.removeHandler(self._handler)
        if self._root_handler is not None:
            logging.getLogger().removeHandler(self._root_handler)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        if self._sys_streams is not None:
            sys.stdout, sys.stderr = self._sys_streams
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)
            os.close(saved)
        if self._pipe_w is not None:
            os.close(self._pipe_w)  # the tee ends once the subprocesses that inherited it are gone
            if self._tee is not None:
                self._tee.join(timeout=2)
        if exc is not None and not isinstance(exc, KeyboardInterrupt):
            self.line(f"  failed; the libraries' output is in {self.log_path}")
        for stream in (self.out, self.ui):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass

    def _copy(self, read_fd: int) -> None:
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            while True:
                chunk = pipe.read(65536)
                if not chunk:
                    return
                self._log_file.write(chunk)
                with self._lock:
                    self._clear_bar()
                    self.ui.buffer.write(chunk) if hasattr(self.ui, "buffer") else self.ui.write(chunk.decode())

    # -- lines -------------------------------------------------------------------------------
    def _clear_bar(self) -> None:
        if self._bar_shown:
            self.ui.write("\r\033[K")
            self._bar_shown = False

    def line(self, text: str) -> None:
        """Print a line on the terminal (above the progress bar)."""
        with self._lock:
            self._clear_bar()
            self.ui.write(text + "\n")
            self.ui.flush()

    def warn(self, message: str) -> None:
        """Show a warning our own code logged."""
        self.line(f"  warning: {message}")

    def _bar(self, text: str) -> None:
        with self._lock:
            if self.tty:
                self.ui.write("\r\033[K" + text[: max(20, self._width() - 1)])
                self._bar_shown = True
            else:
                self.ui.write(text + "\n")
            self.ui.flush()

    def _width(self) -> int:
        try:
            return os.get_terminal_size(self.ui.fileno()).columns
        except (OSError, ValueError):
            return 100

    # -- events ------------------------------------------------------------------------------
    def event(self, kind: str, fields: dict[str, Any]) -> None:
        """Show one ``flows.events`` event (also called directly by commands without a flow)."""
        stage = fields.get("stage", "")
        label = f"  {STAGE_LABELS.get(stage, stage):<22}"
        if kind == "stage_started":
            self._stages[stage] = time.time()
            if self.tty:
                self._bar(f"{label} running")
            else:
                self.line(f"{label} running")
        elif kind == "stage_finished":
            if stage == "pretrain":
                self._stop_progress(final=True)
            took = time.time() - self._stages.pop(stage, time.time())
            if fields.get("cached"):
                status = "cached" + (f" ({fields['path']})" if stage == "register" else "")
            else:
                status = f"done in {_fmt_duration(took)}" + (f" ({fields['path']})" if stage == "register" else "")
            self.line(f"{label} {status}")
        elif kind == "stage_skipped":
            self.line(f"{label} skipped: {fields.get('reason')}")
        elif kind == "stage_failed":
            if stage == "pretrain":
                self._stop_progress()
            self.line(f"{label} FAILED: {fields.get('error')}")
        elif kind == "progress_file":
            self._start_progress(fields["path"], int(fields.get("total_steps") or 0))

    # -- the progress bar --------------------------------------------------------------------
    def _start_progress(self, path: str, total: int) -> None:
        self._stop_progress()
        stop = threading.Event()
        state: dict[str, Any] = {"path": path, "stop": stop, "last": None}
        thread = threading.Thread(target=self._watch, args=(state, total), name="gptbert-progress", daemon=True)
        state["thread"] = thread
        self._progress = state
        thread.start()

    def _watch(self, state: dict[str, Any], total: int) -> None:
        from gptbert.metrics import read_progress

        first: tuple[int, float] | None = None
        printed_decile = -1
        while not state["stop"].wait(0.5 if self.tty else 2.0):
            doc = read_progress(state["path"])
            if doc is None or doc == state["last"]:
                continue
            state["last"] = doc
            step, now = int(doc["step"]), float(doc.get("time", time.time()))
            if first is None or step < first[0]:
                first = (step, now)
            rate = (step - first[0]) / (now - first[1]) if now > first[1] and step > first[0] else None
            text = "  " + progress_line(doc, rate)
            decile = 10 * step // max(1, int(doc.get("total_steps") or total or 1))
            if self.tty:
                self._bar(text)
            elif decile > printed_decile:  # a log or pipe gets at most ~10 progress lines
                printed_decile = decile
                self._bar(text)
                state["printed"] = doc

    def _stop_progress(self, final: bool = False) -> None:
        state, self._progress = self._progress, None
        if state is None:
            return
        state["stop"].set()
        state["thread"].join(timeout=5)
        if final:
            from gptbert.metrics import read_progress

            doc = read_progress(state["path"])
            if doc is not None and (self.tty or doc != state.get("printed")):
                self.line("  " + progress_line(doc, None))  # the final step stays on screen
        else:
            with self._lock:
                self._clear_bar()


__all__ = ["Console", "STAGE_LABELS", "log_path_for", "progress_line"]
