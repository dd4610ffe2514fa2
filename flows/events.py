"""Stage events of a pipeline run, for whoever shows them (the CLI's console).

The flows call ``emit`` when a stage starts, finishes, is skipped or fails, and when pretraining
opens its progress file. Listeners run in the emitting thread (Prefect runs a flow's tasks in the
process that called the flow), must be quick, and never break the run: an error in a listener is
logged and dropped. A deployment on a worker has no listener and pays nothing.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

Listener = Callable[[str, dict[str, Any]], None]

_listeners: list[Listener] = []
_lock = threading.Lock()
log = logging.getLogger("gptbert.events")

# The kinds of event and the fields each carries.
KINDS = {
    "stage_started": ("stage",),
    "stage_finished": ("stage", "cached", "duration_s", "path"),
    "stage_skipped": ("stage", "reason"),
    "stage_failed": ("stage", "error"),
    "progress_file": ("stage", "path", "total_steps"),
}


def subscribe(listener: Listener) -> Callable[[], None]:
    """Call ``listener(kind, fields)`` for every event from now on; returns the unsubscribe call."""
    with _lock:
        _listeners.append(listener)

    def unsubscribe() -> None:
        with _lock:
            if listener in _listeners:
                _listeners.remove(listener)

    return unsubscribe


def emit(kind: str, **fields: Any) -> None:
    """Send one event to every listener (unknown kinds are a programming error)."""
    if kind not in KINDS:
        raise ValueError(f"unknown event kind {kind!r}")
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        try:
            listener(kind, fields)
        except Exception:  # noqa: BLE001  (showing progress must never fail a run)
            log.exception("event listener failed on %s", kind)


__all__ = ["KINDS", "emit", "subscribe"]
