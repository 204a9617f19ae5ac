"""Members and keys of one controlset sample (one WebDataset sample per image).

A sample written by the pipeline is a group of tar members sharing one key::

    <key>.jpg            the training target, RGB JPEG
    <key>.txt            the caption (UTF-8, may be empty)
    <key>.json           metadata (see ``SampleMeta`` keys below)
    <key>.<cond>.png     one per condition, e.g. canny.png, hed.png, depth.png
    <key>.openpose.json  extra structured outputs of an annotator

All condition images have the size of ``jpg``.
"""

from __future__ import annotations

import hashlib
import re

#: Bumped when a field changes meaning or a required field is added.
SCHEMA_VERSION = 1

IMAGE_MEMBER = "jpg"
TEXT_MEMBER = "txt"
JSON_MEMBER = "json"

#: Condition members known to this schema version. Annotators may add new
#: ``<name>.png`` members; these are the ones the trainer knows by name.
CONDITION_MEMBERS = (
    "canny.png",
    "hough.png",
    "hed.png",
    "scribble.png",
    "mlsd.png",
    "openpose.png",
    "depth.png",
    "normal.png",
    "seg.png",
)

#: Length of a content key in hex characters (96 bits: collisions are
#: negligible at billions of images, and keys stay short in tar names).
KEY_HEX_CHARS = 24

_KEY_RE = re.compile(r"[0-9a-z_-]+")


def content_key(data: bytes) -> str:
    """Key of a sample: the first 96 bits of the SHA-256 of its image bytes.

    Derived only from the content, so it is stable across runs, machines and
    input paths, and contains neither dots nor slashes (WebDataset splits
    member names at the first dot of the basename).
    """
    return hashlib.sha256(data).hexdigest()[:KEY_HEX_CHARS]


def is_valid_key(key: str) -> bool:
    """True if ``key`` can be a WebDataset key (no dots, slashes or spaces)."""
    return bool(_KEY_RE.fullmatch(key))


def condition_member(condition: str) -> str:
    """Member name holding a condition image, e.g. ``canny`` -> ``canny.png``."""
    if "." in condition or "/" in condition:
        raise ValueError(f"condition name must not contain '.' or '/': {condition!r}")
    return f"{condition}.png"


def member_condition(member: str) -> str | None:
    """Inverse of :func:`condition_member`: ``canny.png`` -> ``canny``, else None."""
    if member.endswith(".png") and member.count(".") == 1:
        return member[: -len(".png")]
    return None


def build_metadata(
    *,
    key: str,
    source: str,
    original_size: tuple[int, int],
    crop_box: tuple[int, int, int, int],
    size: tuple[int, int],
    resolution: int,
    crop: str,
    caption_source: str | None,
    annotators: dict[str, dict],
    extra: dict | None = None,
) -> dict:
    """The ``json`` member of a sample.

    ``original_size`` and ``size`` are (width, height); ``crop_box`` is
    (left, top, right, bottom) in the pixels of the original image after its
    EXIF orientation was applied. ``annotators`` maps each annotator's name to
    ``{"version", "params", "members", ...}`` as reported by the annotator,
    including the per-sample values it actually used (e.g. Canny thresholds).
    """
    meta = {
        "schema_version": SCHEMA_VERSION,
        "key": key,
        "source": source,
        "original_width": int(original_size[0]),
        "original_height": int(original_size[1]),
        "crop_box": [int(v) for v in crop_box],
        "crop": crop,
        "resolution": int(resolution),
        "width": int(size[0]),
        "height": int(size[1]),
        "caption_source": caption_source,
        "annotators": annotators,
    }
    if extra:
        meta.update(extra)
    return meta


#: Keys every ``json`` member carries (checked by ``controlset validate``).
REQUIRED_META_KEYS = (
    "schema_version",
    "key",
    "source",
    "original_width",
    "original_height",
    "crop_box",
    "resolution",
    "width",
    "height",
    "annotators",
)
