"""Robust image decoding and geometry: pure functions, no Beam.

Everything a real-world image folder throws at a pipeline ends here as either
an RGB uint8 array or a typed exception that the caller records as a failure.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageCms, UnidentifiedImageError

# PIL's decompression-bomb limit stays on: we read Image.MAX_IMAGE_PIXELS at
# call time (users may lower it) and reject anything larger ourselves, instead
# of relying on the warning PIL emits between 1x and 2x the limit.

_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> PIL transpose operations that undo it (applied in order).
_ORIENTATION_OPS = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,),
    3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,),
    7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}

_SRGB_PROFILE = None


class DecodeError(Exception):
    """An input that cannot become an image. ``reason`` is machine-readable."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ImageHeader:
    """What is known about an image from its header, without decoding pixels."""

    width: int  # after EXIF orientation
    height: int
    format: str
    mode: str
    orientation: int
    frames: int


def read_orientation(im: Image.Image) -> int:
    """EXIF orientation (1-8); 1 when absent or unreadable (a broken EXIF block
    should not cost an otherwise good image)."""
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
        value = int(value)
    except Exception:
        return 1
    return value if value in range(1, 9) else 1


def _check_pixels(width: int, height: int) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise DecodeError(
            "decompression_bomb",
            f"{width}x{height} = {width * height} pixels exceeds PIL's limit of {limit}",
        )


