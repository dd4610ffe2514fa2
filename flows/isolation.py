"""A stage's work in a fresh process, so that all of its memory goes back when it ends.

A ratio sweep trains and evaluates one model after another. In one process, each trial left the
next a fuller heap (the allocator's free lists, oneDNN's kernel caches, the compiled kernels), and
the sweep's peak grew with its number of trials (issue 30: about 8% from one trial to three, after
the kernel caches were bounded). ``in_fresh_process(fn, *args, **kwargs)`` runs ``fn`` in a child
Python process (``python -m flows.isolation``, given the call through a pipe: unlike a
multiprocessing child it runs nothing of the caller's ``__main__`` again) and returns its result
here, or raises its exception here (the same type and message where it pickles, else a
RuntimeError with its one-line message). What the child emits on ``flows.events``
and logs through ``logging`` is replayed in this process as it happens, so the console, the log
file and the Prefect run logger see the stage as if it had run here.

Ctrl-C reaches both processes: the child stops as it would in-process (the checkpoints written so
far are kept) and the KeyboardInterrupt is raised here once it has ended. A child whose parent dies
is interrupted too (and ended 10 s later if it has not stopped). ``fn`` must be importable by the
child (a module-level function of a module that does not start work on import), and its arguments
and result picklable. The child starts from an empty interpreter: about 3 s of imports on a 2-core
machine, and a first compile of the CPU feed-forward kernel (taken from inductor's disk cache after
the first trial).
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

from common.errors import error_line

from . import events

# How long a child that was interrupted may take to stop before it is ended: Ctrl-C stops a training
# step within 2 s; unwinding (closing files, shutting a Ray run down) takes a few more.
STOP_GRACE_S = 30.0


class InParent:
    """Marks an argument of ``in_fresh_process`` (a callback) that runs in the calling process: the
    child gets a stand-in that sends every call of it, and of its public methods, here, where the
    calls run in order while the child goes on (nothing is returned to the child). A step-metrics
    logger stays with the tracking client it needs, which the child then never imports."""

    def __init__(self, target: Callable[..., Any]):
        self.target = target


class _StandIn:
    """The child's side of an ``InParent`` argument."""

    def __init__(self, index: int, methods: tuple[str, ...]):
        self.index, self.methods = index, methods

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        _to_parent(("call", (self.index, None, args, kwargs)))

    def __getattr__(self, name: str):
        if name not in self.__dict__.get("methods", ()):
            raise AttributeError(name)
        return lambda *args, **kwargs: _to_parent(("call", (self.index, name, args, kwargs)))


def _stand_ins(values, targets: list) -> Any:
    def swap(value):
        if not isinstance(value, InParent):
            return value
        targets.append(value.target)
        methods = tuple(n for n in dir(value.target) if not n.startswith("_") and callable(getattr(value.target, n)))
        return _StandIn(len(targets) - 1, methods)

    if isinstance(values, dict):
        return {k: swap(v) for k, v in values.items()}
    return tuple(swap(v) for v in values)


