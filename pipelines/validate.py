"""``controlset validate``: every tar readable, every sample complete,
manifests and stats agree."""

from __future__ import annotations

import io
import json
import posixpath
from collections import Counter
from dataclasses import dataclass, field

from PIL import Image

from pipelines.dataset import iter_tar, list_shards, read_stats
from pipelines.finalize import FAILURES_FILE, FILTERED_FILE
from pipelines.writer import TAR_BYTES_META, read_table
from schemas import REQUIRED_META_KEYS, is_valid_key


@dataclass
class ValidationReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        verdict = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        return f"{self.shards} shard(s), {self.samples} sample(s): {verdict}"


def _image_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.size


def _check_sample(shard: str, key: str, members: dict[str, bytes], row: dict | None, report: ValidationReport) -> None:
    where = f"{shard}: {key}"
    if not is_valid_key(key):
        report.problems.append(f"{where}: invalid key")
    for required in ("jpg", "txt", "json"):
        if required not in members:
            report.problems.append(f"{where}: missing member {required}")
    if "jpg" not in members or "json" not in members:
        return
    try:
        size = _image_size(members["jpg"])
        meta = json.loads(members["json"])
    except Exception as exc:
        report.problems.append(f"{where}: unreadable jpg/json ({exc})")
        return
    missing = [k for k in REQUIRED_META_KEYS if k not in meta]
    if missing:
        report.problems.append(f"{where}: json lacks {', '.join(missing)}")
    if (meta.get("width"), meta.get("height")) != size:
        report.problems.append(f"{where}: json size {meta.get('width')}x{meta.get('height')} != jpg {size}")
    declared = {m for a in meta.get("annotators", {}).values() for m in a.get("members", [])}
    for member in sorted(declared - {"txt"}):
        if member not in members:
            report.problems.append(f"{where}: annotator member {member} missing")
    for name, data in members.items():
        if name.endswith(".png"):
            try:
                if _image_size(data) != size:
                    report.problems.append(f"{where}: {name} size differs from jpg {size}")
            except Exception as exc:
                report.problems.append(f"{where}: unreadable {name} ({exc})")
    if row is None:
        report.problems.append(f"{where}: not in the manifest")
    elif sorted(members) != sorted(row["members"]):
        report.problems.append(f"{where}: members differ from the manifest")


def validate_dataset(dataset: str) -> ValidationReport:
    """Read every shard fully and cross-check manifests, failures and stats."""
    fs, root, shards = list_shards(dataset)
    report = ValidationReport(shards=len(shards))
    seen_keys: Counter[str] = Counter()
    shard_failures = 0
    for name in shards:
        manifest_path = posixpath.join(root, f"{name}.parquet")
        rows: dict[str, dict] = {}
        if fs.exists(manifest_path):
            table = read_table(fs, manifest_path)
            rows = {r["key"]: r for r in table.to_pylist()}
            if len(rows) != table.num_rows:
                report.problems.append(f"{name}: manifest lists a key more than once")
            recorded = (table.schema.metadata or {}).get(TAR_BYTES_META)
            tar_path = posixpath.join(root, f"{name}.tar")
            actual = fs.size(tar_path) if recorded is not None and fs.exists(tar_path) else None
            if actual is not None and actual != int(recorded):
                report.problems.append(f"{name}.tar: {actual} bytes, the manifest says {int(recorded)}")
        else:
            report.problems.append(f"{name}: manifest {name}.parquet missing")
        keys = []
        try:
            for key, members in iter_tar(fs, posixpath.join(root, f"{name}.tar")):
                keys.append(key)
                _check_sample(name, key, members, rows.get(key) if rows else None, report)
        except Exception as exc:
            report.problems.append(f"{name}.tar: unreadable ({type(exc).__name__}: {exc})")
        if rows and set(rows) != set(keys):
            report.problems.append(f"{name}: manifest has {len(rows)} keys, tar has {len(keys)}")
        seen_keys.update(keys)
        report.samples += len(keys)
        fpath = posixpath.join(root, f"{name}.failures.parquet")
        if fs.exists(fpath):
            shard_failures += read_table(fs, fpath).num_rows
    dups = [k for k, n in seen_keys.items() if n > 1]
    if dups:
        report.problems.append(f"{len(dups)} key(s) appear in more than one sample, e.g. {dups[0]}")
    try:
        stats = read_stats(fs, root)
    except Exception as exc:
        report.problems.append(f"stats.json unreadable ({exc})")
        return report
    counts = {}
    for label, fname in (("failed", FAILURES_FILE), ("filtered", FILTERED_FILE)):
        path = posixpath.join(root, fname)
        if fs.exists(path):
            table = read_table(fs, path)
            counts[label] = table.num_rows
            by_reason = dict(Counter(table.column("reason").to_pylist()))
            if by_reason != stats.get(f"{label}_by_reason"):
                report.problems.append(f"stats.json {label}_by_reason disagrees with {fname}")
        else:
            report.problems.append(f"{fname} missing")
    if shard_failures > sum(counts.values()):
        report.problems.append(f"shards' failure files hold {shard_failures} records, "
                               f"the run's records only {sum(counts.values())}")
    if stats.get("written") != report.samples:
        report.problems.append(f"stats.json says {stats.get('written')} written, shards hold {report.samples}")
    for label in ("failed", "filtered"):
        if label in counts and stats.get(label) != counts[label]:
            report.problems.append(f"stats.json says {stats.get(label)} {label}, {label} records: {counts[label]}")
    if stats.get("inputs") != stats.get("written", 0) + stats.get("filtered", 0) + stats.get("failed", 0):
        report.problems.append("stats.json: inputs != written + filtered + failed")
    if stats.get("shards") != len(shards):
        report.problems.append(f"stats.json says {stats.get('shards')} shards, found {len(shards)}")
    return report