def _decode_errors(fn):
    """Any exception of ``fn`` becomes a :class:`DecodeError`: image
    libraries raise many types (SyntaxError, KeyError, IndexError, ...) for
    crafted or damaged files, and one bad file must never stop a run."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DecodeError:
            raise
        except Image.DecompressionBombError as exc:
            raise DecodeError("decompression_bomb", str(exc)) from exc
        except Exception as exc:
            raise DecodeError("decode_error", f"{type(exc).__name__}: {exc}") from exc

    return wrapper


def _open(data: bytes) -> Image.Image:
    if not data:
        raise DecodeError("empty_file", "file is empty")
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise DecodeError("decompression_bomb", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise DecodeError("not_an_image", "not a recognised image format") from exc


@_decode_errors
def probe_image(data: bytes) -> ImageHeader:
    """Read an image header: size (after EXIF orientation), format, mode.

    Raises :class:`DecodeError` for empty files, non-images and images over
    the pixel limit. Does not decode pixels, so truncated files pass here and
    fail in :func:`decode_rgb`.
    """
    with _open(data) as im:
        width, height = im.size
        _check_pixels(width, height)
        orientation = read_orientation(im)
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        header = ImageHeader(
            width=width,
            height=height,
            format=im.format or "unknown",
            mode=im.mode,
            orientation=orientation,
            frames=int(getattr(im, "n_frames", 1) or 1),
        )
    if header.format == "PNG":
        # zlib happily inflates a damaged IDAT into wrong pixels; only the
        # chunk checksums catch it, and PIL checks them only in verify().
        with _open(data) as im:
            try:
                im.verify()
            except Exception as exc:
                raise DecodeError("decode_error", f"corrupt PNG: {exc}") from exc
    return header


def _srgb():
    global _SRGB_PROFILE
    if _SRGB_PROFILE is None:
        _SRGB_PROFILE = ImageCms.createProfile("sRGB")
    return _SRGB_PROFILE


def _apply_icc(im: Image.Image) -> Image.Image:
    """Convert an RGB or CMYK image with an embedded ICC profile to sRGB.

    Wide-gamut (Display P3, Adobe RGB) and print (CMYK) profiles otherwise
    give visibly wrong colours. A broken profile falls back to a plain
    conversion rather than failing the image.
    """
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "CMYK"):
        return im
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return ImageCms.profileToProfile(im, src, _srgb(), outputMode="RGB")
    except Exception:
        return im


def _composite_on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _high_bit_depth_to_rgb(im: Image.Image) -> np.ndarray:
    """16-bit and 32-bit integer / float single-channel images -> RGB uint8,
    scaled (PIL's own convert clips 16-bit values instead of scaling them)."""
    arr = np.asarray(im)
    if im.mode == "F":
        arr = arr.astype(np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        gray = np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8)
    else:
        arr = arr.astype(np.int64)
        if arr.size and arr.max() > 65535:  # true 32-bit data: scale by its range
            arr = (arr - arr.min()) * 65535 // max(1, int(arr.max() - arr.min()))
        gray = ((np.clip(arr, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def to_rgb_array(im: Image.Image) -> np.ndarray:
    """Any PIL image -> RGB uint8 HxWx3: alpha composited on white, palette
    transparency honoured, CMYK and ICC profiles converted to sRGB, 16-bit
    scaled to 8-bit."""
    mode = im.mode
    if mode.startswith("I") or mode == "F":
        return _high_bit_depth_to_rgb(im)
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return np.asarray(_composite_on_white(im))
    if mode in ("RGB", "CMYK"):
        im = _apply_icc(im)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)


@_decode_errors
def decode_rgb(data: bytes, min_size: tuple[int, int] | None = None) -> tuple[np.ndarray, ImageHeader]:
    """Decode ``data`` to an RGB uint8 array with EXIF orientation applied.

    ``min_size`` (width, height after orientation): a JPEG may then be
    decoded at a reduced scale (libjpeg's DCT scaling by 1/2, 1/4 or 1/8) as
    long as the array stays at least that large; several times faster for
    camera-sized photos. The header always gives the full size; the array's
    size then differs from it. The first frame of an animation is used.
    Truncated or corrupt files raise :class:`DecodeError` with reason
    ``decode_error``.
    """
    with _open(data) as im:
        _check_pixels(*im.size)
        orientation = read_orientation(im)
        frames = int(getattr(im, "n_frames", 1) or 1)
        fmt, mode = im.format or "unknown", im.mode
        full_w, full_h = im.size
        if orientation in (5, 6, 7, 8):
            full_w, full_h = full_h, full_w
        im.seek(0)
        if min_size is not None and fmt == "JPEG":
            want = min_size if orientation not in (5, 6, 7, 8) else min_size[::-1]
            im.draft(mode, (max(1, int(want[0])), max(1, int(want[1]))))
        im.load()
        for op in _ORIENTATION_OPS.get(orientation, ()):
            im = im.transpose(op)
        rgb = np.ascontiguousarray(to_rgb_array(im))
    header = ImageHeader(full_w, full_h, fmt, mode, orientation, frames)
    return rgb, header


# --------------------------------------------------------------------------- geometry

CROP_MODES = ("center", "none")


def plan_geometry(width: int, height: int, resolution: int, crop: str) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """Crop box (left, top, right, bottom) in source pixels and output (w, h).

    ``center``: the centred square of side min(w, h), resized to
    ``resolution`` square (ControlNet's training size). ``none``: the whole
    image, short side scaled to ``resolution`` and both sides rounded to
    multiples of 64, as ControlNet's own ``resize_image`` does.
    """
    if crop == "center":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return (left, top, left + side, top + side), (resolution, resolution)
    if crop == "none":
        k = resolution / min(width, height)
        out_w = max(64, int(np.round(width * k / 64.0)) * 64)
        out_h = max(64, int(np.round(height * k / 64.0)) * 64)
        return (0, 0, width, height), (out_w, out_h)
    raise ValueError(f"unknown crop mode {crop!r}; valid: {', '.join(CROP_MODES)}")


#: A JPEG is decoded at a reduced DCT scale only while its crop keeps at
#: least this many pixels per output pixel on each axis, so the final area
#: resize still averages over several pixels (as Pillow's ``reducing_gap``):
#: the result differs from a full decode by about 0.1 grey level on average.
DRAFT_GAP = 2.0


def draft_size(width: int, height: int, resolution: int, crop: str) -> tuple[int, int] | None:
    """The smallest decoded size (width, height after orientation) of a
    ``width`` x ``height`` image that keeps :data:`DRAFT_GAP` source pixels
    per output pixel in its crop; None when nothing smaller would do."""
    (left, top, right, bottom), (out_w, out_h) = plan_geometry(width, height, resolution, crop)
    need_w = math.ceil(width * DRAFT_GAP * out_w / (right - left))
    need_h = math.ceil(height * DRAFT_GAP * out_h / (bottom - top))
    if need_w * 2 > width or need_h * 2 > height:
        return None  # not even half the size would do
    return need_w, need_h


#: EXIF orientation -> whether the displayed x and y axes run against the
#: stored ones (the transposes of _ORIENTATION_OPS, undone).
_FLIPPED_AXES = {1: (False, False), 2: (True, False), 3: (True, True), 4: (False, True),
                 5: (False, False), 6: (True, False), 7: (True, True), 8: (False, True)}


def reduced_box(box: tuple[int, int, int, int], full_size: tuple[int, int], reduced_size: tuple[int, int],
                orientation: int = 1) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """A crop box in full-size pixels (after orientation), for the same
    image decoded at a reduced DCT scale (width, height ``reduced_size``):
    the nearest box of whole reduced pixels, in reduced pixels and in
    full-size pixels (the box the sample then really shows).

    libjpeg's reduced pixel i covers stored pixels [i*s, (i+1)*s), the last
    one only partly (the size is ceil(W / s)); where the orientation flips
    an axis, that partial pixel comes first and shifts every other by its
    missing part."""
    flip_x, flip_y = _FLIPPED_AXES.get(orientation, (False, False))

    def axis(lo: int, hi: int, full: int, n: int, flipped: bool) -> tuple[int, int, int, int]:
        s = max(1, round(full / n))
        shift = n * s - full if flipped else 0
        a = min(n - 1, math.floor((lo + shift) / s + 0.5))
        b = max(a + 1, min(n, math.floor((hi + shift) / s + 0.5)))
        return a, b, max(0, a * s - shift), min(full, b * s - shift)

    l, r, fl, fr = axis(box[0], box[2], full_size[0], reduced_size[0], flip_x)
    t, b, ft, fb = axis(box[1], box[3], full_size[1], reduced_size[1], flip_y)
    return (l, t, r, b), (fl, ft, fr, fb)


def apply_geometry(image: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """Crop then resize: area averaging when shrinking (no aliasing), Lanczos
    when enlarging, as ControlNet's annotator preprocessing does."""
    left, top, right, bottom = box
    region = image[top:bottom, left:right]
    out_w, out_h = size
    if region.shape[1] == out_w and region.shape[0] == out_h:
        return np.ascontiguousarray(region)
    shrinking = out_w * out_h < region.shape[0] * region.shape[1]
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LANCZOS4
    return cv2.resize(np.ascontiguousarray(region), (out_w, out_h), interpolation=interp)


@_decode_errors
def perceptual_hash(data: bytes) -> int:
    """64-bit DCT perceptual hash (pHash) of an image, after EXIF orientation.

    Near-identical images (re-encoded, resized, lightly edited) differ in a
    few bits. JPEGs are decoded at reduced scale (``draft``), so hashing costs
    a fraction of a full decode.
    """
    with _open(data) as im:
        _check_pixels(*im.size)
        orientation = read_orientation(im)
        im.draft("L", (64, 64))
        im.load()
        for op in _ORIENTATION_OPS.get(orientation, ()):
            im = im.transpose(op)
        gray = np.asarray(to_rgb_array(im), dtype=np.float32).mean(axis=2)
    small = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA)
    low = cv2.dct(small)[:8, :8].flatten()
    bits = low[1:] > np.median(low[1:])  # the DC term says only "how bright"
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
