"""Arrow schemas for shard manifests and for failure / filter records."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import pyarrow as pa

#: One row per written sample, stored as ``<shard>.parquet`` beside each tar.
MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("original_width", pa.int32(), nullable=False),
        pa.field("original_height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("conditions", pa.list_(pa.string()), nullable=False),
        pa.field("members", pa.list_(pa.string()), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
    ]
)

#: One row per input that did not become a sample. ``kind`` is ``failed``
#: (something went wrong) or ``filtered`` (a rule rejected it on purpose).
FAILURE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=True),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("error_type", pa.string(), nullable=True),
        pa.field("message", pa.string(), nullable=False),
    ]
)

FAILED = "failed"
FILTERED = "filtered"


def printable(text: str) -> str:
    """``text`` as valid UTF-8 for outputs: bytes that were not UTF-8 (POSIX
    file names arrive as surrogate escapes) are written as ``\\xNN``."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            raw = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # lone surrogates that are not escapes
            return text.encode("utf-8", "backslashreplace").decode("utf-8")
        return raw.decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class FailureRecord:
    """Why one input did not become a sample: failures are data, not exceptions."""

    source: str
    kind: str  # FAILED or FILTERED
    stage: str  # discover, read, decode, filter, dedup, annotate, encode, write
    reason: str  # short machine-readable reason, e.g. "too_small"
    message: str
    key: str | None = None
    error_type: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in (FAILED, FILTERED):
            raise ValueError(f"kind must be {FAILED!r} or {FILTERED!r}, got {self.kind!r}")
        # records are written to parquet: names that are not UTF-8 are escaped
        object.__setattr__(self, "source", printable(self.source))
        object.__setattr__(self, "message", printable(self.message))

    def to_row(self) -> dict:
        return asdict(self)

    def sort_key(self) -> tuple:
        """Every field, for a total order: record files list their rows in
        the same order on every run, whatever order workers produced them."""
        return (self.source, self.stage, self.reason, self.message, self.key or "", self.error_type or "",
                self.kind)

    @classmethod
    def from_exception(
        cls, source: str, stage: str, reason: str, exc: BaseException, key: str | None = None
    ) -> "FailureRecord":
        return cls(
            source=source,
            kind=FAILED,
            stage=stage,
            reason=reason,
            message=str(exc) or type(exc).__name__,
            key=key,
            error_type=type(exc).__name__,
        )


@dataclass
class ManifestRow:
    key: str
    source: str
    shard: str
    original_width: int
    original_height: int
    width: int
    height: int
    caption: str
    conditions: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    bytes: int = 0

    def to_row(self) -> dict:
        return asdict(self)


def records_table(records: list[FailureRecord]) -> pa.Table:
    """Arrow table of failure/filter records with :data:`FAILURE_SCHEMA`."""
    return pa.Table.from_pylist([r.to_row() for r in records], schema=FAILURE_SCHEMA)


def manifest_table(rows: list[ManifestRow]) -> pa.Table:
    return pa.Table.from_pylist([r.to_row() for r in rows], schema=MANIFEST_SCHEMA)
