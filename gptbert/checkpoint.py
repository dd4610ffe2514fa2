"""Resumable training checkpoints: ``out_dir/checkpoints/step-N/``.

A checkpoint folder holds what the step backend saves (``PlainBackend``: ``model.safetensors`` and
``optimizer.pt``; a DeepSpeed backend: its own files), ``ema.safetensors``, ``trainer.pt`` (step,
data cursor, anything the loop adds: plain ints/floats/strings/lists/dicts) and one ``rng-R.pt``
per rank (python, numpy and torch RNG states). Weights are safetensors; the rest is written with
``torch.save`` and read back with ``weights_only=True``, so loading never unpickles arbitrary
objects. A checkpoint is written to ``.tmp-step-N`` and renamed when complete; only the last K
are kept. Resuming restores all of it, so a resumed run continues exactly.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from common.artifacts import DataError, replace_dir
from common.errors import error_line

PREFIX = "step-"


def _reason(exc: BaseException) -> str:
    # The first line: torch and safetensors put their summary there, then long advice.
    return error_line(exc, first=True)


class CheckpointError(DataError):
    """A checkpoint that cannot be read: a missing, truncated or corrupt file (the message names it)."""


class UnsafeCheckpointError(DataError):
    """A checkpoint file holding objects other than tensors and plain data, refused unread: loading it
    could run code."""

    @classmethod
    def refuse(cls, path, exc: Exception) -> "UnsafeCheckpointError":
        """The error for ``path``, whose weights-only load failed with ``exc``."""
        return cls(f"{path}: refused: the file holds objects other than tensors and plain data, "
                   f"and loading it could run code ({_reason(exc)})")


def torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``: a payload that is not plain data raises UnsafeCheckpointError,
    an unreadable file CheckpointError; both name the file."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError.refuse(path, exc) from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({_reason(exc)})") from None


def safetensors_load(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; an unreadable file raises CheckpointError naming it."""
    try:
        return load_file(str(path), device=device)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as exc:  # safetensors raises its own SafetensorError for truncated files
        raise CheckpointError(f"{path}: unreadable ({_reason(exc)})") from None


def _is_dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _barrier() -> None:
    if _is_dist():
        torch.distributed.barrier()


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states in weights_only-loadable types."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states captured by ``rng_state`` (CUDA's only where CUDA is available)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit() \
                and (p / "trainer.pt").exists():
            found.append((int(p.name[len(PREFIX):]), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(
    root: str | Path,
    step: int,
    backend,
    ema,
    trainer_state: dict[str, Any],
    keep: int = 2,
    rank: int = 0,
    barrier: Callable[[], None] = _barrier,
) -> Path:
    """Write checkpoint ``step-<step>`` atomically; every rank calls this (backends may shard)."""
    root = Path(root)
    final = root / f"{PREFIX}{step}"
    tmp = root / f".tmp-{PREFIX}{step}"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    backend.save(tmp)
    torch.save(rng_state(), tmp / f"rng-{rank}.pt")
    ema_state = ema.state_dict()  # every rank: an EMA over partitions gathers them collectively
    if rank == 0:
        save_file({k: v.contiguous() for k, v in ema_state.items()}, str(tmp / "ema.safetensors"))
        torch.save(trainer_state, tmp / "trainer.pt.tmp")
    barrier()
    if rank == 0:
        # trainer.pt last: its presence marks the folder complete.
        (tmp / "trainer.pt.tmp").rename(tmp / "trainer.pt")
        (tmp / "checkpoint.json").write_text(json.dumps(
            {k: v for k, v in trainer_state.items() if isinstance(v, (int, float, str, dict, list))},
            indent=2, default=str))
        replace_dir(tmp, final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """The loop state of a checkpoint (step, data cursor, run digest), read before any weights."""
    path = Path(path)
    if not (path / "trainer.pt").exists():
        raise CheckpointError(f"{path}: not a complete checkpoint (no trainer.pt)")
    return torch_load(path / "trainer.pt")


def load_checkpoint(path: str | Path, backend, ema, rank: int = 0, run_digest: str | None = None) -> dict[str, Any]:
    """Restore backend (model + optimizer), EMA and this rank's RNG; returns the trainer state.

    With ``run_digest``, a checkpoint of another run (model or train config) is refused before any
    weights are read. Every file is read without unpickling code (``weights_only``)."""
    path = Path(path)
    state = read_trainer_state(path)
    if run_digest is not None and state.get("run_digest") != run_digest:
        raise DataError(f"checkpoint {path} was written by a run with a different model or train config; "
                        "use a new output folder or the original config")
    try:
        backend.load(path)
    except (CheckpointError, UnsafeCheckpointError):
        raise
    except Exception as exc:  # a backend's own reader (safetensors, DeepSpeed) on a damaged file
        raise CheckpointError(f"{path}: the model or optimizer state is unreadable ({_reason(exc)})") from None
    ema.load_state_dict(safetensors_load(path / "ema.safetensors"))
    rng_file = path / f"rng-{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch_load(rng_file))
    return state


__all__ = ["CheckpointError", "UnsafeCheckpointError", "latest_checkpoint", "list_checkpoints", "load_checkpoint",
           "read_trainer_state", "rng_state", "safetensors_load", "save_checkpoint", "set_rng_state", "torch_load"]
