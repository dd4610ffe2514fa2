"""Independent jobs as parallel Ray tasks (used to evaluate word-milestone models side by side)."""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence


def ray_map(fn: Callable[..., Any], calls: Sequence[tuple], *, num_cpus: float = 1, address: str | None = None,
            worker_niceness: int = 0, fresh_workers: bool = False) -> list:
    """``[fn(*args) for args in calls]``, each call a Ray task of ``num_cpus`` CPUs, in order.

    Attaches to ``address`` (or ``RAY_ADDRESS``) when given, else starts a local Ray for the
    duration of the call, its workers at ``worker_niceness`` (Ray's default, 15, would let any
    other busy process starve them). ``fn`` must be importable by the workers (a module-level
    function). ``fresh_workers``: every call in a new worker process (Ray's ``max_calls=1``), so a
    worker's memory does not carry from one call to the next."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    started = False
    if not ray.is_initialized():
        if address is not None:
            ray.init(address=address)
        else:
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False,
                     _system_config={"worker_niceness": worker_niceness})
        started = True
    try:
        remote = ray.remote(num_cpus=num_cpus, max_retries=1, **({"max_calls": 1} if fresh_workers else {}))(fn)
        return ray.get([remote.remote(*args) for args in calls])
    finally:
        if started:
            ray.shutdown()


__all__ = ["ray_map"]
