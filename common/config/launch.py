"""LaunchConfig: how pretraining is run (single process, or Ray Train + DeepSpeed).

``backend`` names a launcher of ``gptbert.distributed``: ``local`` runs the plain single-process
loop, ``ray`` the same loop inside Ray Train workers, each wrapping the model with
``deepspeed.initialize``. How a run is launched never changes what it trains: every training
setting is in ``train``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from .base import ConfigBase, check


@dataclass
class LaunchConfig(ConfigBase):
    """Configures how the pretrain stage is launched: locally, or as Ray Train workers with DeepSpeed."""

    # A launcher registered in gptbert.distributed (checked when pretraining starts).
    backend: str = "local"
    # Ray Train workers (one DeepSpeed rank each) and what each one reserves. Where they compute is
    # train.device: on CUDA (or auto on a cluster with GPUs) each worker takes one GPU, and 0 workers
    # means one per GPU in the cluster (one worker on CPU).
    num_workers: int = 0
    cpus_per_worker: int = 1
    # OMP/torch threads per worker; 0 = the node's cores divided by the workers (at least 1).
    threads_per_worker: int = 0
    # DeepSpeed: ZeRO stage 0..3 (gptbert/distributed/configs/zero{N}.json is the base config), optimizer
    # state offload to CPU memory (ZeRO 1-3 only).
    # Precision is train.precision ("auto": bf16 on CUDA with bf16 or AVX-512-BF16/AMX CPUs).
    zero_stage: int = 1
    offload: bool = False
    # A DeepSpeed JSON to use instead of gptbert/distributed/configs/zero<stage>.json ("auto" values are filled
    # from the typed config; explicit values must agree with it).
    deepspeed_config: Optional[str] = None
    # Cluster: None = RAY_ADDRESS from the environment, else a local Ray started for the run.
    ray_address: Optional[str] = None
    # Where Ray Train persists checkpoints and results. None = <out_dir>/ray (one machine only);
    # on a cluster this must be shared storage (an absolute path on every node, or a URI).
    storage_path: Optional[str] = None
    # Run name inside storage_path; rerunning with the same name resumes. None = from out_dir.
    run_name: Optional[str] = None
    # Worker-group restarts after a failure (each resumes from the latest checkpoint); -1 = no limit.
    max_failures: int = 0
    # Niceness of the workers of a Ray that gptbert starts itself (ray_address unset). Ray's own
    # default, 15, lets any other busy process on the node starve training (measured: a 2-worker
    # test 30x slower beside two busy loops); a cluster keeps its own setting (start it with
    # RAY_worker_niceness=0, as infra/ray/start_local_cluster.sh does).
    worker_niceness: int = 0
    # How shards on an object store are read (common/storage.py): "cache" = downloaded once per
    # node into the local cache (GPTBERT_CACHE_DIR, bounded by GPTBERT_CACHE_MAX_GB), checked, then
    # memory-mapped; "memory" = read into memory with range requests, checked, no local disk.
    remote_shards: Literal["cache", "memory"] = "cache"

    def validate(self) -> None:
        """Reject invalid values with a ConfigError naming the field."""
        check(bool(self.backend.strip()), "backend", "must name a launcher (local, ray, ...)")
        check(self.num_workers >= 0, "num_workers", f"must be >= 0 (0 = one per GPU), got {self.num_workers}")
        check(self.cpus_per_worker >= 1, "cpus_per_worker", f"must be >= 1, got {self.cpus_per_worker}")
        check(self.threads_per_worker >= 0, "threads_per_worker", "must be >= 0 (0 = automatic)")
        check(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        check(not (self.offload and self.zero_stage == 0), "offload",
              "optimizer offload needs zero_stage 1, 2 or 3")
        check(self.max_failures >= -1, "max_failures", "must be >= 0, or -1 for unlimited retries")
        check(0 <= self.worker_niceness <= 19, "worker_niceness",
              f"must be 0..19 (a negative niceness needs root), got {self.worker_niceness}")
        if self.run_name is not None:
            check(bool(self.run_name) and "/" not in self.run_name and self.run_name not in (".", ".."),
                  "run_name", f"must be a plain folder name, got {self.run_name!r}")
