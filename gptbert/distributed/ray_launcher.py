"""The Ray launcher: the trainer's loop inside Ray Train workers, each a DeepSpeed rank.

``pretrain_ray(cfg, data, out_dir, ...)`` starts (or attaches to) Ray and runs a ``TorchTrainer``
with ``launch.num_workers`` workers. In every worker it builds the DeepSpeed backend
(``deepspeed_backend.py``) and runs ``gptbert.trainer.Trainer`` unchanged: every rank plans the
same global batch from document lengths and reads only its own examples from the memory-mapped
shards, so 1 and N workers train the same objective.

Checkpoints: every rank writes its DeepSpeed shard and RNG into a node-local folder (the trainer's
``save_checkpoint``), which is then handed to ``ray.train.report``; Ray merges all ranks' files
into ``<storage_path>/<run_name>/step-N``. A restarted worker group (``FailureConfig``) or a
rerun with the same run name resumes from the latest one. Rank 0 writes the final model folder
(EMA weights) into the last checkpoint, and the driver installs it as ``<out_dir>/model`` and
writes the stage record.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from common import storage
from common.artifacts import check_outside_inputs, remove_stale_siblings, replace_dir, temporary_sibling
from common.config import ConfigError, LaunchConfig, PipelineConfig, from_dict, to_dict
from common.config.base import check_device, replace
from ..device import DeviceError, resolve_device, wants_cuda
from ..optim import AUTO_PRECISION_ENV

CHECKPOINT_PREFIX = "step-"


def resolve_ray_address(launch_cfg: LaunchConfig) -> str | None:
    """``launch.ray_address`` if set, else ``RAY_ADDRESS`` from the environment, else None (local)."""
    return launch_cfg.ray_address or os.environ.get("RAY_ADDRESS") or None


def check_storage_path(storage_path: str | None, out_dir: str | Path, cluster: bool) -> str:
    """Where Ray Train persists checkpoints: a URI (``s3://``, ``gs://``, ...) or an absolute path.

    On a cluster the workers of other nodes write there too, so it must be shared storage: it must
    be given explicitly, and a local path must already exist (an NFS mount, not a folder this
    driver would create on its own disk). Locally it defaults to ``<out_dir>/ray``.
    """
    field = "launch.storage_path"
    if storage_path is None:
        if cluster:
            raise ConfigError(field, "is required when attaching to a Ray cluster (launch.ray_address or "
                                     "RAY_ADDRESS): shared storage that every node can reach, e.g. "
                                     "an NFS path mounted on all nodes or an s3:// / gs:// URI")
        path = (Path(out_dir) / "ray").resolve()
        path.mkdir(parents=True, exist_ok=True)
        return str(path)
    if "://" in storage_path:
        if storage.scheme_of(storage_path) not in storage.SCHEMES:
            raise ConfigError(field, f"not a URI of a known filesystem: {storage_path!r} "
                                     f"(known: {', '.join(storage.SCHEMES)})")
        return storage.normalize(storage_path)
    path = Path(storage_path)
    if not path.is_absolute():
        raise ConfigError(field, f"must be an absolute path or a URI (workers run in other working "
                                 f"folders), got {storage_path!r}")
    if cluster and not path.is_dir():
        raise ConfigError(field, f"{storage_path} does not exist: on a cluster it must be an existing "
                                 "shared folder (mounted on every node) or a URI")
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def default_run_name(out_dir: str | Path) -> str:
    """A stable run name from the output folder, so rerunning the same command resumes."""
    p = Path(out_dir).resolve()
    return f"{p.parent.name}-{p.name}".strip("-") or "gptbert"


def stored_checkpoints(storage_path: str, run_name: str, scratch: Path | None = None) -> list[Path]:
    """Complete checkpoints ``step-N`` (with trainer.pt) of a run in storage, oldest first. In
    remote storage the newest two are copied into ``scratch`` (node-local) to be read."""
    if storage.is_remote(storage_path):
        return _remote_checkpoints(storage_path, run_name, scratch)
    root = Path(storage_path) / run_name
    found = []
    if root.is_dir():
        for p in root.iterdir():
            n = p.name[len(CHECKPOINT_PREFIX):]
            if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and n.isdigit() and (p / "trainer.pt").exists():
                found.append((int(n), p))
    return [p for _, p in sorted(found)]


class _Reporter:
    """The trainer's ``on_checkpoint`` hook in a worker: hands each checkpoint to Ray Train.

    Every rank calls ``ray.train.report`` (a barrier); one rank per node uploads that node's files
    (rank 0's node holds ``step-N``, the others their ``.tmp-step-N``). The last checkpoint is kept
    back until the model folder is inside it."""

    def __init__(self, local_rank: int, steps: int):
        self.trainer = None  # the rank's Trainer, from its first checkpoint on
        self.local_rank = local_rank
        self.steps = steps
        self.final: Path | None = None

    def __call__(self, folder: Path, trainer) -> None:
        self.trainer = trainer
        if trainer.step >= self.steps:
            self.final = self._local(folder)
        else:
            self.report(self._local(folder))

    def _local(self, folder: Path) -> Path | None:
        for candidate in (folder, folder.with_name(f".tmp-{folder.name}")):
            if candidate.is_dir():
                return candidate
        return None

    def report(self, folder: Path | None, extra: dict | None = None) -> None:
        import ray.train

        metrics = {k: v for k, v in self.trainer.last_metrics.items() if isinstance(v, (int, float))}
        metrics.update(step=self.trainer.step, **(extra or {}))
        checkpoint = None
        if folder is not None and self.local_rank == 0:
            checkpoint = ray.train.Checkpoint.from_directory(str(folder))
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{self.trainer.step}")
        if folder is not None and folder.name.startswith(".tmp-") and self.local_rank == 0:
            shutil.rmtree(folder, ignore_errors=True)


def _remote_checkpoints(storage_path: str, run_name: str, scratch: Path | None) -> list[Path]:
    root = storage.join(storage_path, run_name)
    steps = {}
    for name in storage.list_files(root):
        head, _, rest = name.partition("/")
        n = head[len(CHECKPOINT_PREFIX):]
        if head.startswith(CHECKPOINT_PREFIX) and n.isdigit() and rest == "trainer.pt":
            steps[int(n)] = head
    if not steps or scratch is None:
        return []
    out = []
    for n in sorted(steps)[-2:]:
        local = scratch / "stored" / steps[n]
        if not (local / "trainer.pt").is_file():
            shutil.rmtree(local, ignore_errors=True)
            storage.download_tree(storage.join(root, steps[n]), local)
        out.append(local)
    return out


def _train_worker(config: dict) -> None:
    """The per-worker function of the Ray ``TorchTrainer``: one rank of ``pretraining.train_rank``
    with a DeepSpeed backend, checkpoints reported to Ray Train, milestones uploaded to its storage."""
    import ray
    import ray.train
    import torch

    from ..data import open_data
    from ..io import save_model_dir
    from ..device import with_micro_batch_tokens
    from ..pretraining import MILESTONES_DIR, RankRun, train_rank
    from .deepspeed_backend import build_deepspeed_backend
    from .zero import check_zero3_steps, check_zero3_validation

    cfg = from_dict(PipelineConfig, config["cfg"])
    lc, tc = cfg.launch, cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    local_rank, local_world = ctx.get_local_rank(), ctx.get_local_world_size()

    threads = lc.threads_per_worker or max(1, (os.cpu_count() or 1) // max(local_world, 1))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    device = worker_device(config["use_gpu"])
    # auto: measured on this worker's GPU before its model exists; every rank takes the smallest.
    cfg = replace(cfg, train=with_micro_batch_tokens(cfg.train, cfg.model, device, world))
    tc = cfg.train
    if lc.zero_stage == 3:
        check_zero3_steps(tc, world)

    data = open_data(config["data"], config.get("tokenizer"), remote=lc.remote_shards)
    backend = build_deepspeed_backend(cfg.model, tc, lc, device, rank, world)
    if lc.zero_stage == 3:
        check_zero3_validation(tc, data.valid, world)

    # Which node every rank runs on (recorded in training.json: proves multi-node placement).
    node = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": os.uname().nodename, "threads": threads, "device": str(device)}
    nodes: list[Any] = [None] * world
    torch.distributed.all_gather_object(nodes, node)

    # Resume from Ray's latest checkpoint (a restarted worker group) or the run's stored ones (a
    # rerun under the same name); a damaged newest one falls back to the one before. Checkpoints
    # are written node-locally, then persisted by Ray.
    checkpoint = ray.train.get_checkpoint()
    scratch = Path(config["out_dir"]) / ".ray-checkpoints" / config["run_name"]
    stored = stored_checkpoints(config["storage_path"], config["run_name"], scratch)
    reporter = _Reporter(local_rank, tc.steps)

    def publish_milestone(folder: Path) -> None:
        # Written on rank 0's node, then persisted in Ray storage (shared across nodes), from
        # where the driver installs them into the run folder.
        upload_folder(folder, config["storage_path"], f"{config['run_name']}/{MILESTONES_DIR}/{folder.name}")
        shutil.rmtree(folder, ignore_errors=True)

    with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as d:
        candidates = list(stored)
        if d is not None and Path(d).resolve() not in {p.resolve() for p in stored}:
            candidates.append(Path(d))
        run = RankRun(checkpoint_root=scratch, milestone_root=scratch / MILESTONES_DIR, resume_from=candidates,
                      on_checkpoint=reporter, publish_milestone=publish_milestone,
                      launch={"backend": "ray+deepspeed", "workers": world, "zero_stage": lc.zero_stage,
                              "run_name": config["run_name"], "storage_path": config["storage_path"],
                              "nodes": nodes})
        # Resuming reads the checkpoint inside this context; the loop runs after it.
        result = train_rank(cfg, data, backend, run, callback=config.get("callback"), stop_after=config.get("stop_after"))

    folder = reporter.final
    if not result.finished or folder is None:
        # Stopped early (every checkpoint was reported), or resumed a finished run: nothing to add.
        return
    if result.model is not None:
        save_model_dir(folder / "model", result.model, cfg.model, data.tokenizer, result.summary)
    reporter.report(folder, extra={"final": 1})
    if local_rank == 0:
        shutil.rmtree(scratch, ignore_errors=True)


def check_ray_device(cfg: PipelineConfig) -> None:
    """What can be said of ``train.device`` before Ray starts: ``cuda:N`` has no meaning (Ray gives
    each worker its GPU), and a Ray started here has this machine's GPUs, so ``cuda`` needs one."""
    device = cfg.train.device
    check_device(device, "train.device")
    if wants_cuda(device) and device != "cuda":
        raise ConfigError("train.device", f"{device!r}: Ray assigns each worker its own GPU; "
                                          "use cuda (or auto) with launch.backend ray")
    if wants_cuda(device) and resolve_ray_address(cfg.launch) is None:
        resolve_device(device, "train.device")


def ray_workers(device: str, num_workers: int, cluster_gpus: int) -> tuple[bool, int]:
    """(use GPUs, number of workers) for ``train.device`` and ``launch.num_workers`` on a cluster with
    ``cluster_gpus`` GPUs: ``cpu`` never uses them; ``cuda`` needs them; ``auto`` uses them when there
    are any. ``num_workers`` 0 means one worker per GPU (one on CPU). More GPU workers than GPUs is a
    ConfigError (Ray would wait for them forever)."""
    use_gpu = device != "cpu" and (wants_cuda(device) or cluster_gpus > 0)
    if use_gpu and cluster_gpus == 0:
        raise DeviceError("train.device", f"{device!r} requested but the Ray cluster has no GPU; use cpu or auto")
    workers = num_workers or (cluster_gpus if use_gpu else 1)
    if use_gpu and workers > cluster_gpus:
        raise ConfigError("launch.num_workers", f"{workers} GPU workers need {workers} GPUs; the Ray cluster "
                                                f"has {cluster_gpus} (0 = one worker per GPU)")
    return use_gpu, workers


def worker_device(use_gpu: bool):
    """The device of this Ray Train worker: the GPU Ray assigned it, else the CPU."""
    import torch

    if not use_gpu:
        return torch.device("cpu")
    import ray.train.torch

    return ray.train.torch.get_device()


def pretrain_ray(cfg: PipelineConfig, data, out_dir: str | Path, *, tokenizer: str | Path | None = None,
                 callback: Callable[[dict, int], None] | None = None, stop_after: int | None = None,
                 progress: bool = False) -> Path:
    """Pretrain with Ray Train + DeepSpeed; returns ``<out_dir>/model`` (or, with ``stop_after`` <
    steps, the checkpoint in storage where the run stopped).

    ``data``: a shard folder or a token file (workers open it themselves). The run is named
    ``launch.run_name``, else after ``out_dir``; rerunning with the same name resumes from its
    latest checkpoint. ``callback(metrics, step)`` runs in the rank-0 worker (it must be
    picklable). ``tokenizer``: the tokenizer.json shipped in the model folder (default: the shard
    folder's). Progress is reported through ``callback`` (``progress`` draws no bar in workers).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    from ..data import open_data
    from ..pretraining import MILESTONES_DIR, check_data_fits, check_run_folder, write_pretrain_record
    from .zero import check_zero3_steps

    lc = cfg.launch
    out = Path(out_dir).resolve()
    check_run_folder(out)
    if not isinstance(data, (str, Path)):
        raise ConfigError("launch.backend", "the ray launcher reads a shard folder or token file given by path "
                                            "(its workers open it themselves), not an in-memory source")
    data_path = storage.normalize(data)  # a path or a URI: workers on every node open it themselves
    check_outside_inputs(out, [data_path, tokenizer])
    opened = open_data(data_path, tokenizer, remote=lc.remote_shards)  # fails here, before Ray starts, on bad data
    check_data_fits(cfg, opened)
    check_ray_device(cfg)
    address = resolve_ray_address(lc)
    out.mkdir(parents=True, exist_ok=True)
    store = check_storage_path(lc.storage_path, out, cluster=address is not None)
    name = lc.run_name or default_run_name(out)

    started_ray = False
    if not ray.is_initialized():
        if address is not None:
            ray.init(address=address)
        else:
            ray.init(num_cpus=max(os.cpu_count() or 1, max(lc.num_workers, 1) * lc.cpus_per_worker),
                     include_dashboard=False, _system_config={"worker_niceness": lc.worker_niceness})
        started_ray = True
    try:
        use_gpu, workers = ray_workers(cfg.train.device, lc.num_workers, int(ray.cluster_resources().get("GPU", 0)))
        if lc.zero_stage == 3 and cfg.train.micro_batch_tokens != "auto":
            check_zero3_steps(cfg.train, workers)  # before any worker starts; auto is checked in each
        resources = {"CPU": lc.cpus_per_worker}
        if use_gpu:
            resources["GPU"] = 1
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={"cfg": to_dict(cfg), "data": data_path, "out_dir": str(out),
                               "storage_path": store, "run_name": name, "callback": callback,
                               # Only a tokenizer given apart from the data: workers take a shard
                               # folder's own from the folder (a remote one through their cache).
                               "tokenizer": str(Path(tokenizer).resolve()) if tokenizer else None,
                               "stop_after": stop_after, "use_gpu": use_gpu},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=RunConfig(
                name=name, storage_path=store,
                failure_config=FailureConfig(max_failures=lc.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=max(cfg.train.keep_checkpoints, 1) + 1),
                worker_runtime_env={"env_vars": {
                    "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cuda" if use_gpu else "cpu"),
                    # Workers resolve precision "auto" themselves: the driver's override goes with them.
                    **({AUTO_PRECISION_ENV: os.environ[AUTO_PRECISION_ENV]} if AUTO_PRECISION_ENV in os.environ else {}),
                }},
            ),
        )
        try:
            result = trainer.fit()
        except TrainingFailedError as exc:
            raise worker_error(exc) from None
        if result.error is not None:
            raise worker_error(result.error)
        checkpoint = result.checkpoint
        if checkpoint is None:
            raise RuntimeError(f"run {name!r} in {store} finished without a checkpoint")
        if stop_after is not None and stop_after < cfg.train.steps:
            return Path(checkpoint.path)
        with checkpoint.as_directory() as d:
            model_src = Path(d) / "model"
            if not (model_src / "training.json").is_file():
                raise RuntimeError(f"latest checkpoint {checkpoint.path} of run {name!r} holds no model folder")
            install_milestones(store, name, out / MILESTONES_DIR)
            model_dir = _install_model_dir(model_src, out / "model")
    finally:
        if started_ray:
            ray.shutdown()
    write_pretrain_record(out, cfg, opened, json.loads((model_dir / "training.json").read_text()))
    return model_dir


def worker_error(error: BaseException) -> BaseException:
    """The exception a worker raised (the lowest failed rank's), out of Ray Train's wrapper, so a
    bad-input or config error keeps its type and one-line message; other errors pass unchanged."""
    failures = getattr(error, "worker_failures", None)
    if not failures:
        return error
    exc = failures[min(failures)]
    return getattr(exc, "cause", None) or exc  # a RayTaskError carries the original as .cause


def upload_folder(local: Path, store: str, relative: str) -> None:
    """Copy a model folder into Ray storage (a path or URI) under ``relative``; ``training.json``
    goes last, so a folder without it is incomplete (a worker killed while copying)."""
    dest = storage.join(store, relative)
    files = sorted((p for p in local.iterdir() if p.is_file()), key=lambda p: p.name == "training.json")
    for path in files:
        storage.upload_file(path, storage.join(dest, path.name))


def install_milestones(store: str, run_name: str, dest: Path) -> list[str]:
    """Copy the run's complete milestone folders (those with ``training.json``) from Ray storage
    into ``dest`` (each swapped into place); returns their names."""
    from ..pretraining import MILESTONES_DIR

    base = storage.join(store, run_name, MILESTONES_DIR)
    names = sorted({n.split("/")[0] for n in storage.list_files(base) if n.count("/") == 1
                    and n.endswith("/training.json")})
    for name in names:
        target = dest / name
        remove_stale_siblings(target)
        tmp = temporary_sibling(target)
        storage.download_tree(storage.join(base, name), tmp)
        replace_dir(tmp, target)
    return names


def _install_model_dir(src: Path, dest: Path) -> Path:
    """Copy the model folder next to ``dest`` under a temporary name, then swap it into place."""
    remove_stale_siblings(dest)
    tmp = temporary_sibling(dest)
    shutil.copytree(src, tmp)
    return replace_dir(tmp, dest)


__all__ = ["check_ray_device", "ray_workers", "install_milestones", "upload_folder", "check_storage_path", "default_run_name", "pretrain_ray", "resolve_ray_address", "stored_checkpoints",
           "worker_error"]
