"""Where OpenPose's time goes on a GPU: the bare forward of the OpenPose body,
HED and M-LSD networks at several batch sizes (bf16, channels-last, as the
annotators run them), the OpenPose annotator at several chunk sizes, and a
profile of two batches.

    python bench/probe_openpose.py            # on a GPU; prints JSON lines
    python bench/probe_openpose.py --batch 160 --chunks 40,80,160 --bare openpose:40,80,160
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]


def main() -> None:
    import argparse

    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64, help="images per annotate_batch call")
    ap.add_argument("--chunks", default="24,32,40,48,56,64", help="chunk sizes to time (graphed)")
    ap.add_argument("--bare", default="openpose,hed,mlsd:1,2,4,8,16,24,32,48,64",
                    help="NETS:BATCHES for the bare forward passes ('' to skip)")
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    batch = args.batch

    from annotators import create_annotator
    from annotators import weights as W
    from bench_neural_annotators import photos, save_random_weights

    folder = tempfile.mkdtemp()
    save_random_weights(folder)
    images = photos(max(512, 8 * batch), 512)
    ann = create_annotator("openpose", weights=folder)
    ann.setup()
    geo = ann.geometry(512, 512)
    net = ann._body

    def rate(fn, n_images, iters=8):
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        return round(n_images * iters / (time.perf_counter() - t), 1)

    out = {"device": torch.cuda.get_device_name(), "bare": {}, "ours": {}}
    # bare forwards of the three networks as the annotators prepare them
    # (bf16, channels-last) at several batch sizes: cuDNN's kernel choice
    # changes with the batch size
    from bench_neural_annotators import bare_input

    bare_nets, _, bare_batches = args.bare.partition(":")
    nets = {}
    for name in [n for n in bare_nets.split(",") if n]:
        nets[name] = ann if name == "openpose" else create_annotator(name, weights=folder)
        nets[name].setup()
    for name, a in nets.items():
        net = a._body if name == "openpose" else a._net
        for b in [int(v) for v in bare_batches.split(",") if v]:
            x = W.to_input(bare_input(name, a, b, 512), a._device, a._dtype)
            with torch.inference_mode():
                out["bare"][f"{name}_b{b}"] = rate(lambda: net(x), b, iters=max(4, 64 // b))
        print(json.dumps({k: v for k, v in out["bare"].items() if k.startswith(name)}), flush=True)
    net = ann._body
    for chunk in [int(v) for v in args.chunks.split(",") if v]:
        a = create_annotator("openpose", weights=folder, chunk_size=chunk)
        a.setup()
        a._body = net
        out["ours"][f"batch{batch}_chunk{chunk}"] = rate(lambda: a.annotate_batch(images[:batch]), batch, iters=6)
    print(json.dumps(out["ours"]), flush=True)

    # host time per phase of annotate_batch (default options), over 8 batches
    from annotators import openpose as OP

    a = create_annotator("openpose", weights=folder)
    a.setup()
    a._body = net
    phases: dict[str, float] = {}

    def timed(owner, attr, label):
        original = getattr(owner, attr)

        def wrapper(*args, **kw):
            t = time.perf_counter()
            try:
                return original(*args, **kw)
            finally:
                phases[label] = phases.get(label, 0.0) + time.perf_counter() - t
        setattr(owner, attr, wrapper)

    timed(W, "_stage", "stage_images")
    timed(W, "images_to_device", "images_to_device (incl. staging)")
    timed(OP, "body_input", "body_input")
    timed(a, "forward", "forward (launch)")
    timed(OP, "peak_bounds", "peak_bounds")
    timed(a, "launch_bodies", "launch_bodies (all)")
    timed(a, "finish_bodies", "finish_bodies (incl. wait)")
    timed(a, "_annotation", "per-image annotation")
    a.annotate_batch(images[:batch])
    torch.cuda.synchronize()
    phases.clear()
    t = time.perf_counter()
    for k in range(8):
        a.annotate_batch(images[batch * k : batch * (k + 1)])
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    print(json.dumps({f"wall_ms_per_batch{batch}": round(wall / 8 * 1e3, 2),
                      **{k: round(v / 8 * 1e3, 2) for k, v in phases.items()}}), flush=True)

    if args.no_profile:
        print(json.dumps(out))
        return
    from torch.profiler import ProfilerActivity, profile

    a = create_annotator("openpose", weights=folder)
    a.setup()
    a._body = net
    a.annotate_batch(images[:batch])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(2):
            a.annotate_batch(images[batch:2 * batch])
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    # device time of all kernels and copies over the wall time (streams may overlap)
    busy_us = sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages())
    print(json.dumps({"profiled_wall_ms_per_batch": round(wall / 2 * 1e3, 2),
                      "device_busy_ms_per_batch": round(busy_us / 2e3, 2)}), flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=60))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
