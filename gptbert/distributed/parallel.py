"""Ray for a block of work (``ray_session``), and independent jobs as parallel Ray tasks (used to
evaluate word-milestone models side by side)."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Sequence


@contextlib.contextmanager
def ray_session(address: str | None = None, *, worker_niceness: int = 0) -> Iterator[None]:
    """Ray for the duration of the block: the one this process already uses, else the cluster at
    ``address`` (or ``RAY_ADDRESS``), else a local Ray of this machine's CPUs, its workers at
    ``worker_niceness`` (Ray's default, 15, would let any other busy process starve them); what
    was started here is shut down afterwards."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        yield
        return
    if address is not None:
        ray.init(address=address)
    else:
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False,
                 _system_config={"worker_niceness": worker_niceness})
    try:
        yield
    finally:
        ray.shutdown()


def ray_map(fn: Callable[..., Any], calls: Sequence[tuple], *, num_cpus: float = 1, address: str | None = None,
            worker_niceness: int = 0, fresh_workers: bool = False) -> list:
    """``[fn(*args) for args in calls]``, each call a Ray task of ``num_cpus`` CPUs, in order, on
    the Ray of ``ray_session(address, worker_niceness=...)``. ``fn`` must be importable by the
    workers (a module-level function). ``fresh_workers``: every call in a new worker process (Ray's
    ``max_calls=1``), so a worker's memory does not carry from one call to the next."""
    import ray

    with ray_session(address, worker_niceness=worker_niceness):
        remote = ray.remote(num_cpus=num_cpus, max_retries=1, **({"max_calls": 1} if fresh_workers else {}))(fn)
        return ray.get([remote.remote(*args) for args in calls])


__all__ = ["ray_map", "ray_session"]
