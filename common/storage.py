"""Where artifacts live: local paths and ``pyarrow.fs`` URIs, behind one set of functions.

Every stage input and output, and the run root, may be a local path or a URI of a filesystem
``pyarrow.fs`` knows (``s3://``, ``gs://``, ``hdfs://``, ``abfs://``, ``file://``). This module is
the only place that resolves them; callers pass locations around as strings.

- **Credentials** come the standard way, from ``pyarrow.fs.FileSystem.from_uri``: the AWS
  environment (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, instance roles, ``AWS_ENDPOINT_URL`` /
  ``AWS_ENDPOINT_URL_S3`` for S3-compatible stores such as MinIO), Google's application default
  credentials, the Hadoop configuration. Nothing here stores a secret.
- **Publishing** a stage folder to an object store (``publish``): object stores have no rename, so
  the folder's objects are written first and the record ``stage.json`` last; a prefix without its
  record is incomplete and the stage runs again. A ``.pending.json`` marker, written first and
  removed last, tells an interrupted upload of ours from someone else's objects, which are never
  overwritten.
- **Reading** remote artifacts goes through a bounded local cache (``LocalCache``) under
  ``GPTBERT_CACHE_DIR`` (default ``~/.cache/gptbert``): files keyed by their sha256 and stage
  folders keyed by their output digest, verified when filled, least recently used evicted beyond
  ``GPTBERT_CACHE_MAX_GB`` (default 50). Local paths are used in place, never copied.

Nothing here imports torch or any orchestration library.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

from .errors import DigestMismatchError, error_line

# The URI schemes pyarrow.fs resolves (``file`` is a local path written as a URI).
SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")
PENDING_FILE = ".pending.json"
_RANGE = 8 << 20  # bytes per ranged read when a remote file is read into memory
_fs_cache: dict[tuple[str, str], object] = {}
_fs_lock = threading.Lock()


class StorageError(OSError):
    """A location that cannot be reached or read; the message names it."""


# ----------------------------------------------------------------------------- locations

def scheme_of(location: str | Path) -> str:
    """The URI scheme of ``location`` ("" for a plain path)."""
    text = str(location)
    return text.split("://", 1)[0].lower() if "://" in text else ""


def is_remote(location: str | Path) -> bool:
    """Whether ``location`` is a URI of a filesystem other than the local one."""
    return scheme_of(location) not in ("", "file")


def normalize(location: str | Path) -> str:
    """An absolute local path (``file://`` URIs included) or a URI without a trailing slash."""
    text = str(location)
    scheme = scheme_of(text)
    if scheme == "file":
        return str(Path(text[len("file://"):]).resolve())
    if scheme:
        if scheme not in SCHEMES:
            raise StorageError(f"{text}: unknown URI scheme {scheme}:// (known: {', '.join(SCHEMES)})")
        return text.rstrip("/")
    return str(Path(text).resolve())


def join(location: str | Path, *parts: str) -> str:
    """``location`` with ``parts`` appended ("/" for URIs, the OS separator for paths)."""
    if is_remote(location):
        return "/".join([str(location).rstrip("/")] + [p.strip("/") for p in parts if p])
    return str(Path(normalize(location)).joinpath(*parts))


def name_of(location: str | Path) -> str:
    """The last part of a location (a file or folder name)."""
    return str(location).rstrip("/").rsplit("/", 1)[-1] if is_remote(location) else Path(location).name


def filesystem(location: str | Path):
    """``(pyarrow.fs.FileSystem, path inside it)`` for a location; one filesystem object per
    scheme and bucket/host in this process (clients are reused, as their docs advise)."""
    import pyarrow.fs as pafs

    if not is_remote(location):
        return pafs.LocalFileSystem(), normalize(location)
    text = normalize(location)
    scheme, rest = text.split("://", 1)
    key = (scheme, rest.split("/", 1)[0])
    with _fs_lock:
        fs = _fs_cache.get(key)
    try:
        if fs is None:
            fs, path = pafs.FileSystem.from_uri(text)
            with _fs_lock:
                _fs_cache[key] = fs
            return fs, path
        if scheme in ("s3", "gs", "gcs"):  # bucket/key: no need to build a second client
            return fs, rest
        return fs, pafs.FileSystem.from_uri(text)[1]
    except (OSError, ValueError) as exc:
        raise StorageError(f"{text}: cannot open this location ({_short(exc)})") from None


def _short(exc: BaseException) -> str:
    # pyarrow's first line names the operation and the store's answer.
    return error_line(exc, first=True, limit=300)


def _info(location: str | Path):
    fs, path = filesystem(location)
    try:
        return fs, path, fs.get_file_info(path)
    except OSError as exc:
        raise StorageError(f"{location}: cannot read this location ({_short(exc)})") from None


def exists(location: str | Path) -> bool:
    """Whether a file or folder (a non-empty prefix on object stores) is at ``location``."""
    import pyarrow.fs as pafs

    return _info(location)[2].type != pafs.FileType.NotFound


def is_file(location: str | Path) -> bool:
    """Whether a file (an object) is at ``location``."""
    import pyarrow.fs as pafs

    return _info(location)[2].type == pafs.FileType.File


def is_dir(location: str | Path) -> bool:
    """Whether a folder (a non-empty prefix on object stores) is at ``location``."""
    import pyarrow.fs as pafs

    return _info(location)[2].type == pafs.FileType.Directory


def size(location: str | Path) -> int:
    """The size in bytes of the file at ``location``."""
    return _info(location)[2].size


def list_files(location: str | Path) -> dict[str, int]:
    """``{relative name: size}`` of every file under the folder ``location`` (empty if none)."""
    import pyarrow.fs as pafs

    fs, path, info = _info(location)
    if info.type != pafs.FileType.Directory:
        return {}
    selector = pafs.FileSelector(path, recursive=True)
    base = path.rstrip("/") + "/"
    return {i.path[len(base):]: i.size for i in fs.get_file_info(selector) if i.type == pafs.FileType.File}


@contextlib.contextmanager
def _open_input(location: str | Path):
    """``(filesystem, path, open file)``: one request on the hot path; only when it fails is the
    store asked again, to tell a missing file (FileNotFoundError naming it) from other errors."""
    fs, path = filesystem(location)
    try:
        f = fs.open_input_file(path)
    except OSError as exc:
        if not is_file(location):
            raise FileNotFoundError(f"{location}: not found") from None
        raise StorageError(f"{location}: cannot read ({_short(exc)})") from None
    with f:
        yield fs, path, f


def read_bytes(location: str | Path) -> bytes:
    """A file's bytes; a missing file is FileNotFoundError naming the location."""
    if not is_remote(location):
        return Path(normalize(location)).read_bytes()
    with _open_input(location) as (_, _, f):
        return f.read()


def read_ranged(location: str | Path, size: int | None = None, workers: int = 4) -> bytes:
    """A remote file's bytes, fetched as parallel range requests of 8 MiB (an object store serves
    each range at full speed; one stream is slower on large objects). A missing file is
    FileNotFoundError naming it."""
    with _open_input(location) as (fs, path, f):
        size = f.size() if size is None else size
        if size <= _RANGE:
            return f.read_at(size, 0) if size else b""
        out = bytearray(size)
        starts = range(0, size, _RANGE)

        def get(start: int) -> None:
            with fs.open_input_file(path) as g:  # one handle per thread: read_at is not shared
                out[start: start + _RANGE] = g.read_at(min(_RANGE, size - start), start)

        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(get, starts))
        return bytes(out)


