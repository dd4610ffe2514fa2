"""Ray for a block of work (``ray_session``), and independent jobs as parallel Ray tasks (used to
evaluate word-milestone models side by side and to run a sweep's trials).

Ray hides the GPUs from a task that does not request them (``CUDA_VISIBLE_DEVICES`` is empty), so a
task that trains on CUDA must ask for its GPU: ``gpus_per_task`` decides from the task's device
setting and the cluster's GPUs, and refuses, in one line, what the cluster cannot give.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Callable, Iterator, Sequence

from common.config import ConfigError


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


def gpus_per_task(device: str, cluster_gpus: float, field: str = "train.device") -> int:
    """The GPUs a Ray task whose model runs on ``device`` (a ``train.device`` / ``eval.device``
    value) must request on a cluster with ``cluster_gpus`` GPUs: 1 for ``cuda``; for ``auto``, 1
    where the cluster has a GPU (Ray would hide it otherwise and the task would silently run on its
    CPU), else 0; 0 for ``cpu``. ``cuda`` on a cluster without a GPU, or ``cuda:N`` with N > 0 (a
    task sees its one GPU as ``cuda:0``), is a ``ConfigError`` naming ``field``."""
    if device == "cpu":
        return 0
    if device == "auto":
        return 1 if cluster_gpus >= 1 else 0
    index = re.fullmatch(r"cuda(?::(\d+))?", device)
    if index is None:
        raise ConfigError(field, f"unknown device {device!r} (expected auto, cpu, cuda or cuda:N)")
    if index.group(1) not in (None, "0"):
        raise ConfigError(field, f"{device}: a Ray task is given one GPU, which it sees as cuda:0; use cuda or auto")
    if cluster_gpus < 1:
        raise ConfigError(field, f"{device} asks each Ray task for a GPU, but the Ray cluster has "
                                 f"{cluster_gpus:g} GPUs; use auto or cpu, or a cluster with GPUs")
    return 1


def ray_map(fn: Callable[..., Any], calls: Sequence[tuple], *, num_cpus: float = 1, address: str | None = None,
            worker_niceness: int = 0, fresh_workers: bool = False, device: str = "cpu",
            device_field: str = "train.device") -> list:
    """``[fn(*args) for args in calls]``, each call a Ray task of ``num_cpus`` CPUs, in order, on
    the Ray of ``ray_session(address, worker_niceness=...)``. ``fn`` must be importable by the
    workers (a module-level function). ``fresh_workers``: every call in a new worker process (Ray's
    ``max_calls=1``), so a worker's memory does not carry from one call to the next. ``device``:
    where the tasks run their model; each task requests ``gpus_per_task(device, the cluster's GPUs)``
    GPUs (a refusal names ``device_field``), and with GPUs as many tasks run at once as the cluster
    has GPUs to give."""
    import ray

    with ray_session(address, worker_niceness=worker_niceness):
        num_gpus = gpus_per_task(device, ray.cluster_resources().get("GPU", 0.0), device_field)
        remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=1,
                            **({"max_calls": 1} if fresh_workers else {}))(fn)
        return ray.get([remote.remote(*args) for args in calls])


__all__ = ["gpus_per_task", "ray_map", "ray_session"]
