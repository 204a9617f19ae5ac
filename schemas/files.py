"""Files as every controlset command handles them.

Atomic writes on any fsspec filesystem, the way every controlset file is
published (shards, manifests, records, stats, latent caches): the bytes go to
a temporary name beside the target, which is then renamed into place, so a
reader never sees a partial file under its final name and a killed run
leaves only temporaries (marked by :data:`TMP_MARK`) behind. And the
``--config`` YAML files of the commands."""

from __future__ import annotations

import os
import posixpath
import uuid

from schemas.errors import UsageError

#: Part of every temporary file name (``.<name>.tmp-<random>``): left-overs
#: of killed runs are recognised and removed by it.
TMP_MARK = ".tmp-"


def tmp_path(path: str) -> str:
    """A fresh temporary name beside ``path``."""
    d, b = posixpath.split(path)
    return posixpath.join(d, f".{b}{TMP_MARK}{uuid.uuid4().hex[:12]}")


def commit(fs, tmp: str, path: str) -> None:
    """Publish the finished temporary file ``tmp`` as ``path``."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        # the bytes reach the disk before the name does, and the rename
        # itself is made durable: after a power cut a final name never
        # points at a file cut short
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)  # atomic within one filesystem
        _fsync(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    else:
        fs.mv(tmp, path)  # object stores publish an object only once it is complete


def _fsync(path: str, flags: int) -> None:
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. folders cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_quietly(fs, path: str) -> None:
    """Remove ``path`` if it exists; errors are ignored (used to clean up)."""
    try:
        if fs.exists(path):
            fs.rm(path)
    except Exception:
        pass


def atomic_write_bytes(fs, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary name, then rename)."""
    tmp = tmp_path(path)
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        commit(fs, tmp, path)
    except BaseException:
        remove_quietly(fs, tmp)
        raise


def read_yaml_mapping(path: str, what: str = "a mapping") -> dict:
    """A ``--config`` YAML file that must hold a mapping (empty file: {})."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as exc:
        raise UsageError(f"cannot read --config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"--config {path} must hold {what}")
    return data
