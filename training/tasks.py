"""A small conditioned task written as ordinary controlset shards.

``shapes``: in the spirit of the fill50k toy set of the ControlNet authors -
one filled shape (circle, square, triangle, ellipse) of a named colour on a
background of another named colour, caption "a red circle on a blue
background"; the condition is the Canny edge map of the target, computed by
the project's ``canny`` annotator exactly as the annotate pipeline does. A
model that ignores the condition can draw the right colours and kind of shape
from the caption but not its position, size or orientation, which only the
edges give.

Samples follow the sample contract (``jpg``, ``txt``, ``json``,
``canny.png``) in ``<prefix>-NNNNNN.tar`` shards with a ``.parquet``
manifest beside each, so the trainer reads them like pipeline output.
"""

from __future__ import annotations

import math
import os

import cv2
import numpy as np

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (235, 215, 30),
    "orange": (245, 140, 20), "purple": (140, 40, 180), "white": (245, 245, 245), "black": (15, 15, 15),
    "grey": (128, 128, 128), "cyan": (30, 200, 210), "pink": (240, 120, 180), "brown": (120, 70, 30),
}
SHAPES = ("circle", "square", "triangle", "ellipse")


def draw_shape(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """One RGB uint8 ``size`` x ``size`` image and its caption."""
    names = list(COLOURS)
    fg, bg = rng.choice(len(names), 2, replace=False)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    img = np.empty((size, size, 3), np.uint8)
    img[:] = COLOURS[names[bg]]
    colour = tuple(int(v) for v in COLOURS[names[fg]])
    r = float(rng.uniform(0.15, 0.35)) * size
    cx, cy = (float(v) for v in rng.uniform(r, size - r, 2))
    angle = float(rng.uniform(0, 2 * math.pi))
    if shape == "circle":
        cv2.circle(img, (round(cx), round(cy)), round(r), colour, -1, cv2.LINE_AA)
    elif shape == "ellipse":
        axes = (round(r), round(r * float(rng.uniform(0.4, 0.7))))
        cv2.ellipse(img, (round(cx), round(cy)), axes, math.degrees(angle), 0, 360, colour, -1, cv2.LINE_AA)
    else:
        k = 4 if shape == "square" else 3
        pts = [(cx + r * math.cos(angle + 2 * math.pi * i / k), cy + r * math.sin(angle + 2 * math.pi * i / k)) for i in range(k)]
        cv2.fillPoly(img, [np.round(np.array(pts) * 16).astype(np.int32)], colour, cv2.LINE_AA, shift=4)
    return img, f"a {names[fg]} {shape} on a {names[bg]} background"


def write_shapes_task(out_dir: str, n_train: int = 2000, n_val: int = 64, size: int = 64, seed: int = 0,
                      per_shard: int = 1000) -> dict[str, list[str]]:
    """Write ``train-*.tar`` and ``val-*.tar`` shards (+ manifests) of the
    shapes task; returns ``{"train": [...], "val": [...]}``. Deterministic
    for a given seed; shards already complete (manifest present) are kept."""
    import pyarrow.parquet as pq
    import webdataset as wds

    from annotators import create_annotator
    from schemas import ManifestRow, build_metadata, content_key, manifest_table
    from schemas.codec import encode_member

    canny = create_annotator("canny")
    canny.setup()
    os.makedirs(out_dir, exist_ok=True)
    out: dict[str, list[str]] = {}
    for split, n, split_seed in (("train", n_train, seed), ("val", n_val, seed + 1_000_003)):
        rng = np.random.default_rng(split_seed)
        paths = []
        for s in range(max(1, math.ceil(n / per_shard))):
            count = min(per_shard, n - s * per_shard)
            images = [draw_shape(rng, size) for _ in range(count)]
            name = f"{split}-{s:06d}"
            tar, manifest = os.path.join(out_dir, name + ".tar"), os.path.join(out_dir, name + ".parquet")
            paths.append(tar)
            if os.path.exists(manifest) and os.path.exists(tar):
                continue
            ann = canny.annotate_batch([im for im, _ in images])
            rows = []
            with wds.TarWriter(tar + ".tmp") as sink:
                for (img, caption), a in zip(images, ann):
                    jpg = encode_member("jpg", img)
                    key = content_key(jpg)
                    meta = build_metadata(
                        key=key, source=f"shapes:{split}:{seed}:{len(rows) + s * per_shard}", original_size=(size, size),
                        crop_box=(0, 0, size, size), size=(size, size), resolution=size, crop="none",
                        caption_source="generator",
                        annotators={"canny": {"version": canny.version, "params": canny.params,
                                              "members": list(canny.members), **a.meta}},
                    )
                    members = {"__key__": key, "jpg": jpg, "txt": caption.encode(), "json": encode_member("json", meta),
                               "canny.png": encode_member("canny.png", a.members["canny.png"])}
                    sink.write(members)
                    rows.append(ManifestRow(key=key, source=meta["source"], shard=name + ".tar", original_width=size,
                                            original_height=size, width=size, height=size, caption=caption,
                                            conditions=["canny"], members=["jpg", "txt", "json", "canny.png"],
                                            bytes=sum(len(v) for k, v in members.items() if k != "__key__")))
            os.replace(tar + ".tmp", tar)
            pq.write_table(manifest_table(rows), manifest)
        out[split] = paths
    return out
