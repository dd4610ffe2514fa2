"""Stage folders named by their identity: the pipeline's cache, and its lineage record.

A stage's *identity* is the digest of what determines its output: the digests of its input
artifacts and the fields of its config that change the result. Its output folder lives at
``<workdir>/artifacts/<stage>/<identity[:16]>`` and is complete once ``stage.json`` is there
(written last, atomically). A complete folder for the same identity is reused, so a cache hit
survives process restarts and works from any worker that sees the same disk.

``stage.json`` records the stage, identity, input digests, config, output digest and stats, so
the lineage corpus -> tokenizer -> shards -> model -> evaluation can be read from the folders alone.

Nothing here imports Prefect or MLflow: this is plain bookkeeping.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from common.config import digest as config_digest
from common.config import to_dict

MARKER = "stage.json"
_CHUNK = 1 << 20


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(path: str | Path, exclude: tuple[str, ...] = (MARKER,)) -> str:
    """Digest of a file, or of a folder's files (relative names + contents, sorted).

    Top-level names in ``exclude`` are skipped (the marker itself, checkpoints, ...).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"cannot digest missing artifact: {path}")
    if path.is_file():
        return file_digest(path)
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if rel.parts[0] in exclude or not p.is_file() or rel.name.startswith("."):
            continue
        h.update(rel.as_posix().encode() + b"\0" + file_digest(p).encode() + b"\n")
    return h.hexdigest()


def config_identity(cfg: Any) -> dict[str, Any]:
    """The result-determining fields of a stage config (``identity_dict`` when it defines one)."""
    if hasattr(cfg, "identity_dict"):
        return cfg.identity_dict()
    return to_dict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


@dataclass
class Artifact:
    """A finished stage's output: where it is and what it is (passed between flows)."""

    stage: str
    path: str  # the stage folder
    identity: str
    digest: str  # content digest of the output (what downstream identities are built from)
    cached: bool = False
    record: dict[str, Any] = field(default_factory=dict)

    def file(self, name: str) -> str:
        return str(Path(self.path) / name)


def identity_of(stage: str, inputs: dict[str, str], config: Any) -> str:
    """Identity = digest of (stage, input digests, result-determining config)."""
    return config_digest({"stage": stage, "inputs": dict(sorted(inputs.items())), "config": config})


def stage_dir(workdir: str | Path, stage: str, identity: str) -> Path:
    return Path(workdir).resolve() / "artifacts" / stage / identity[:16]


def read_complete(folder: Path, identity: str) -> dict[str, Any] | None:
    """The folder's record if it is complete and for this identity, else None."""
    marker = folder / MARKER
    if not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if record.get("identity") == identity else None


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def run_stage(
    workdir: str | Path,
    stage: str,
    inputs: dict[str, str],
    config: Any,
    body: Callable[[Path], dict[str, Any] | None],
    *,
    resumable: bool = False,
    output_subdir: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Artifact:
    """Run ``body(out_dir)`` unless a complete folder for this identity exists.

    ``body`` writes the stage's files into ``out_dir`` and returns stats (stored in the record).
    Non-resumable stages write into a temporary sibling folder that is renamed into place on
    success, so a crash leaves nothing that looks finished. A resumable stage (pretraining) writes
    into its final folder directly so a retry finds its checkpoints; it counts as finished only once
    its marker exists. ``output_subdir`` names the part of the folder whose content is the
    output's digest (pretraining: ``model``, not the checkpoints).
    """
    config = config_identity(config) if not isinstance(config, dict) else config
    identity = identity_of(stage, inputs, config)
    final = stage_dir(workdir, stage, identity)
    record = read_complete(final, identity)
    if record is not None:
        return Artifact(stage, str(final), identity, record["output_digest"], cached=True, record=record)

    final.parent.mkdir(parents=True, exist_ok=True)
    if resumable:
        out = final
        out.mkdir(exist_ok=True)
    else:
        out = final.with_name(f".{final.name}.tmp-{os.getpid()}-{time.time_ns()}")
        out.mkdir()
    start = time.time()
    try:
        stats = body(out) or {}
    except BaseException:
        if not resumable:
            shutil.rmtree(out, ignore_errors=True)
        raise
    record = {
        "stage": stage,
        "identity": identity,
        "inputs": inputs,
        "config": config,
        "output_digest": tree_digest(out / output_subdir if output_subdir else out),
        "stats": stats,
        "duration_s": round(time.time() - start, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    _write_json_atomic(out / MARKER, record)
    if not resumable:
        if final.exists():  # an incomplete leftover of an earlier crash: replace it
            shutil.rmtree(final)
        try:
            os.replace(out, final)
        except OSError:
            # Another process finished the same identity first; its folder is equivalent.
            shutil.rmtree(out, ignore_errors=True)
            other = read_complete(final, identity)
            if other is None:
                raise
            record = other
    return Artifact(stage, str(final), identity, record["output_digest"], cached=False, record=record)


def update_record(artifact: Artifact, **fields: Any) -> None:
    """Add fields to a finished stage's record (e.g. the MLflow run that produced it)."""
    marker = Path(artifact.path) / MARKER
    record = json.loads(marker.read_text())
    record.update(fields)
    _write_json_atomic(marker, record)
    artifact.record = record