_digests: dict[tuple[str, int, str], str] = {}  # (location, size, mtime) -> sha256, for this process


def sha256(location: str | Path) -> str:
    """sha256 of a file's bytes at a path or URI, read as a stream (a remote file is never stored
    on this machine; its digest is remembered for the process while its size and modification
    time stay the same)."""
    h = hashlib.sha256()
    if not is_remote(location):
        with open(location, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()
    fs, path, info = _info(location)
    key = (normalize(location), info.size, str(info.mtime))
    if key not in _digests:
        with _open_input(location) as (_, _, f):
            while chunk := f.read(_RANGE):
                h.update(chunk)
        _digests[key] = h.hexdigest()
    return _digests[key]


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a hidden temporary file beside ``path``, flush it, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write a whole file: atomically (temporary file + rename) locally, one PUT on object stores
    (an object is never seen half-written)."""
    if not is_remote(location):
        Path(normalize(location)).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(normalize(location), data)
        return
    fs, path = filesystem(location)
    try:
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as exc:
        raise StorageError(f"{location}: cannot write ({_short(exc)})") from None


def delete(location: str | Path) -> None:
    """Remove a file, or a folder with everything under it (nothing if absent)."""
    import pyarrow.fs as pafs

    fs, path, info = _info(location)
    if info.type == pafs.FileType.File:
        fs.delete_file(path)
    elif info.type == pafs.FileType.Directory:
        fs.delete_dir(path)


def move(source: str | Path, location: str | Path) -> None:
    """Move a file within one store (a rename locally; a server-side copy and a delete on object
    stores: no bytes pass through this machine)."""
    fs, src = filesystem(source)
    _, dest = filesystem(location)
    if not is_remote(location):
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
    try:
        fs.move(src, dest)
    except OSError as exc:
        raise StorageError(f"{source} -> {location}: cannot move ({_short(exc)})") from None


def upload_file(local: str | Path, location: str | Path) -> None:
    """Copy one local file to ``location``."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    if not is_remote(location):  # object stores have no folders to create
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        pafs.copy_files(str(local), path, destination_filesystem=fs)
    except OSError as exc:
        raise StorageError(f"{location}: cannot write ({_short(exc)})") from None


def download_tree(location: str | Path, local: str | Path, only: list[str] | None = None) -> list[str]:
    """Copy every file under the folder ``location`` (or only the files and sub-folders named in
    ``only``) into the local folder ``local``; returns the relative names copied."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    names = sorted(list_files(location))
    if only is not None:
        names = [n for n in names if any(n == o or n.startswith(o.rstrip("/") + "/") for o in only)]
    Path(local).mkdir(parents=True, exist_ok=True)
    local = Path(local)
    for name in names:
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(f"{path.rstrip('/')}/{name}", str(local / name), source_filesystem=fs)
    return names


# ----------------------------------------------------------------------------- stage folders

def read_json(location: str | Path):
    """A JSON file's content, or None when it is missing or not valid JSON."""
    try:
        return json.loads(read_bytes(location))
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def owned_by(location: str | Path, stage: str, record_file: str) -> bool | None:
    """For an output folder: True when it is empty, holds this stage's record or an interrupted
    upload of this stage; False when it holds anything else; None when nothing is there."""
    files = list_files(location)
    if not files:
        return None
    for marker in (record_file, PENDING_FILE):
        data = read_json(join(location, marker)) if marker in files else None
        if isinstance(data, dict) and data.get("stage") == stage:
            return True
    return False


def publish(local: str | Path, location: str | Path, stage: str, record_file: str,
            keep: tuple[str, ...] = (), staged: dict[str, str] | None = None) -> None:
    """Upload the finished local stage folder ``local`` to the remote folder ``location``.

    Order: a pending marker naming the stage; the old record removed (from here the folder is
    incomplete to every reader); the files ``staged`` (name -> where workers already wrote it in
    the same store) moved into place; objects not in the new folder removed (except under the
    top-level names ``keep``, written there by others, e.g. Ray's checkpoints); every file but the
    record; the record; the marker removed. A crash at any point leaves a folder without a valid
    record, which the stage redoes. Hidden top-level entries of ``local`` (scratch) are not uploaded."""
    local = Path(local)
    staged = staged or {}
    names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*")
                   if p.is_file() and not p.relative_to(local).parts[0].startswith("."))
    if record_file not in names:
        raise ValueError(f"{local}: holds no {record_file}; a stage folder is published with its record")
    write_bytes(join(location, PENDING_FILE), json.dumps({"stage": stage, "started": time.time()}).encode())
    existing = list_files(location)
    if record_file in existing:
        delete(join(location, record_file))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda n: move(staged[n], join(location, n)), sorted(staged)))
    moved = {join(location, n) for n in staged} | set(staged.values())
    for name in existing:
        if (name not in names and name not in staged and name != PENDING_FILE
                and name.split("/", 1)[0] not in keep and join(location, name) not in moved):
            delete(join(location, name))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda n: upload_file(local / n, join(location, n)),
                      [n for n in names if n != record_file]))
    upload_file(local / record_file, join(location, record_file))
    delete(join(location, PENDING_FILE))


