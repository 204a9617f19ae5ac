"""How busy the GPU is while an annotator runs: for each named annotator,
images/s of ``annotate_batch`` at its default batch, then a torch profile of
two batches giving the device time (kernels and copies) per batch against
the wall time per batch, and the kernels that take the most device time.

A device busy for much less than the wall time points at the host (launches,
synchronisation, post-processing); a device busy for about the wall time at
a rate below the bare forward pass points at extra device work.

    python bench/probe_busy.py --annotators depth,seg      # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]


def build(name: str, folder: str):
    from annotators import create_annotator

    if name in ("depth", "normal"):
        from bench_hf_annotators import build_dpt_hybrid

        return create_annotator(name, model=build_dpt_hybrid(os.path.join(folder, "dpt"), False))
    if name == "seg":
        from bench_hf_annotators import build_upernet_convnext_small

        return create_annotator(name, model=build_upernet_convnext_small(os.path.join(folder, "seg"), False))
    if name in ("hed", "mlsd", "openpose"):
        from bench_neural_annotators import save_random_weights

        if not os.path.exists(os.path.join(folder, "body_pose_model.pth")):
            save_random_weights(folder)
        return create_annotator(name, weights=folder)
    raise SystemExit(f"no builder for {name!r}")


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench_neural_annotators import photos

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--annotators", default="depth")
    ap.add_argument("--batch", type=int, default=0, help="images per call (0: each annotator's default)")
    ap.add_argument("--iters", type=int, default=8)
    args = ap.parse_args()
    folder = tempfile.mkdtemp()
    for name in args.annotators.split(","):
        ann = build(name, folder)
        ann.setup()
        batch = args.batch or type(ann).default_batch_size
        images = photos(batch * 2, 512)
        first, second = images[:batch], images[batch:]
        calls = iter(range(10**9))

        def call(imgs) -> None:
            # keys unique per call: depth/normal memoise the last batches' predictions
            k = next(calls)
            ann.annotate_batch(imgs, [f"{k}-{i}" for i in range(len(imgs))])

        for _ in range(2):
            call(first)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for k in range(args.iters):
            call(second if k % 2 else first)
        torch.cuda.synchronize()
        rate = batch * args.iters / (time.perf_counter() - t)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            call(second)
            call(first)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
        events = prof.key_averages()
        busy_us = sum(getattr(e, "self_device_time_total", 0.0) for e in events)
        top = sorted(events, key=lambda e: -getattr(e, "self_device_time_total", 0.0))[:25]
        print(json.dumps({
            "annotator": name, "batch": batch, "device": torch.cuda.get_device_name(),
            "images_per_s": round(rate, 1),
            "profiled_wall_ms_per_batch": round(wall / 2 * 1e3, 2),
            "device_busy_ms_per_batch": round(busy_us / 2e3, 2),
            "top_kernels_ms_per_batch": {e.key[:90]: round(e.self_device_time_total / 2e3, 3) for e in top},
        }), flush=True)
        print(events.table(sort_by="cpu_time_total", row_limit=20, max_name_column_width=70), flush=True)


if __name__ == "__main__":
    main()
