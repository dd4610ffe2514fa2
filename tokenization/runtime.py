"""How the data stages run: progress bars, the tokenizers library's thread pool, and native calls
that Ctrl-C can interrupt."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
POLL_SECONDS = 0.1  # how often a waiting main thread gets the chance to see Ctrl-C


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress(*, enabled: bool = True, **kwargs):
    """A tqdm bar (to stderr) when enabled, else a no-op with the same update/close methods."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(**kwargs)


@contextlib.contextmanager
def rayon_threads(num_threads: int) -> Iterator[None]:
    """Set RAYON_NUM_THREADS for the tokenizers calls inside (0 = leave the default).

    The rayon pool is sized when tokenizers first runs in parallel in this process, so this only
    takes effect if nothing in the process has used it yet.
    """
    if num_threads <= 0:
        yield
        return
    old = os.environ.get("RAYON_NUM_THREADS")
    os.environ["RAYON_NUM_THREADS"] = str(num_threads)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RAYON_NUM_THREADS", None)
        else:
            os.environ["RAYON_NUM_THREADS"] = old


def interruptible(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` in a daemon thread, waited for in short polls: Ctrl-C reaches the main
    thread within ~0.1 s even while ``fn`` runs native code that never returns to Python (the
    tokenizers library's training). An interrupted call is abandoned and ends with the process."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001  (handed to the caller's thread)
            result["error"] = exc

    thread = threading.Thread(target=target, name="gptbert-native", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(POLL_SECONDS)
    if "error" in result:
        raise result["error"]
    return result["value"]


def background_map(fn: Callable[[Any], T], items: Iterable[Any], workers: int = 1) -> Iterator[tuple[Any, T]]:
    """``(item, fn(item))`` for each item, in order, computed ahead in ``workers`` daemon threads
    (the next batches are encoded while this one is written) and waited for in short polls, so
    Ctrl-C stops the caller within ~0.1 s. With ``workers`` > 1 several calls run at once: a native
    thread pool (the tokenizers library's) then always has a call to work on, also while a thread
    turns its result into arrays. Leaving the loop early stops the threads after their current item."""
    done, stop = object(), threading.Event()
    inboxes = [queue.Queue() for _ in range(workers)]  # item i goes to thread i % workers
    outboxes = [queue.Queue(maxsize=1) for _ in range(workers)]

    def worker(inbox: queue.Queue, outbox: queue.Queue) -> None:
        while (item := inbox.get()) is not done:
            try:
                result: Any = (item, fn(item))
            except BaseException as exc:  # noqa: BLE001  (re-raised in the caller's thread)
                result = exc
            while not stop.is_set():
                try:
                    outbox.put(result, timeout=POLL_SECONDS)
                    break
                except queue.Full:
                    continue
            if stop.is_set() or isinstance(result, BaseException):
                return

    for k in range(workers):
        threading.Thread(target=worker, args=(inboxes[k], outboxes[k]), name=f"gptbert-background-{k}",
                         daemon=True).start()
    source = iter(items)

    def feed(k: int) -> bool:
        item = next(source, done)
        inboxes[k].put(item)
        return item is not done

    try:
        busy = [feed(k) for k in range(workers)]
        k = 0
        while busy[k]:
            try:
                got = outboxes[k].get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            if isinstance(got, BaseException):
                raise got
            busy[k] = feed(k)  # the thread's next item first, then the caller works on this one
            yield got
            k = (k + 1) % workers
    finally:
        stop.set()
        for box in inboxes:
            box.put(done)