def in_fresh_process(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a new Python process (see the module docstring); arguments wrapped
    in ``InParent`` run here."""
    targets: list = []
    call = (logging.getLogger().getEffectiveLevel(), fn, _stand_ins(args, targets), _stand_ins(kwargs, targets))
    # The child is `python -m flows.isolation`, not a multiprocessing child: nothing of this process's
    # __main__ runs again there (a script without a main guard would start its work a second time).
    calls_r, calls_w = os.pipe()
    results_r, results_w = os.pipe()
    here = str(Path(__file__).resolve().parents[1])  # where this flows package is, whatever sys.path says
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    child = subprocess.Popen([sys.executable, "-m", "flows.isolation", str(calls_r), str(results_w)],
                             pass_fds=(calls_r, results_w), env=env)
    os.close(calls_r)
    os.close(results_w)
    receive = Connection(results_r, writable=False)
    try:
        try:
            with Connection(calls_w, readable=False) as to_child:
                to_child.send(list(sys.path))  # first, so that the call unpickles with this process's imports
                to_child.send(call)
        except BrokenPipeError:  # the child is gone already: its exit code says more, below
            pass
        while True:
            try:
                kind, payload = receive.recv()
            except EOFError:
                child.wait()
                raise RuntimeError(f"the process running {getattr(fn, '__qualname__', fn)} ended without a "
                                   f"result (exit code {child.returncode})") from None
            if kind == "call":
                index, method, call_args, call_kwargs = payload
                target = targets[index] if method is None else getattr(targets[index], method)
                target(*call_args, **call_kwargs)
            elif kind == "event":
                events.emit(payload[0], **payload[1])
            elif kind == "log":
                record = logging.makeLogRecord(payload)
                logging.getLogger(record.name).handle(record)
            elif kind == "result":
                child.wait()
                return payload
            else:  # "error"
                child.wait()
                raise payload
    except KeyboardInterrupt:
        _stop(child)
        raise
    finally:
        receive.close()
        if child.poll() is None:  # an error here (an event listener, a pickle): the child is not left behind
            _stop(child)


def _stop(child: subprocess.Popen) -> None:
    """Let a child that got the same Ctrl-C stop on its own; interrupt it if it did not (only this
    process was signalled); end it last."""
    for signal_to_send, wait_s in ((None, 5.0), (signal.SIGINT, STOP_GRACE_S), (signal.SIGTERM, 10.0)):
        if signal_to_send is not None:
            child.send_signal(signal_to_send)
        try:
            child.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
    child.kill()
    child.wait()


# ----------------------------------------------------------------------------- the child's side

class _Forward(logging.Handler):
    """Sends each log record to the parent, its message formatted (arguments may not pickle)."""

    def __init__(self, send):
        super().__init__()
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = dict(record.__dict__)
            data["msg"], data["args"] = record.getMessage(), None
            if record.exc_info:
                data["exc_text"] = logging.Formatter().formatException(record.exc_info)
            data["exc_info"] = None
            self.send(("log", data))
        except Exception:  # noqa: BLE001  (a log line must never fail the stage)
            pass


_sender: Callable[[tuple], None] | None = None  # set in the child by child_main


def _to_parent(message: tuple) -> None:
    if _sender is None:
        raise RuntimeError("an InParent callback was called outside the process in_fresh_process started")
    _sender(message)


def child_main(calls_fd: int, results_fd: int) -> None:
    """The child's entry point (``python -m flows.isolation CALLS_FD RESULTS_FD``): read the call, run it, send events, log records, calls of ``InParent`` arguments and
    last the result or the error to the parent."""
    global _sender
    with Connection(calls_fd, writable=False) as calls:
        sys.path[:] = calls.recv()
        level, fn, args, kwargs = calls.recv()
    conn = Connection(results_fd, readable=False)
    lock = threading.Lock()  # the trainer's data thread may log while the main thread emits

    def send(message) -> None:
        with lock:
            try:
                conn.send(message)
            except BrokenPipeError:  # the parent is gone; the watch below stops this process
                pass

    _sender = send
    _watch_parent()
    root = logging.getLogger()
    root.setLevel(level)
    root.addHandler(_Forward(send))
    events.subscribe(lambda kind, fields: send(("event", (kind, fields))))
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001  (KeyboardInterrupt too: the parent raises it)
        if not isinstance(exc, KeyboardInterrupt):  # what --debug shows in the parent
            exc.add_note("raised in a fresh process (flows.isolation):\n" + "".join(traceback.format_exception(exc)))
        send(("error", _picklable(exc)))
    else:
        send(("result", result))
    finally:
        conn.close()


def _picklable(exc: BaseException) -> BaseException:
    try:
        return pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001  (an exception class whose arguments do not round-trip)
        return RuntimeError(error_line(exc))


def _watch_parent() -> None:
    """Interrupt this process when the parent is gone (killed: nothing waits for the result)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # wakes a blocking call too
        threading.Timer(10.0, os._exit, args=(1,)).start()

    threading.Thread(target=watch, name="gptbert-parent-watch", daemon=True).start()


__all__ = ["STOP_GRACE_S", "InParent", "child_main", "in_fresh_process"]


if __name__ == "__main__":  # the child (``in_fresh_process`` starts it), in the importable module's globals
    from flows import isolation

    isolation.child_main(int(sys.argv[1]), int(sys.argv[2]))
