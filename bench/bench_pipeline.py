"""Images/s of the Canny pipeline (read, hash, decode, resize, Canny, encode,
write shards): Beam's DirectRunner in one process and in multi_processing
mode, against a bare single-process Python loop doing the same work with the
same stage functions, measured in the same run.

    python bench/bench_pipeline.py --images 600 --workers 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_inputs(folder: Path, count: int, side: int) -> None:
    """``count`` distinct JPEG photos of about ``side`` px (real skimage photos,
    resized and jittered so no two are identical)."""
    import cv2
    import skimage.data
    from PIL import Image

    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"]
    base = []
    for n in names:
        arr = getattr(skimage.data, n)()
        arr = arr[:, :, :3] if arr.ndim == 3 else np.repeat(arr[:, :, None], 3, 2)
        k = side / min(arr.shape[:2])
        base.append(cv2.resize(arr, (round(arr.shape[1] * k), round(arr.shape[0] * k)), interpolation=cv2.INTER_CUBIC))
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        arr = base[i % len(base)].copy()
        arr[:4, :4] = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img{i:05d}.jpg", quality=90)


def bare_loop(src: Path, out: Path, opts) -> float:
    """The same stages as the pipeline, called in a plain loop."""
    import fsspec

    from annotators import create_annotator
    from pipelines.sources import discover
    from pipelines.stages import (
        Candidate, annotate_decoded, choose_duplicate, decode_candidate, encode_sample,
        plan_digest, shard_boundaries, probe_input,
    )
    from pipelines.writer import shard_name, write_shard

    t0 = time.perf_counter()
    annotators = [create_annotator(n, **o) for n, o in opts.annotators]
    fs = fsspec.filesystem("file")
    fs.makedirs(str(out), exist_ok=True)
    cands: dict[str, list] = {}
    for ref in discover([str(src)]):
        for r in probe_input(ref, opts):
            if isinstance(r, Candidate):
                cands.setdefault(r.key, []).append(r)
    kept = [choose_duplicate(k, g)[0] for k, g in cands.items()]
    keys = sorted(c.key for c in kept)
    bounds = shard_boundaries(keys, opts.shard_size)
    by_key = {c.key: c for c in kept}
    from pipelines.beam import beam_batch_size

    batch = beam_batch_size(opts)
    for i, start in enumerate(bounds):
        shard = [by_key[k] for k in keys[i * opts.shard_size:(i + 1) * opts.shard_size]]
        digest = plan_digest("{}", shard)
        samples, failures = [], []
        for j in range(0, len(shard), batch):
            decoded = [decode_candidate(c, opts) for c in shard[j:j + batch]]
            ok = [d for d in decoded if not hasattr(d, "reason")]
            for res in annotate_decoded(ok, annotators):
                d, ann = res
                samples.append(encode_sample(d, ann, annotators, opts, shard_name(opts.prefix, i)))
        write_shard(fs, str(out), shard_name(opts.prefix, i), samples, failures, digest)
    return time.perf_counter() - t0


def beam_run(src: Path, out: Path, opts, beam_args: list[str]) -> tuple[float, dict]:
    from dataclasses import replace

    from pipelines.run import run_annotate

    t0 = time.perf_counter()
    stats = run_annotate(replace(opts, inputs=(str(src),), output=str(out)), beam_args)
    return time.perf_counter() - t0, stats


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--side", type=int, default=768, help="short side of the input photos")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--shard-size", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args(argv)

    from pipelines.options import AnnotateOptions

    work = Path(tempfile.mkdtemp(prefix="controlset-bench-"))
    src = work / "in"
    make_inputs(src, args.images, args.side)
    opts = AnnotateOptions(inputs=(str(src),), output="", annotators=(("canny", {}),),
                           resolution=args.resolution, shard_size=args.shard_size)
    results = {}
    t = bare_loop(src, work / "bare", opts)
    results["bare_loop"] = {"seconds": round(t, 2), "images_per_s": round(args.images / t, 1)}
    t, stats = beam_run(src, work / "direct", opts, [])
    assert stats["written"] == args.images, stats
    results["beam_direct_in_process"] = {"seconds": round(t, 2), "images_per_s": round(args.images / t, 1)}
    t, stats = beam_run(src, work / "multi", opts, ["--direct_running_mode=multi_processing",
                                                    f"--direct_num_workers={args.workers}"])
    assert stats["written"] == args.images, stats
    results[f"beam_multi_processing_{args.workers}"] = {"seconds": round(t, 2), "images_per_s": round(args.images / t, 1)}
    same = all((work / "bare" / p.name).read_bytes() == p.read_bytes() for p in (work / "multi").glob("*.tar"))
    summary = {
        "benchmark": "canny_pipeline",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["bench/bench_pipeline.py"] + (argv if argv is not None else sys.argv[1:])),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} cores",
        "python": platform.python_version(),
        "images": args.images,
        "input_short_side": args.side,
        "resolution": args.resolution,
        "shards_identical_bare_vs_beam": same,
        "results": results,
    }
    print(json.dumps(summary, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return summary


if __name__ == "__main__":
    main()
