"""Shard writing: deterministic tars, manifests and per-shard failure files,
each written to a temporary name and renamed into place.

Commit order per shard: the tar, then its failures file (if any), then the
manifest last. The manifest carries the shard's plan digest, so a shard counts
as finished only when its manifest matches the current plan *and* its tar
exists; a run killed at any point leaves either a finished shard or one that
the next run redoes, never a partial ``.tar`` under its final name.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import FailureRecord, manifest_table, records_table
from schemas.files import TMP_MARK, atomic_write_bytes, commit, remove_quietly, tmp_path

#: Fixed member mtime (2020-01-01T00:00:00Z) so equal inputs give equal bytes.
TAR_MTIME = 1577836800
DIGEST_META = b"controlset.plan_digest"
FAILED_META = b"controlset.failed"
#: the tar's size in bytes, checked on resume (a tar replaced or cut short
#: after its manifest was written is not taken as complete)
TAR_BYTES_META = b"controlset.tar_bytes"


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}"


def atomic_write_table(fs, path: str, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(fs, path, sink.getvalue().to_pybytes())


def read_parquet_file(fs, path: str) -> pq.ParquetFile:
    """Open a parquet file from any fsspec filesystem.

    The bytes are read here and decoded on the calling thread: when Arrow's
    thread pool holds the last reference to a Python-owned buffer it must take
    the GIL to free it, and if that happens while the interpreter exits the
    process aborts ("terminate called without an active exception").
    Manifests and record files are small, so threads buy nothing here.
    """
    with fs.open(path, "rb") as f:
        data = f.read()
    return pq.ParquetFile(pa.BufferReader(data), pre_buffer=False)


def read_table(fs, path: str) -> pa.Table:
    """A whole parquet file as a table (see :func:`read_parquet_file`)."""
    return read_parquet_file(fs, path).read(use_threads=False)


@dataclass
class ShardSummary:
    """What a shard holds: written sample count and its failure records."""

    name: str
    written: int
    failures: list[FailureRecord] = field(default_factory=list)
    skipped: bool = False  # already complete from an earlier run


class ShardWriter:
    """Streams one shard's samples into a temporary tar, then commits the tar,
    its failures and its manifest (see the module docstring for the order).

    Samples must be added in key order (the caller processes a shard's
    planned samples sorted by key), so the bytes depend only on the shard's
    content, and memory stays bounded by one sample.
    """

    def __init__(self, fs, root: str, name: str) -> None:
        import webdataset as wds  # imports torch: only the writing worker pays for it

        self.fs, self.root, self.name = fs, root, name
        self.tar_path = posixpath.join(root, f"{name}.tar")
        self.tmp = tmp_path(self.tar_path)
        self.rows: list = []
        self.failures: list[FailureRecord] = []
        self._last_key = ""
        self._file = fs.open(self.tmp, "wb")
        self._sink = wds.TarWriter(self._file, user="controlset", group="controlset", mtime=TAR_MTIME,
                                   encoder=False)

    def add(self, sample) -> None:  # EncodedSample
        if sample.key <= self._last_key:
            raise ValueError(f"samples must be added in increasing key order ({sample.key} after {self._last_key})")
        self._last_key = sample.key
        self._sink.write({"__key__": sample.key, **sample.members})
        self.rows.append(sample.row)

    def add_failure(self, record: FailureRecord) -> None:
        self.failures.append(record)

    def commit(self, digest: str) -> ShardSummary:
        """Make the shard final: tar, failures, then the manifest, which marks
        it complete. An earlier run's manifest goes first, so a crash between
        the steps never leaves a new tar beside an old plan's manifest."""
        manifest_path = posixpath.join(self.root, f"{self.name}.parquet")
        try:
            self._sink.close()
            self._file.close()
            remove_quietly(self.fs, manifest_path)
            commit(self.fs, self.tmp, self.tar_path)
            tar_bytes = self.fs.size(self.tar_path)
        except BaseException:
            self.abort()
            raise
        failures = sorted(self.failures, key=FailureRecord.sort_key)
        failures_path = posixpath.join(self.root, f"{self.name}.failures.parquet")
        if failures:
            atomic_write_table(self.fs, failures_path, records_table(failures))
        else:
            remove_quietly(self.fs, failures_path)
        table = manifest_table(self.rows).replace_schema_metadata(
            {DIGEST_META: digest.encode(), FAILED_META: str(len(failures)).encode(),
             TAR_BYTES_META: str(tar_bytes).encode()}
        )
        atomic_write_table(self.fs, manifest_path, table)
        return ShardSummary(self.name, len(self.rows), failures)

    def abort(self) -> None:
        # the tar stream first (its end blocks go to the file about to be
        # removed), so that it does not try to write to a closed file when
        # it is collected
        for close in (self._sink.close, self._file.close):
            try:
                close()
            except Exception:
                pass
        remove_quietly(self.fs, self.tmp)


def write_shard(
    fs,
    root: str,
    name: str,
    samples: Sequence,  # EncodedSample
    failures: Sequence[FailureRecord],
    digest: str,
) -> ShardSummary:
    """Write one shard (tar + manifest + failures) atomically, samples in key order."""
    writer = ShardWriter(fs, root, name)
    try:
        for s in sorted(samples, key=lambda s: s.key):
            writer.add(s)
        for r in failures:
            writer.add_failure(r)
    except BaseException:
        writer.abort()
        raise
    return writer.commit(digest)


def shard_is_complete(fs, root: str, name: str, digest: str) -> bool:
    """True if the shard on disk was written by a run with the same plan."""
    manifest = posixpath.join(root, f"{name}.parquet")
    try:
        if not fs.exists(manifest) or not fs.exists(posixpath.join(root, f"{name}.tar")):
            return False
        meta = read_parquet_file(fs, manifest).schema_arrow.metadata or {}
        if meta.get(DIGEST_META, b"").decode() != digest:
            return False
        if TAR_BYTES_META in meta and int(meta[TAR_BYTES_META]) != fs.size(posixpath.join(root, f"{name}.tar")):
            return False
        if int(meta.get(FAILED_META, b"0")) > 0:
            return fs.exists(posixpath.join(root, f"{name}.failures.parquet"))
        return True
    except Exception:
        return False


def read_shard_summary(fs, root: str, name: str) -> ShardSummary:
    """Summary of a finished shard, read back from its manifest and failures."""
    written = read_parquet_file(fs, posixpath.join(root, f"{name}.parquet")).metadata.num_rows
    failures: list[FailureRecord] = []
    fpath = posixpath.join(root, f"{name}.failures.parquet")
    if fs.exists(fpath):
        for row in read_table(fs, fpath).to_pylist():
            failures.append(FailureRecord(**row))
    return ShardSummary(name, written, failures, skipped=True)


def write_json(fs, path: str, obj) -> None:
    atomic_write_bytes(fs, path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())



__all__ = [
    "ShardSummary",
    "atomic_write_bytes",
    "atomic_write_table",
    "read_shard_summary",
    "shard_is_complete",
    "shard_name",
    "write_json",
    "write_shard",
]
