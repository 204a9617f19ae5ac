"""Where OpenPose's time goes on a GPU: the bare forward of the OpenPose body,
HED and M-LSD networks at several batch sizes (bf16, channels-last, as the
annotators run them), the OpenPose annotator at several chunk sizes, and a
profile of two batches.

    python bench/probe_openpose.py            # on a GPU; prints JSON lines
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]


def main() -> None:
    import torch

    from annotators import create_annotator
    from annotators import weights as W
    from bench_neural_annotators import photos, save_random_weights

    folder = tempfile.mkdtemp()
    save_random_weights(folder)
    images = photos(512, 512)
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

    nets = {"openpose": ann}
    for name in ("hed", "mlsd"):
        nets[name] = create_annotator(name, weights=folder)
        nets[name].setup()
    for name, a in nets.items():
        net = a._body if name == "openpose" else a._net
        for b in (1, 2, 4, 8, 16, 24, 32, 48, 64):
            x = W.to_input(bare_input(name, a, b, 512), a._device, a._dtype)
            with torch.inference_mode():
                out["bare"][f"{name}_b{b}"] = rate(lambda: net(x), b, iters=max(4, 64 // b))
        print(json.dumps({k: v for k, v in out["bare"].items() if k.startswith(name)}), flush=True)
    net = ann._body
    for chunk, graphs in ((24, True), (32, True), (40, True), (48, True), (56, True), (64, True), (48, False)):
        a = create_annotator("openpose", weights=folder, chunk_size=chunk, cuda_graphs=graphs)
        a.setup()
        a._body = net
        out["ours"][f"chunk{chunk}" + ("" if graphs else "_no_cuda_graphs")] = rate(
            lambda: a.annotate_batch(images[:64]), 64, iters=6)
    print(json.dumps(out["ours"]), flush=True)

    # host time per phase of annotate_batch (default options: chunks of 48,
    # CUDA graphs), over 8 batches of 64
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
    a.annotate_batch(images[:64])
    torch.cuda.synchronize()
    phases.clear()
    t = time.perf_counter()
    for k in range(8):
        a.annotate_batch(images[64 * k : 64 * (k + 1)])
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    print(json.dumps({"wall_ms_per_batch64": round(wall / 8 * 1e3, 2),
                      **{k: round(v / 8 * 1e3, 2) for k, v in phases.items()}}), flush=True)

    from torch.profiler import ProfilerActivity, profile

    a = create_annotator("openpose", weights=folder)
    a.setup()
    a._body = net
    a.annotate_batch(images[:64])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            a.annotate_batch(images[64:128])
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=60))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
