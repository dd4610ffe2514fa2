"""The artifact toolkit: digests, atomic writes, atomic folder swaps and stage records.

Every stage (clean, tokenizer, shard, pretrain, evaluate) writes one output folder and, last, its
record ``stage.json``:

    {"stage": "shard", "identity": "...", "inputs": {"corpus": "<sha256>", "tokenizer": "<sha256>"},
     "config": {...}, "output": "manifest.json", "output_digest": "<sha256>", "stats": {...}}

- ``identity`` = digest of (stage, the content digests of its inputs, the config fields that change
  its output): the same inputs and config give the same identity in the CLI and in the flows.
- ``output_digest`` is the content digest of the stage's output (a file or a folder), which the
  next stage lists among its inputs, so the lineage corpus -> tokenizer -> shards -> model ->
  evaluation can be read from the folders alone.
- A folder counts as a stage's output only when its record names that stage: one stage never
  mistakes another stage's folder for its own, and a folder without a record is incomplete.

Records hold no timestamps, so identical inputs give byte-identical folders. A stage folder may
also be a URI (``common.storage``): ``staging_dir`` then writes locally and publishes the finished
folder with its record last, and ``read_record`` reads only the remote record. Nothing here
imports torch or any orchestration library.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

from . import storage
from .config.base import digest
from .errors import DataError, DigestMismatchError
from .storage import atomic_write_bytes

RECORD_FILE = "stage.json"
# The pipeline's stages, in order (each stage's record names one of them).
STAGES = ("clean", "tokenizer", "shard", "pretrain", "export", "evaluate")
# Stages run on demand after the pipeline's (``gptbert submission``): recorded the same way.
EXTRA_STAGES = ("submission",)
STAGING_PREFIX = ".staging-"  # inside a remote stage folder: files workers wrote before it is published


# ----------------------------------------------------------------------------- digests

def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (read in 1 MiB blocks; a URI is read as a stream)."""
    return storage.sha256(path)


def tree_digest(path: str | Path, exclude: tuple[str, ...] = (RECORD_FILE,)) -> str:
    """Digest of a file (its sha256), or of a folder: its files' relative names and sha256s, sorted.

    Hidden files and top-level names in ``exclude`` (the record itself) are left out.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"cannot digest missing artifact: {path}")
    if path.is_file():
        return file_digest(path)
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if rel.parts[0] in exclude or not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        h.update(rel.as_posix().encode() + b"\0" + file_digest(p).encode() + b"\n")
    return h.hexdigest()


def stage_identity(stage: str, inputs: dict[str, str | None], config: dict[str, Any]) -> str:
    """The identity of a stage run: digest of (stage, input content digests, output-relevant config)."""
    return digest({"stage": stage, "inputs": dict(sorted(inputs.items())), "config": config})


# ----------------------------------------------------------------------------- atomic writes

def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically (``atomic_write_bytes``)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Pretty, key-sorted JSON (stable bytes for equal data), written atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    """A JSON file's content; a missing file is FileNotFoundError, a malformed one a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def replace_dir(tmp: str | Path, dest: str | Path) -> Path:
    """Put the finished folder ``tmp`` at ``dest``. An existing ``dest`` is renamed aside first and
    removed only after the swap, so a reader never sees a half-written folder."""
    tmp, dest = Path(tmp), Path(dest)
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dest)
    return dest


# ----------------------------------------------------------------------------- stage records

def read_record(folder: str | Path, stage: str | None = None, identity: str | None = None) -> dict | None:
    """The folder's record, or None when it has none, an unreadable one, one of another stage
    (when ``stage`` is given) or of another identity (when ``identity`` is given). For a remote
    folder only the record object is read."""
    if storage.is_remote(folder):
        record = storage.read_json(storage.join(folder, RECORD_FILE))
    else:
        marker = Path(folder) / RECORD_FILE
        if not marker.is_file():
            return None
        try:
            record = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
    if not isinstance(record, dict):
        return None
    if stage is not None and record.get("stage") != stage:
        return None
    if identity is not None and record.get("identity") != identity:
        return None
    return record


