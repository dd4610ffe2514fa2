"""Helpers shared by the data stages: errors, digests, atomic stage folders, progress bars."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

from common.config.base import digest


class DataError(ValueError):
    """Bad input data; the message names the file (and line or record where it applies)."""


class DigestMismatchError(DataError):
    """An artifact was made from something other than what it is being used with."""


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def config_digest(cfg: Any) -> str:
    """Digest of the config fields that decide a stage's output (runtime knobs left out)."""
    return digest(cfg.identity_dict())


def stage_identity(inputs_digest: str, cfg_digest: str) -> str:
    return digest({"inputs": inputs_digest, "config": cfg_digest})


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def resolve_file(path: str | Path, default_name: str, what: str) -> Path:
    """``path`` itself, or ``path/default_name`` when ``path`` is a stage folder."""
    p = Path(path)
    if p.is_dir():
        p = p / default_name
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    return p


@contextlib.contextmanager
def atomic_stage_dir(out_dir: str | Path, marker: str) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``out_dir``; on success it replaces ``out_dir``.

    A killed or failing stage leaves only a hidden ``.tmp-*`` folder (removed on failure), never a
    half-written ``out_dir``. An existing ``out_dir`` is replaced only if it is empty or is a
    previous output of the same stage (holds ``marker``), so a wrong --out cannot wipe other data.
    """
    out = Path(out_dir).resolve()
    if out.exists():
        if not out.is_dir():
            raise DataError(f"{out}: output path exists and is not a folder")
        if any(out.iterdir()) and not (out / marker).exists():
            raise DataError(f"{out}: output folder is not empty and holds no {marker}; "
                            "refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
