"""Sample photos for demos and first runs: the real photographs that ship
inside scikit-image (no download), written as ordinary image files with
captions beside them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

#: skimage.data photo -> caption.
SAMPLE_PHOTOS = {
    "astronaut": "an astronaut in an orange suit in front of an American flag and a space shuttle",
    "coffee": "a cup of coffee on a saucer with a spoon, on a wooden table",
    "chelsea": "a close-up of a tabby cat's face",
    "rocket": "a rocket on its launch pad at dusk, with lights around it",
    "camera": "a man with a camera on a tripod, in black and white",
    "immunohistochemistry": "a microscope image of stained tissue",
    "hubble_deep_field": "a deep field of distant galaxies",
    "retina": "a photograph of the back of a human eye",
    "coins": "old coins laid out in rows, in black and white",
    "moon": "the surface of the moon in black and white",
    "brick": "a brick wall",
    "grass": "a patch of grass",
    "gravel": "gravel seen from above",
    "colorwheel": "a colour wheel",
}


def write_sample_photos(folder: str | Path) -> list[Path]:
    """Write the sample photos as JPEG (and their captions as ``.txt``) into
    ``folder``; returns the image paths."""
    import skimage.data

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, caption in SAMPLE_PHOTOS.items():
        try:
            arr = getattr(skimage.data, name)()
        except Exception:  # a photo missing from this scikit-image version
            continue
        arr = np.asarray(arr)
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max() <= 1 else 1.0), 0, 255).astype(np.uint8)
        mode = "L" if arr.ndim == 2 else ("RGBA" if arr.shape[2] == 4 else "RGB")
        im = Image.fromarray(arr, mode).convert("RGB")
        path = out / f"{name}.jpg"
        im.save(path, quality=92)
        (out / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
        paths.append(path)
    return paths
