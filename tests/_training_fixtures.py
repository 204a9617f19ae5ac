"""Small controlset shards of real photos with Canny conditions, for trainer tests."""

from __future__ import annotations

import os

import cv2
import numpy as np

from schemas import build_metadata, content_key
from schemas.codec import encode_member

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
CAPTIONS = ("an astronaut", "a cup of coffee", "a cat", "a rocket", "galaxies", "a stained tissue")


def photo_crops(n: int, size: tuple[int, int] = (80, 64), seed: int = 0) -> list[tuple[np.ndarray, str]]:
    """``n`` (RGB uint8 HxWx3, caption) crops of skimage photos, resized to ``size`` (w, h)."""
    import skimage.data

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        which = i % len(PHOTOS)
        img = getattr(skimage.data, PHOTOS[which])()
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        img = img[..., :3]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.5, 0.9))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = cv2.resize(img[top : top + side, left : left + side], size, interpolation=cv2.INTER_AREA)
        out.append((np.ascontiguousarray(crop), CAPTIONS[which]))
    return out


def write_shards(out_dir: str, n_shards: int = 2, per_shard: int = 6, size=(80, 64), seed: int = 0,
                 prefix: str = "train", corrupt: int = 0) -> list[str]:
    """Write controlset-format shards (jpg, txt, json, canny.png); the first
    ``corrupt`` samples get an undecodable jpg. Returns the tar paths."""
    import webdataset as wds

    os.makedirs(out_dir, exist_ok=True)
    crops = photo_crops(n_shards * per_shard, size, seed)
    paths = []
    for s in range(n_shards):
        path = os.path.join(out_dir, f"{prefix}-{s:06d}.tar")
        with wds.TarWriter(path) as sink:
            for j in range(per_shard):
                idx = s * per_shard + j
                image, caption = crops[idx]
                jpg = encode_member("jpg", image)
                key = content_key(jpg)
                edges = cv2.Canny(image, 100, 200)
                meta = build_metadata(
                    key=key, source=f"skimage:{idx}", original_size=size, crop_box=(0, 0, *size),
                    size=size, resolution=min(size), crop="none", caption_source="fixture",
                    annotators={"canny": {"version": "1", "params": {}, "members": ["canny.png"]}},
                )
                if idx < corrupt:
                    jpg = b"not a jpeg"
                sink.write({"__key__": key, "jpg": jpg, "txt": caption.encode(),
                            "json": encode_member("json", meta), "canny.png": encode_member("canny.png", edges)})
        paths.append(path)
    return paths
