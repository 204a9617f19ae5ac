"""Reading a dataset folder written by ``controlset annotate``."""

from __future__ import annotations

import json
import posixpath
import re
import tarfile
from typing import Iterator

import fsspec
from fsspec.core import url_to_fs

_SHARD_RE = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{6})\.tar$")


def list_shards(dataset: str) -> tuple[object, str, list[str]]:
    """(filesystem, root, shard base names without .tar), sorted."""
    fs, root = url_to_fs(dataset)
    if not fs.isdir(root):
        from schemas.errors import UsageError

        raise UsageError(f"dataset {dataset!r} is not a folder")
    names = sorted(
        posixpath.basename(p)[: -len(".tar")]
        for p in fs.ls(root, detail=False)
        if _SHARD_RE.match(posixpath.basename(p))
    )
    return fs, root, names


def iter_tar(fs, path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {member: bytes}) for each sample of a shard, in tar order.
    Members with unsafe names are skipped."""
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
        key, members = None, {}
        for info in tf:
            if not info.isfile() or info.name.startswith("/") or ".." in info.name.split("/"):
                continue
            base = info.name
            k, _, ext = base.partition(".")
            if key is not None and k != key:
                yield key, members
                members = {}
            key = k
            members[ext] = tf.extractfile(info).read()
        if key is not None:
            yield key, members


def read_stats(fs, root: str) -> dict:
    with fs.open(posixpath.join(root, "stats.json"), "rb") as f:
        return json.load(f)


def open_dataset_file(dataset: str, name: str):
    return fsspec.open(posixpath.join(dataset, name), "rb")
