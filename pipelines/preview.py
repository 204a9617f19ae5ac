"""A contact sheet of a few samples: the image, each condition, the caption."""

from __future__ import annotations

import io
import posixpath
import textwrap

import fsspec
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipelines.dataset import iter_tar, list_shards
from schemas.errors import UsageError


def _thumb(data: bytes, cell: int) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        if im.mode.startswith("I"):  # 16-bit conditions: scale for display
            arr = np.asarray(im).astype(np.float64)
            span = max(1.0, float(arr.max() - arr.min()))
            im = Image.fromarray(((arr - arr.min()) * 255 / span).astype(np.uint8))
        im = im.convert("RGB")
        im.thumbnail((cell, cell), Image.Resampling.LANCZOS)
        canvas = Image.new("RGB", (cell, cell), (24, 24, 24))
        canvas.paste(im, ((cell - im.width) // 2, (cell - im.height) // 2))
        return canvas


def make_contact_sheet(dataset: str, output: str | None = None, samples: int = 6, cell: int = 192) -> str:
    """Render the first ``samples`` samples of a dataset to a PNG and return its path.

    Columns: the image, then each condition image (sorted by name), then the
    caption; one row per sample.
    """
    fs, root, shards = list_shards(dataset)
    if not shards:
        raise UsageError(f"no shards found in {dataset!r}")
    rows = []
    for name in shards:
        for key, members in iter_tar(fs, posixpath.join(root, f"{name}.tar")):
            rows.append((key, members))
            if len(rows) >= samples:
                break
        if len(rows) >= samples:
            break
    if not rows:
        raise UsageError(f"the shards in {dataset!r} hold no samples")
    conditions = sorted({m for _, ms in rows for m in ms if m.endswith(".png")})
    columns = ["jpg", *conditions]
    text_w = cell * 2
    header = 24
    sheet = Image.new("RGB", (cell * len(columns) + text_w, header + cell * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for c, col in enumerate(columns + ["caption"]):
        draw.text((c * cell + 6, 6), "image" if col == "jpg" else col.replace(".png", ""), fill=(0, 0, 0), font=font)
    for r, (key, members) in enumerate(rows):
        y = header + r * cell
        for c, col in enumerate(columns):
            if col in members:
                sheet.paste(_thumb(members[col], cell), (c * cell, y))
        caption = members.get("txt", b"").decode("utf-8", errors="replace") or "(no caption)"
        lines = textwrap.wrap(caption, width=max(10, text_w // 7))[: cell // 14 - 2]
        x = len(columns) * cell + 6
        draw.text((x, y + 4), key, fill=(90, 90, 90), font=font)
        for i, line in enumerate(lines):
            draw.text((x, y + 20 + 14 * i), line, fill=(0, 0, 0), font=font)
    out = output or posixpath.join(dataset, "preview.png")
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    with fsspec.open(out, "wb") as f:
        f.write(buf.getvalue())
    return out
