"""Real photos and hostile files for pipeline tests (written, never mocked)."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry")


def photo(name: str) -> np.ndarray:
    arr = getattr(skimage.data, name)()
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


def jpeg_bytes(arr: np.ndarray, quality: int = 90, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A tiny PNG file whose header claims width x height pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


def bad_crc_png(arr: np.ndarray) -> bytes:
    """A PNG whose IDAT payload is corrupted (its CRC no longer matches)."""
    data = bytearray(png_bytes(Image.fromarray(arr)))
    idat = data.index(b"IDAT")
    data[idat + 40] ^= 0xFF
    return bytes(data)


def exif_rotated_jpeg(arr: np.ndarray, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(arr, exif=exif.tobytes())


def write_photos(folder: Path, names=PHOTOS) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        p = folder / f"{name}.jpg"
        p.write_bytes(jpeg_bytes(photo(name)))
        paths.append(p)
    return paths


def write_hostile(folder: Path) -> dict[str, str]:
    """Write one file per hostile case; returns {file name: expected outcome}
    where the outcome is 'written' or the failure/filter reason."""
    folder.mkdir(parents=True, exist_ok=True)
    astro, coffee, chelsea = photo("astronaut"), photo("coffee"), photo("chelsea")
    expected: dict[str, str] = {}

    def put(name: str, data: bytes, outcome: str) -> None:
        (folder / name).write_bytes(data)
        expected[name] = outcome

    full = jpeg_bytes(astro)
    put("astronaut.jpg", full, "written")
    (folder / "astronaut.txt").write_text("an astronaut in an orange suit\n", encoding="utf-8")
    put("truncated.jpg", jpeg_bytes(coffee)[:6000], "decode_error")
    put("empty.jpg", b"", "empty_file")
    put("notes.jpg", b"these are my notes, not a picture\n", "not_an_image")
    put("badcrc.png", bad_crc_png(chelsea), "decode_error")
    put("bomb.png", bomb_png(), "decompression_bomb")
    gradient = (np.linspace(0, 65535, 300 * 400).reshape(300, 400)).astype(np.uint16)
    put("gray16.png", png_bytes(Image.fromarray(gradient)), "written")
    put("cmyk.jpg", _save(Image.fromarray(coffee).convert("CMYK"), "JPEG", quality=95), "written")
    pal = Image.fromarray(chelsea).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    pal.info["transparency"] = 0  # palette index 0 is transparent
    put("palette_alpha.png", _save(pal, "PNG", transparency=0), "written")
    rgba = np.dstack([astro, np.full(astro.shape[:2], 255, np.uint8)])
    rgba[:, :256, 3] = 0  # left half fully transparent -> white
    put("rgba.png", png_bytes(Image.fromarray(rgba, "RGBA")), "written")
    landscape = np.ascontiguousarray(coffee[:, :, :])  # 400x600
    put("rotated.jpg", exif_rotated_jpeg(landscape, 6), "written")
    put("tiny.png", png_bytes(Image.fromarray(astro[:32, :32])), "too_small")
    put("panorama.jpg", jpeg_bytes(np.ascontiguousarray(np.tile(coffee[:300, :300], (1, 4, 1)))), "aspect_ratio")
    put("my.holiday.photo.v2.jpg", jpeg_bytes(chelsea), "written")
    put("фото кошки 猫.png", png_bytes(Image.fromarray(coffee[::-1])), "written")
    put("copy of astronaut.jpg", full, "duplicate")
    frames = [Image.fromarray(np.full((300, 300, 3), v, np.uint8)) for v in (30, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    put("animated.gif", buf.getvalue(), "written")
    return expected


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]], unsafe: list[str] = ()) -> None:
    """A WebDataset-style tar; ``unsafe`` member names are added verbatim."""
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        for name in unsafe:
            data = jpeg_bytes(photo("rocket"))
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def tree_bytes(folder: Path, pattern: str = "*.tar") -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob(pattern))}


def env_without_gpu() -> dict[str, str]:
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env