# ----------------------------------------------------------------------------- the local cache

def cache_root() -> Path:
    """``GPTBERT_CACHE_DIR``, else ``$XDG_CACHE_HOME/gptbert``, else ``~/.cache/gptbert``."""
    env = os.environ.get("GPTBERT_CACHE_DIR")
    if env:
        return Path(env).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser().resolve() / "gptbert"


def local_home(location: str | Path) -> Path:
    """A local folder for what must stay on this machine (logs, the embedded MLflow store, scratch)
    of a run root: the folder itself when it is local, else one under the cache named after the URI."""
    if not is_remote(location):
        return Path(normalize(location))
    text = normalize(location)
    scheme, rest = text.split("://", 1)
    return cache_root() / "remote" / scheme / rest


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalCache:
    """A bounded cache of remote files and folders on local disk, safe across processes.

    Entries: ``files/<sha256>`` (one file, checked against its sha256 as it is filled) and
    ``trees/<digest>/`` (a stage folder, checked by the caller's verify function). Filling writes a
    temporary sibling and renames it into place, so a killed fill leaves no entry. Using an entry
    touches it; after each fill the least recently used entries are removed until the cache is
    under ``max_bytes`` (the entry just filled stays)."""

    def __init__(self, root: str | Path | None = None, max_bytes: int | None = None):
        self.root = Path(root) if root is not None else cache_root()
        if max_bytes is None:
            max_bytes = int(float(os.environ.get("GPTBERT_CACHE_MAX_GB", "50")) * (1 << 30))
        self.max_bytes = max_bytes
        self.hits = self.fills = 0

    def file(self, location: str | Path, sha256: str) -> Path:
        """A local copy of the remote file ``location`` whose content has ``sha256``."""
        dest = self.root / "files" / sha256
        if dest.is_file():
            self.hits += 1
            os.utime(dest)
            return dest
        data = read_ranged(location)
        actual = _sha256_bytes(data)
        if actual != sha256:
            raise DigestMismatchError(f"{location}: sha256 {actual[:16]}... differs from the expected "
                                      f"{sha256[:16]}...; the object was changed after it was written")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{sha256}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
        self.fills += 1
        self.evict(keep=dest)
        return dest

    def tree(self, location: str | Path, key: str, verify, only: list[str] | None = None) -> Path:
        """A local copy of the remote folder ``location`` (or of the files ``only`` in it) stored
        under ``key``; ``verify(path)`` must accept the downloaded folder (e.g. compare its digest
        with its record)."""
        dest = self.root / "trees" / key
        if (dest / ".complete").is_file():
            self.hits += 1
            os.utime(dest / ".complete")
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{key}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            download_tree(location, tmp, only)
            verify(tmp)
            (tmp / ".complete").write_text("")
            if dest.exists() and not (dest / ".complete").is_file():  # an incomplete earlier copy
                shutil.rmtree(dest, ignore_errors=True)
            try:
                os.replace(tmp, dest)
            except OSError:
                if not (dest / ".complete").is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process filled it meanwhile
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.fills += 1
        self.evict(keep=dest)
        return dest

    def entries(self) -> list[tuple[float, int, Path]]:
        """``(last used, bytes, path)`` of every complete entry (one removed meanwhile by another
        process is left out)."""
        out = []
        for p in (self.root / "files").glob("[!.]*") if (self.root / "files").is_dir() else []:
            with contextlib.suppress(FileNotFoundError):
                st = p.stat()
                out.append((st.st_mtime, st.st_size, p))
        for p in (self.root / "trees").glob("[!.]*") if (self.root / "trees").is_dir() else []:
            with contextlib.suppress(FileNotFoundError):
                used = (p / ".complete").stat().st_mtime
                out.append((used, sum(f.stat().st_size for f in p.rglob("*") if f.is_file()), p))
        return out

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Remove least recently used entries until the cache is under its bound."""
        entries = sorted(self.entries())
        total = sum(size for _, size, _ in entries)
        removed = []
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            if keep is not None and path == keep:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            total -= size
            removed.append(path)
        return removed


def local_input(location: str | Path) -> Path:
    """A local path for an input the user names (a file or a folder): the path itself when local,
    else a cached copy keyed by the remote listing (names, sizes and modification times), so a
    changed input is fetched again and an unchanged one once."""
    if not is_remote(location):
        return Path(normalize(location))
    import pyarrow.fs as pafs

    fs, path, info = _info(location)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{location}: not found")
    if info.type == pafs.FileType.File:
        listing = [(name_of(location), info.size, str(info.mtime))]
    else:
        base = path.rstrip("/") + "/"
        listing = sorted((i.path[len(base):], i.size, str(i.mtime))
                         for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                         if i.type == pafs.FileType.File)
    key = _sha256_bytes(json.dumps([normalize(location), listing]).encode())[:32]
    if info.type == pafs.FileType.File:
        folder = LocalCache().tree(_parent(location), key, _exists(name_of(location)), only=[name_of(location)])
        return folder / name_of(location)
    return LocalCache().tree(location, key, lambda p: None)


def _exists(name: str):
    def verify(folder: Path) -> None:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{name}: vanished while it was copied")
    return verify


def _parent(location: str | Path) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[0]


__all__ = ["LocalCache", "PENDING_FILE", "SCHEMES", "StorageError", "atomic_write_bytes", "cache_root", "delete", "download_tree",
           "exists", "filesystem", "is_dir", "is_file", "is_remote", "join", "list_files",
           "local_input", "local_home", "move", "name_of", "normalize", "owned_by", "publish", "read_bytes", "read_json",
           "read_ranged", "scheme_of", "sha256", "size", "upload_file", "write_bytes"]
