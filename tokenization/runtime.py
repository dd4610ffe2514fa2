"""How the data stages run: progress bars and the tokenizers library's thread pool."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


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
