"""The ``ray`` engine of the clean and shard stages: Ray Data pipelines on the cluster of
``launch.ray_address`` (or a local Ray), with the local engine's output by construction.

Every task runs the tokenization library's own per-block code (the same functions the local
engine runs), so documents, their order, the split and the token ids cannot differ. Ray Data
schedules the tasks (one CPU each, at most ``ray_workers`` at a time), retries a task whose worker
died (its default for map tasks: a system failure is retried, an exception the code raised is
not), keeps intermediate blocks in the object store (spilling to disk) and runs the one shuffle.

clean (``clean_ray``)
  1. ``plan_parts`` cuts the input files into parts of about ``clean.ray_block_bytes``
     (line-aligned byte ranges of uncompressed text and JSON lines, row groups of Parquet; a
     gzipped file is one part). ``map_batches`` over one row per part runs ``PartCleaner``: chunks
     of documents with their global order ``(part << 40) + position``, 16-byte key, words and
     characters, then one trailer row with the part's counters. The result is materialised.
  2. Global exact deduplication: only ``(key, order)`` rows are shuffled,
     ``groupby("key").aggregate(Count, Min(order))``; the keys seen more than once come back to
     the driver with their first order (texts never move for it).
  3. ``map_batches`` drops every repeat but the first (``keep_first_occurrences``) and the driver
     streams the kept documents, in order (``preserve_order``), into the local engine's
     ``DocumentWriter``: the same ``documents.parquet``, byte for byte, and the same record.

shard (``shard_ray``)
  1. ``documents.parquet`` is cut into blocks of row groups (about ``shard.ray_block_bytes`` of
     text each). A first pass computes the split keys in the workers and returns only those below
     ``validation_positions``' bound, so the split is the local engine's without all keys on one
     machine.
  2. A second pass encodes each block with the tokenizer (its JSON travels with the task, so
     every worker has the same one) in ``shard.batch_documents`` batches, and writes the block's
     shards straight to the staging location: the staging folder, or for an object-store output a
     hidden prefix inside it that ``staging_dir`` moves into place when it publishes (record
     last, nothing partial visible). Shards are named ``<split>-<block>-<n>.arrow``; the manifest
     lists them in document order, so the token stream of each split is the local engine's.

By hand rather than with Ray Data's readers and writers: the inputs are read by the formats'
readers inside ``map_batches`` (``read_text``/``read_json`` decode differently: no count of
replaced bytes, no line numbers in errors, whole lines in memory), and documents.parquet by row
group ranges (a block must know its documents' global positions, which ``read_parquet`` does not
give); documents.parquet is one file written by the driver (``write_parquet`` writes a folder of
part files: not the stage's output); shards are written inside the encoding task (a shard's name,
cut and sha256 go into the manifest; a custom ``Datasink`` would wrap the same code).

On a cluster of several nodes every location a worker opens must be reachable from all of them:
inputs and the shard output must then be URIs (``s3://``, ``gs://``, ...), which is checked first.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from common import storage
from common.artifacts import check_outside_inputs, shared_staging, staging_dir
from common.config import ConfigError, PipelineConfig, from_dict, to_dict
from common.config.data import CleanConfig
from tokenization import clean as cleaning
from tokenization import shards as sharding
from tokenization.cleaner import SourceStats
from tokenization.formats import Part

from .parallel import ray_session

STATS = "stats"  # the trailer row's column: the part's counters as JSON (null on document rows)
PART_SCHEMA = cleaning.CHUNK_SCHEMA.append(pa.field(STATS, pa.string()))
TRAILER = (1 << cleaning.ORDER_BITS) - 1  # the trailer's position inside its part: after every document
RETRY_ADVICE = "\nFailed to "  # where Ray Data's note on retries starts in a task's error message
SHUFFLE_ENV = "RAY_DATA_DEFAULT_SHUFFLE_STRATEGY"  # set, it chooses the dedup shuffle instead of us


@contextlib.contextmanager
def ray_data(cfg: PipelineConfig, progress: bool = False) -> Iterator[None]:
    """Ray (``ray_session`` with the launch section's address and niceness) with Ray Data set to
    keep blocks in order; an exception a task raised comes out as itself (one line for bad input)."""
    import ray.data
    from ray.data.context import ShuffleStrategy

    with ray_session(cfg.launch.ray_address, worker_niceness=cfg.launch.worker_niceness):
        ctx = ray.data.DataContext.get_current()
        saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.shuffle_strategy
        # Blocks come back in the order of their inputs: documents in (file, offset) order.
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = True, progress
        if SHUFFLE_ENV not in os.environ:
            # The dedup shuffle moves 24 bytes per document: Ray's task-based sort shuffle starts no
            # actors (its default hash shuffle took seconds more per run to start them).
            ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
        try:
            yield
        except Exception as exc:  # noqa: BLE001  (re-raised: the task's own exception, unwrapped)
            unwrapped = task_error(exc)
            if unwrapped is exc:
                raise
            raise unwrapped from None
        finally:
            ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.shuffle_strategy = saved


def task_error(error: BaseException) -> BaseException:
    """The exception a Ray task raised, out of Ray's wrappers, with the retry advice Ray Data
    appends to its message taken off again (a ``DataError`` keeps its type and its one-line
    message); other errors pass unchanged."""
    import ray.exceptions

    wrapped = False
    while isinstance(error, ray.exceptions.RayTaskError) and getattr(error, "cause", None) not in (None, error):
        error, wrapped = error.cause, True
    if wrapped and error.args and isinstance(error.args[0], str) and RETRY_ADVICE in error.args[0]:
        error.args = (error.args[0].split(RETRY_ADVICE, 1)[0],) + error.args[1:]
    return error


def check_reachable(locations: dict[str, str], field: str) -> None:
    """On a Ray cluster of several nodes, refuse local paths that workers must open (another node's
    worker would not find them); every location must be a URI there."""
    import ray

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    for what, location in locations.items():
        if nodes > 1 and not storage.is_remote(location):
            raise ConfigError(field, f"ray: the cluster has {nodes} nodes and its workers open the {what} "
                                     f"themselves, but {location} is a local path; give a URI (s3://, gs://, ...)")


def _rows(batch: dict[str, np.ndarray], *keys: str) -> Iterator[tuple]:
    return zip(*(batch[k].tolist() for k in keys))


def _compute(workers: int):
    import ray.data

    return ray.data.TaskPoolStrategy(size=workers) if workers > 0 else None


def _collect(dataset) -> pa.Table | None:
    """All blocks of ``dataset`` as one table (None when it has no rows)."""
    tables = [t for t in dataset.iter_batches(batch_size=None, batch_format="pyarrow") if t.num_rows]
    return pa.concat_tables(tables) if tables else None


# ----------------------------------------------------------------------------- clean


def clean_ray(cfg: PipelineConfig, out_dir: str | Path, *, progress: bool = False) -> dict[str, Any]:
    """Clean ``clean.inputs`` into ``out_dir/documents.parquet`` with Ray Data (see the module
    docstring); returns the stage record plus the wall time in ``seconds``."""
    import ray
    import ray.data

    t0 = time.perf_counter()
    cc = cfg.clean
    check_outside_inputs(out_dir, cc.inputs)
    files = cleaning.list_input_files(cc.inputs, copies=False)  # workers read the inputs where they lie
    in_digest, listing = cleaning.inputs_digest(files)
    tasks = [{"index": k, "file": i, "start": part.start, "end": part.end, "location": files[i].location,
              "name": files[i].name, "source": files[i].source, "kind": files[i].kind, "size": files[i].size}
             for k, (i, part) in enumerate(cleaning.plan_parts(files, cc.ray_block_bytes))]
    with ray_data(cfg, progress), staging_dir(out_dir, cleaning.STAGE) as tmp:
        check_reachable({f"input file {f.name}": f.location for f in files}, "clean.inputs")
        cleaned = ray.data.from_items(tasks, override_num_blocks=len(tasks)).map_batches(
            clean_parts, batch_size=1, batch_format="numpy", compute=_compute(cc.ray_workers), num_cpus=1,
            fn_kwargs={"cfg": to_dict(cc)}).materialize()
        repeated = None
        if cc.deduplicate:
            partitions = cc.ray_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
            table = _collect(repeated_keys(cleaned, partitions))
            repeated = ray.put(table) if table is not None else None
        writer = cleaning.DocumentWriter(tmp / cleaning.DOCUMENTS_FILE, cc)
        trailers = []
        kept = cleaned.map_batches(keep_documents, batch_format="pyarrow", fn_kwargs={"repeated": repeated})
        for batch in kept.iter_batches(batch_size=None, batch_format="pyarrow"):
            is_trailer = pc.is_valid(batch.column(STATS))
            writer.write(batch.filter(pc.invert(is_trailer)))
            trailers += batch.filter(is_trailer).select(["order", STATS]).to_pylist()
        parts = []
        for row in sorted(trailers, key=lambda r: r["order"]):
            part = json.loads(row[STATS])
            parts.append((part["file"], SourceStats(**part["stats"]), part["documents"]))
        record = cleaning.finish_clean(cc, tmp, files, listing, in_digest, parts, writer)
    return dict(record, seconds=time.perf_counter() - t0)


def clean_parts(batch: dict[str, np.ndarray], cfg: dict) -> Iterator[pa.Table]:
    """The task of one part (a row of ``clean_ray``'s plan): its chunks, then its trailer row."""
    clean_cfg = from_dict(CleanConfig, cfg)
    cleaner = cleaning.PartCleaner(clean_cfg)
    for index, i, start, end, location, name, source, kind, size in _rows(
            batch, "index", "file", "start", "end", "location", "name", "source", "kind", "size"):
        f = cleaning.InputFile(location, name, source, kind, size)
        for chunk in cleaner.run(f, Part(start, end), index):
            yield chunk.append_column(STATS, pa.nulls(chunk.num_rows, pa.string()))
        counters = json.dumps({"file": i, "documents": cleaner.documents, "stats": vars(cleaner.stats)})
        yield pa.Table.from_arrays([
            pa.array([(index << cleaning.ORDER_BITS) + TRAILER], pa.int64()), pa.nulls(1, pa.string()),
            pa.array([source], pa.string()), pa.nulls(1, pa.binary()), pa.array([0], pa.int32()),
            pa.array([0], pa.int32()), pa.array([counters], pa.string())], schema=PART_SCHEMA)


def _documents(chunk: pa.Table) -> pa.Table:
    return chunk.filter(pc.is_null(chunk.column(STATS)))


def _keys(chunk: pa.Table) -> pa.Table:
    return _documents(chunk).select(["key", "order"])


def _repeated(groups: pa.Table) -> pa.Table:
    return groups.filter(pc.greater(groups.column("count"), 1)).select(["key", "first"])


def repeated_keys(cleaned, partitions: int):
    """The shuffle of deduplication: every key that occurs more than once, with the smallest order
    it occurs at (columns ``key``, ``first``); only keys and orders travel."""
    from ray.data.aggregate import Count, Min

    groups = cleaned.map_batches(_keys, batch_format="pyarrow").groupby("key", num_partitions=partitions)
    counted = groups.aggregate(Count(alias_name="count"), Min("order", alias_name="first"))
    return counted.map_batches(_repeated, batch_format="pyarrow")


def keep_documents(chunk: pa.Table, repeated) -> pa.Table:
    """A block of cleaned documents without repeats (``repeated``: an object reference to
    ``repeated_keys``' table, or None when nothing repeats), then its trailer rows."""
    import ray

    docs = _documents(chunk)
    if repeated is not None:
        docs = cleaning.keep_first_occurrences(docs, ray.get(repeated))
    return pa.concat_tables([docs, chunk.filter(pc.is_valid(chunk.column(STATS)))])


# ----------------------------------------------------------------------------- shard


def document_blocks(documents: str | Path, block_bytes: int) -> list[tuple[int, int, int, int]]:
    """``(first position, first row group, end row group, documents)`` of consecutive row groups of
    about ``block_bytes`` each of ``documents.parquet``."""
    meta = cleaning.open_documents(documents).metadata
    blocks, start, first, rows, size = [], 0, 0, 0, 0
    for g in range(meta.num_row_groups):
        size += meta.row_group(g).total_byte_size
        rows += meta.row_group(g).num_rows
        if size >= block_bytes or g == meta.num_row_groups - 1:
            blocks.append((first, start, g + 1, rows))
            first, start, rows, size = first + rows, g + 1, 0, 0
    return blocks


def shard_ray(cfg: PipelineConfig, documents: str | Path, tokenizer: str | Path, out_dir: str | Path, *,
              progress: bool = False) -> dict[str, Any]:
    """Encode the cleaned documents into train/valid shards with Ray Data (see the module
    docstring); returns the stage record with the manifest, plus the wall time in ``seconds``."""
    import ray.data

    t0 = time.perf_counter()
    sc = cfg.shard
    plan = sharding.shard_plan(documents, tokenizer, out_dir, copies=False)
    location = str(plan.documents)  # workers read the documents where they lie
    blocks = document_blocks(plan.documents, sc.ray_block_bytes)
    items = [{"block": b, "position": first, "start": start, "end": end}
             for b, (first, start, end, _) in enumerate(blocks)]
    common = {"location": location, "batch_documents": sc.batch_documents}
    with ray_data(cfg, progress):
        check_reachable({"documents": location, "output": str(out_dir)}, "shard.engine")

        def tasks(rows: list[dict]):
            return ray.data.from_items(rows, override_num_blocks=len(rows))

        def candidates(bound: int) -> tuple[np.ndarray, np.ndarray]:
            found = _collect(tasks(items).map_batches(
                split_candidates, batch_size=1, batch_format="numpy", compute=_compute(sc.ray_workers),
                num_cpus=1, fn_kwargs=dict(common, seed=sc.split_seed, bound=bound)))
            if found is None:
                return np.zeros(0, np.int64), np.zeros(0, np.uint64)
            return found.column("position").to_numpy(), found.column("key").to_numpy()

        valid = sharding.validation_positions(plan.num_docs, sc.validation_fraction, candidates)
        for item, (first, _, _, rows) in zip(items, blocks):
            # As bytes: one column type for every block, however many validation documents it has.
            item["valid"] = (valid[(valid >= first) & (valid < first + rows)] - first).astype("<i8").tobytes()
        with staging_dir(out_dir, sharding.STAGE) as tmp:
            target = shared_staging(out_dir, tmp)
            written = _collect(tasks(items).map_batches(
                encode_block, batch_size=1, batch_format="numpy", compute=_compute(sc.ray_workers), num_cpus=1,
                # One tokenizers thread per task of one CPU (shard.num_threads overrides).
                runtime_env={"env_vars": {"RAYON_NUM_THREADS": str(sc.num_threads or 1)}},
                fn_kwargs=dict(common, tokenizer=plan.tokenizer_path.read_text(encoding="utf-8"),
                               target=target, dtype=plan.dtype.name,
                               shard_tokens=sc.shard_tokens, metadata=plan.metadata)))
            shards: dict[str, list[dict[str, Any]]] = {s: [] for s in sharding.SPLITS}
            for row in sorted(written.to_pylist(), key=lambda r: (r["block"], r["number"])):
                shards[row["split"]].append({k: row[k] for k in ("file", "documents", "tokens", "words", "sha256")})
            # What a killed attempt left (a temporary file of an unfinished write) is not published.
            listed = {e["file"] for entries in shards.values() for e in entries}
            for name in storage.list_files(target):
                if name not in listed:
                    storage.delete(storage.join(target, name))
            record = sharding.finish_shards(plan, sc, tmp, shards)
    return dict(record, seconds=time.perf_counter() - t0)


def split_candidates(batch: dict[str, np.ndarray], location: str, batch_documents: int, seed: int,
                     bound: int) -> Iterator[pa.Table]:
    """The first pass of ``shard_ray``: positions and split keys of a block's documents whose key
    is below ``bound``."""
    for first, start, end in _rows(batch, "position", "start", "end"):
        offset = first
        for texts in cleaning.iter_documents(location, batch_size=batch_documents, row_groups=range(start, end)):
            keys = sharding.split_keys(texts, seed)
            hit = np.flatnonzero(sharding.below(keys, bound))
            yield pa.table({"position": pa.array(hit + offset, pa.int64()), "key": pa.array(keys[hit], pa.uint64())})
            offset += len(texts)


def encode_block(batch: dict[str, np.ndarray], location: str, batch_documents: int, tokenizer: str, target: str,
                 dtype: str, shard_tokens: int, metadata: dict) -> Iterator[pa.Table]:
    """The second pass of ``shard_ray``: encode a block's documents and write its shards to
    ``target``; yields a row per shard written (block, split, number and its manifest entry)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer)
    token_type = np.dtype(dtype)
    for block, start, end, valid in _rows(batch, "block", "start", "end", "valid"):
        store = sharding.store_at(target)
        writers = {s: sharding.ShardWriter(s, token_type, shard_tokens, metadata, store, prefix=f"{block:05d}-")
                   for s in sharding.SPLITS}
        offset = 0
        chosen = np.frombuffer(valid, dtype="<i8")
        for texts in cleaning.iter_documents(location, batch_size=batch_documents, row_groups=range(start, end),
                                             split_row_groups=True):
            is_valid = np.zeros(len(texts), dtype=bool)
            is_valid[chosen[(chosen >= offset) & (chosen < offset + len(texts))] - offset] = True
            sharding.route(writers, is_valid, *sharding.encode_documents(tok, texts, token_type))
            offset += len(texts)
        rows = []
        for split, writer in writers.items():
            writer.flush()
            rows += [dict(entry, block=block, split=split, number=n) for n, entry in enumerate(writer.shards)]
        if rows:
            yield pa.Table.from_pylist(rows)


__all__ = ["check_reachable", "clean_parts", "clean_ray", "document_blocks", "encode_block", "keep_documents",
           "ray_data", "repeated_keys", "shard_ray", "split_candidates", "task_error"]