def make_record(stage: str, inputs: dict[str, str | None], config: dict[str, Any], folder: str | Path,
                output: str, stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record of a finished stage whose output is ``folder/output`` (a file or a sub-folder)."""
    if stage not in STAGES + EXTRA_STAGES:
        raise ValueError(f"unknown stage {stage!r} (known: {', '.join(STAGES + EXTRA_STAGES)})")
    return {
        "stage": stage,
        "identity": stage_identity(stage, inputs, config),
        "inputs": dict(sorted(inputs.items())),
        "config": config,
        "output": output,
        "output_digest": tree_digest(Path(folder) / output),
        "stats": stats or {},
    }


def write_record(folder: str | Path, record: dict[str, Any]) -> None:
    """Write ``stage.json`` (last: its presence marks the folder complete); one PUT when remote."""
    if storage.is_remote(folder):
        text = json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"
        storage.write_bytes(storage.join(folder, RECORD_FILE), text.encode("utf-8"))
        return
    atomic_write_json(Path(folder) / RECORD_FILE, record)


def update_record(folder: str | Path, **fields: Any) -> dict[str, Any]:
    """Add fields to a finished folder's record (e.g. the tracking run that produced it)."""
    record = read_record(folder)
    if record is None:
        raise DataError(f"{folder}: holds no readable {RECORD_FILE}")
    record.update(fields)
    write_record(folder, record)
    return record


def check_output_folder(out: str | Path, stage: str) -> Path:
    """Refuse, before any work, an output folder that cannot take this stage's output: a file, a
    non-empty folder whose record is missing or names another stage, or a place that cannot be
    written (probed by creating a hidden folder beside it). A remote folder must be empty or hold
    this stage's record or its interrupted upload."""
    if storage.is_remote(out):
        if storage.owned_by(out, stage, RECORD_FILE) is False:
            raise DataError(f"{out}: output location is not empty and holds no {stage} {RECORD_FILE}; "
                            "refusing to overwrite it")
        return out
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise DataError(f"{out}: output path exists and is not a folder")
        if any(out.iterdir()) and read_record(out, stage) is None:
            other = read_record(out)
            what = f"the output of stage '{other['stage']}'" if other else f"no {stage} {RECORD_FILE}"
            raise DataError(f"{out}: output folder is not empty and holds {what}; refusing to overwrite it")
    check_writable(out)
    return out


def check_writable(out: str | Path) -> None:
    """Create ``out``'s parent folders and a hidden probe folder beside ``out`` (removed at once):
    an unwritable destination fails here, before any work, with the OS error naming the path."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = temporary_sibling(out, "probe")
        probe.mkdir()
        probe.rmdir()
    except NotADirectoryError:
        raise DataError(f"{out}: a parent of the output folder is a file") from None
    except OSError as exc:
        raise DataError(f"{out}: cannot write the output folder there ({exc.strerror or exc})") from None


def check_outside_inputs(out: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an output folder that is, lies inside, or contains one of the inputs: the stage
    would read its own output back, or replace what it reads. Locations on different filesystems
    never overlap; URIs are compared as paths inside their store."""
    o = Path(storage.normalize(out).split("://", 1)[-1])
    for given in inputs:
        if given is None or storage.is_remote(given) != storage.is_remote(out) \
                or storage.scheme_of(given) != storage.scheme_of(out) and storage.is_remote(out):
            continue
        i = Path(storage.normalize(given).split("://", 1)[-1])
        relation = ("is" if o == i else "lies inside" if i in o.parents else "contains" if o in i.parents
                    else None)
        if relation:
            raise DataError(f"output folder {o} {relation} the input {i}; choose an output folder outside "
                            "the inputs")


def temporary_sibling(dest: str | Path, kind: str = "tmp") -> Path:
    """A hidden name beside ``dest`` for a folder being written: ``.NAME.tmp-HOST-PID-RANDOM``, so a
    later run can tell the leftovers of killed processes (``remove_stale_siblings``) from live ones."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}.{kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def remove_stale_siblings(dest: str | Path) -> list[Path]:
    """Remove the hidden temporaries of ``dest`` left by killed processes of this host (SIGKILL
    skips every cleanup); folders of running processes and of other hosts are left alone."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    removed = []
    host = socket.gethostname()
    for p in dest.parent.glob(f".{glob.escape(dest.name)}.tmp-*"):
        parts = p.name[len(dest.name) + 6:].rsplit("-", 2)  # HOST, PID, RANDOM
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not _alive(int(parts[1])):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def shared_staging(out_dir: str | Path, tmp: Path) -> str:
    """Where workers on other machines write files of the stage folder staged in ``tmp`` (by
    ``staging_dir``): ``tmp`` itself for a local ``out_dir``; for a remote one a hidden prefix
    inside it, whose files ``staging_dir`` moves into place when it publishes and removes when the
    stage fails."""
    if not storage.is_remote(out_dir):
        return str(tmp)
    return storage.join(storage.normalize(out_dir), STAGING_PREFIX + tmp.name.lstrip("."))


@contextlib.contextmanager
def staging_dir(out_dir: str | Path, stage: str) -> Iterator[Path]:
    """Yield a fresh hidden folder beside ``out_dir``; when the block succeeds it replaces
    ``out_dir`` (whose earlier content must be this stage's output, see ``check_output_folder``).
    A failing block leaves nothing behind; a killed one a hidden ``.NAME.tmp-*`` folder, which the
    next run of the stage removes.

    A remote ``out_dir`` (a URI): the block writes into a local folder, which is then published
    (``storage.publish``: every object first, the record last) and removed; files that workers
    wrote to ``shared_staging(out_dir, tmp)`` are moved into the folder with it."""
    remote = storage.is_remote(out_dir)
    if remote:
        check_output_folder(out_dir, stage)
        # Claim the prefix before any work (this also fails fast on a missing bucket or no access).
        marker = storage.join(out_dir, storage.PENDING_FILE)
        had_marker = storage.is_file(marker)
        storage.write_bytes(marker, json.dumps({"stage": stage}).encode())
        out = storage.local_home(out_dir)  # the local folder is written beside this name
    else:
        out = check_output_folder(Path(out_dir).resolve(), stage)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out)
    tmp = temporary_sibling(out)
    tmp.mkdir()
    publishing = False
    try:
        yield tmp
        publishing = True
        if remote:
            shared = shared_staging(out_dir, tmp)
            staged = {name: storage.join(shared, name) for name in storage.list_files(shared)}
            storage.publish(tmp, out_dir, stage, RECORD_FILE, staged=staged)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            replace_dir(tmp, out)
    except BaseException:
        if remote and not publishing:
            with contextlib.suppress(OSError):
                storage.delete(shared_staging(out_dir, tmp))  # what workers wrote for this attempt
            if not had_marker:  # nothing was uploaded: leave the prefix as it was
                with contextlib.suppress(OSError):
                    storage.delete(marker)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def local_stage_copy(folder: str | Path, record: dict[str, Any], parts: tuple[str, ...] | None = None) -> Path:
    """A local folder with a stage folder's files: the folder itself when local, else a copy in the
    local cache (of ``parts`` only, when given, e.g. a run's model without its checkpoints; the
    record's output is always included), checked against the record's output digest when filled."""
    if not storage.is_remote(folder):
        return Path(folder)
    output = record["output"]
    parts = tuple(sorted(set(parts) | {output})) if parts is not None and output != "." else None

    def verify(copy: Path) -> None:
        actual = tree_digest(copy / output)
        if actual != record["output_digest"]:
            raise DigestMismatchError(f"{folder}: its {output} has digest {actual[:16]}..., its record says "
                                      f"{record['output_digest'][:16]}...; it was changed after it was written "
                                      f"(delete its {RECORD_FILE} to make the stage run again)")

    # Partial copies are cached apart from whole ones, named by a digest of what they hold.
    key = f"{record['stage']}-{record['output_digest'][:32]}" + (f"-{digest(list(parts))[:8]}" if parts else "")
    return storage.LocalCache().tree(folder, key, verify, only=list(parts) if parts else None)


def resolve_file(path: str | Path, default_name: str, what: str) -> Path:
    """``path`` itself, or ``path/default_name`` when ``path`` is a stage folder."""
    p = Path(path)
    if p.is_dir():
        p = p / default_name
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    return p


__all__ = ["DataError", "DigestMismatchError", "EXTRA_STAGES", "RECORD_FILE", "STAGES",
           "atomic_write_json", "atomic_write_text", "check_output_folder", "check_outside_inputs", "check_writable", "file_digest", "local_stage_copy",
           "make_record", "read_json", "read_record", "remove_stale_siblings", "replace_dir", "resolve_file",
           "shared_staging", "stage_identity", "staging_dir", "temporary_sibling", "tree_digest", "update_record", "write_record"]
