"""The sample contract shared by every controlset stage.

`schemas` is the leaf of the dependency graph: it imports nothing from the
other controlset packages, so the pipeline, the annotators and the trainer can
all rely on it.
"""

from schemas.sample import (
    CONDITION_MEMBERS,
    IMAGE_MEMBER,
    JSON_MEMBER,
    KEY_HEX_CHARS,
    REQUIRED_META_KEYS,
    SCHEMA_VERSION,
    build_metadata,
    TEXT_MEMBER,
    condition_member,
    content_key,
    is_valid_key,
    member_condition,
)
from schemas.errors import UsageError
from schemas.records import (
    FAILED,
    FAILURE_SCHEMA,
    FILTERED,
    MANIFEST_SCHEMA,
    FailureRecord,
    ManifestRow,
    manifest_table,
    records_table,
)

__all__ = [
    "FAILED",
    "FILTERED",
    "REQUIRED_META_KEYS",
    "build_metadata",
    "manifest_table",
    "records_table",
    "CONDITION_MEMBERS",
    "FAILURE_SCHEMA",
    "FailureRecord",
    "IMAGE_MEMBER",
    "JSON_MEMBER",
    "KEY_HEX_CHARS",
    "MANIFEST_SCHEMA",
    "ManifestRow",
    "SCHEMA_VERSION",
    "TEXT_MEMBER",
    "UsageError",
    "condition_member",
    "content_key",
    "is_valid_key",
    "member_condition",
]
