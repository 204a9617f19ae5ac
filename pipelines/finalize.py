"""The last step of a run: failure and filter tables, ``stats.json``, and
removal of shards left over from an earlier, larger plan."""

from __future__ import annotations

import posixpath
import re
from collections import Counter
from typing import Any, Sequence

from pipelines.writer import TMP_MARK, ShardSummary, atomic_write_table, write_json
from schemas import FAILED, FILTERED, FailureRecord, records_table

STATS_FILE = "stats.json"
FAILURES_FILE = "failures.parquet"
FILTERED_FILE = "filtered.parquet"


def _sorted_records(records: Sequence[FailureRecord]) -> list[FailureRecord]:
    return sorted(records, key=FailureRecord.sort_key)


def remove_stale(fs, root: str, prefix: str, num_shards: int) -> list[str]:
    """Delete shards numbered >= ``num_shards`` (from an earlier run over
    more inputs) and temporary files of interrupted writes."""
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d{{6}})\.(tar|parquet|failures\.parquet)$")
    removed = []
    for path in fs.ls(root, detail=False):
        base = posixpath.basename(path)
        m = pattern.match(base)
        if (m and int(m.group(1)) >= num_shards) or (base.startswith(".") and TMP_MARK in base):
            fs.rm(path)
            removed.append(base)
    return sorted(removed)


def finalize(
    fs,
    root: str,
    *,
    prefix: str,
    inputs: int,
    num_shards: int,
    early_records: Sequence[FailureRecord],
    summaries: Sequence[ShardSummary],
    run_info: dict[str, Any],
) -> dict[str, Any]:
    """Write ``failures.parquet``, ``filtered.parquet`` and ``stats.json``.

    ``early_records`` are the records from before shard planning (read,
    decode-header, filter and dedup stages); the shard summaries carry the
    records of samples that failed later. ``inputs == written + filtered +
    failed`` is checked, not assumed.
    """
    remove_stale(fs, root, prefix, num_shards)
    records = list(early_records)
    for s in summaries:
        records.extend(s.failures)
    failed = _sorted_records([r for r in records if r.kind == FAILED])
    filtered = _sorted_records([r for r in records if r.kind == FILTERED])
    written = sum(s.written for s in summaries)
    atomic_write_table(fs, posixpath.join(root, FAILURES_FILE), records_table(failed))
    atomic_write_table(fs, posixpath.join(root, FILTERED_FILE), records_table(filtered))
    stats = {
        "inputs": int(inputs),
        "written": int(written),
        "filtered": len(filtered),
        "failed": len(failed),
        "filtered_by_reason": dict(sorted(Counter(r.reason for r in filtered).items())),
        "failed_by_reason": dict(sorted(Counter(r.reason for r in failed).items())),
        "shards": int(num_shards),
        "shard_names": sorted(s.name for s in summaries),
        **run_info,
    }
    stats["reconciled"] = stats["inputs"] == stats["written"] + stats["filtered"] + stats["failed"]
    write_json(fs, posixpath.join(root, STATS_FILE), stats)
    return stats
