"""Where a worker's first batch goes: each GPU annotator's first, second and
third call on the same batch, with and without CUDA graphs.

The end-to-end runs show a worker's first batch of all annotators taking
about three times a steady batch. This probe separates the one-off costs
(lazy kernel loading, library handles, warm-up and capture of CUDA graphs
per batch shape) by annotator, in one process, on random weights of the
real networks (as ``bench_e2e.py`` builds them)::

    python bench/probe_first_batch.py --images 250 --device cuda:0
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

GPU_ANNOTATORS = ("mlsd", "hed", "openpose", "depth", "normal", "seg", "caption")


def photos(count: int, side: int) -> list[np.ndarray]:
    """``count`` side x side crops of scikit-image's photos."""
    from skimage import data

    base = []
    for im in (data.astronaut(), data.coffee(), data.chelsea(), data.rocket()):
        im = im[..., :3]
        k = side / min(im.shape[:2])
        im = cv2.resize(im, (round(im.shape[1] * k), round(im.shape[0] * k)), interpolation=cv2.INTER_AREA)
        base.append(np.ascontiguousarray(im[:side, :side]))
    return [base[i % len(base)] for i in range(count)]


def timed_calls(annotator, images: list[np.ndarray], calls: int) -> list[float]:
    keys = [f"k{i}" for i in range(len(images))]
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        annotator.annotate_batch(images, keys)  # returns host arrays: the device is done
        out.append(round(time.perf_counter() - t0, 3))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=250)
    ap.add_argument("--side", type=int, default=512)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--caption-beams", type=int, default=1)
    ap.add_argument("--annotators", default=",".join(GPU_ANNOTATORS))
    ap.add_argument("--graphs", default="on", choices=("on", "off"),
                    help="CUDA graphs on or off (run each in its own process: the first "
                         "annotator of a process also pays the process's one-off costs)")
    ap.add_argument("--warm", action="store_true",
                    help="warm the device up first (annotators._torch.warm_device, as the pipeline's workers do)")
    args = ap.parse_args(argv)

    import torch

    from annotators import create_annotator, get_annotator_class
    from bench_e2e import build_models

    names = [n for n in args.annotators.split(",") if n]
    images = photos(args.images, args.side)
    result: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                    "images": args.images, "side": args.side, "calls": {}}
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(Path(tmp), tiny=False, beams=args.caption_beams)
        t0 = time.perf_counter()
        torch.zeros(1, device=args.device)
        result["cuda_init_s"] = round(time.perf_counter() - t0, 3)
        if args.warm:
            from annotators._torch import warm_device

            result["warm_s"] = round(warm_device(args.device, (torch.bfloat16, torch.float32)), 3)
            print("warm-up", result["warm_s"], "s", flush=True)
        graphs = args.graphs == "on"
        for name in names:
            options = dict(models[name])
            option_names = get_annotator_class(name).option_names()
            if "device" in option_names:
                options["device"] = args.device
            if "cuda_graphs" in option_names:
                options["cuda_graphs"] = graphs
            a = create_annotator(name, **options)
            t0 = time.perf_counter()
            a.setup()
            load = round(time.perf_counter() - t0, 3)
            calls = timed_calls(a, images, args.calls)
            label = f"{name}{'' if graphs else ' (eager)'}"
            result["calls"][label] = {"load_s": load, "calls_s": calls,
                                      "first_extra_s": round(calls[0] - min(calls[1:]), 3)}
            print(label, json.dumps(result["calls"][label]), flush=True)
            del a
            torch.cuda.empty_cache()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
