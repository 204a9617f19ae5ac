"""How sample members are encoded to bytes and decoded back.

Encoding is deterministic: the same array always gives the same bytes with the
same library versions, which makes shards byte-identical across reruns.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image

#: JPEG quality of the ``jpg`` member (the training target).
JPEG_QUALITY = 95
#: zlib level for PNG conditions: 1 is several times faster than the default
#: and condition maps (mostly flat) still compress well.
PNG_COMPRESSION = 1


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """RGB uint8 HxWx3 -> baseline JPEG bytes (4:2:0, no EXIF)."""
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()


def encode_png(array: np.ndarray, compression: int = PNG_COMPRESSION) -> bytes:
    """uint8 HxW (L), HxWx3 (RGB) or uint16 HxW (I;16) -> PNG bytes."""
    import cv2

    if array.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"PNG members must be uint8 or uint16, got {array.dtype}")
    if array.ndim == 3:
        if array.shape[2] != 3:
            raise ValueError(f"PNG members must be HxW or HxWx3, got shape {array.shape}")
        array = array[:, :, ::-1]  # OpenCV writes BGR
    elif array.ndim != 2:
        raise ValueError(f"PNG members must be HxW or HxWx3, got shape {array.shape}")
    params = [cv2.IMWRITE_PNG_COMPRESSION, compression]
    if hasattr(cv2, "IMWRITE_PNG_FILTER"):
        # One fixed row filter (Up) and run-length matching: libpng's default
        # tries every filter on every row, which costs more than the
        # compression itself at level 1; condition maps come out about the
        # same size. The pixels are the same either way (PNG is lossless).
        params += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP,
                   cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(array), params)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def encode_json(obj: Any) -> bytes:
    """Canonical JSON (sorted keys, compact) so equal objects give equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def encode_member(name: str, value: Any) -> bytes:
    """Encode one member by its name's extension (png, jpg, json, txt)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    ext = name.rsplit(".", 1)[-1]
    if ext == "png":
        return encode_png(np.asarray(value))
    if ext in ("jpg", "jpeg"):
        return encode_jpeg(np.asarray(value))
    if ext == "json":
        return encode_json(value)
    if ext == "txt":
        return str(value).encode("utf-8")
    raise ValueError(f"don't know how to encode member {name!r}")


def decode_image(data: bytes, mode: str = "RGB") -> np.ndarray:
    """Decode an encoded image member to a numpy array (RGB by default;
    ``mode=None`` keeps the stored mode, e.g. 16-bit depth)."""
    with Image.open(io.BytesIO(data)) as im:
        if mode is not None and im.mode != mode:
            im = im.convert(mode)
        return np.array(im)


def decode_member(name: str, data: bytes) -> Any:
    """Inverse of :func:`encode_member`."""
    ext = name.rsplit(".", 1)[-1]
    if ext in ("png", "jpg", "jpeg"):
        return decode_image(data, mode=None)
    if ext == "json":
        return json.loads(data.decode("utf-8"))
    if ext == "txt":
        return data.decode("utf-8")
    return data
