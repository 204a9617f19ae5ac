"""Decoding a JPEG into a sample (read, decode, EXIF, crop, resize): at full
size against a reduced DCT scale (the default), per photo size, on one core,
with how far the two samples are apart.

    python bench/bench_decode.py --resolution 512 --repeat 10
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = ((4032, 3024), (3000, 2000), (2048, 1536), (1280, 960), (768, 576))


def main(argv: list[str] | None = None) -> dict:
    from PIL import Image
    from skimage import data

    from pipelines.decode import apply_geometry, decode_rgb, probe_image
    from pipelines.options import AnnotateOptions
    from pipelines.sources import Location
    from pipelines.stages import Candidate, decode_candidate
    from schemas import content_key

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--crop", default="center", choices=("center", "none"))
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--quality", type=int, default=92)
    args = ap.parse_args(argv)
    cv2.setNumThreads(1)  # one core: the pipeline decodes on a pool of single-threaded workers
    photo = data.chelsea()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_decode_") as tmp:
        for w, h in SIZES:
            path = Path(tmp) / f"{w}x{h}.jpg"
            Image.fromarray(cv2.resize(photo, (w, h), interpolation=cv2.INTER_CUBIC)).save(path, quality=args.quality)
            data = path.read_bytes()
            header = probe_image(data)
            cand = Candidate(content_key(data), str(path), Location(str(path)), "", None, header.width, header.height)
            row = {"photo": f"{w}x{h}", "megapixels": round(w * h / 1e6, 1)}
            samples = {}
            for label, reduced in (("full_ms", False), ("reduced_ms", True)):
                opts = AnnotateOptions(inputs=(tmp,), output=tmp, resolution=args.resolution, crop=args.crop,
                                       reduced_jpeg_decode=reduced)
                samples[label] = decode_candidate(cand, opts)  # warm-up
                t0 = time.perf_counter()
                for _ in range(args.repeat):
                    decode_candidate(cand, opts)
                row[label] = round((time.perf_counter() - t0) / args.repeat * 1000, 2)
            full, fast = samples["full_ms"], samples["reduced_ms"]
            diff = np.abs(full.image.astype(int) - fast.image.astype(int))
            row["speedup"] = round(row["full_ms"] / row["reduced_ms"], 2)
            # against the full decode as planned: DCT scaling plus the crop
            # moved to whole reduced pixels (at most half of one)
            row["mean_abs_diff"] = round(float(diff.mean()), 3)
            row["max_abs_diff"] = int(diff.max())
            # against the full decode cropped to the box the reduced sample
            # records: DCT scaling alone
            rgb, _ = decode_rgb(data)
            same = apply_geometry(rgb, fast.crop_box, (fast.image.shape[1], fast.image.shape[0]))
            row["mean_abs_diff_same_box"] = round(float(np.abs(same.astype(int) - fast.image.astype(int)).mean()), 3)
            row["crop_box_shift_px"] = max(abs(a - b) for a, b in zip(full.crop_box, fast.crop_box))
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {
        "benchmark": "decode_jpeg_to_sample",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["bench/bench_decode.py"] + (argv if argv is not None else sys.argv[1:])),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "resolution": args.resolution, "crop": args.crop, "jpeg_quality": args.quality,
        "rows": rows,
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
