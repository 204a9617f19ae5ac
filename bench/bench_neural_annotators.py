"""Throughput of the batched HED, M-LSD and OpenPose annotators against
controlnet-aux's per-image detectors, on the same device and images.

For each annotator it measures, in one run:

* ``ours``: images/s of ``annotate_batch`` (batched, bf16 on a GPU by default),
  from uint8 images on the host to finished members on the host;
* ``reference``: images/s of controlnet-aux's detector called once per image
  (fp32, detect and image resolution = the image size);
* ``ours_no_cuda_graphs``: the same with ``cuda_graphs=False`` (the network
  launched kernel by kernel rather than replayed from a CUDA graph);
* ``bare_forward``: images/s of the batched (eager) network forward pass alone, on
  an input already on the device, in the same precision as ``ours``;
* peak GPU memory of ``ours``;
* for OpenPose also ``ours_with_detections``: the same real network, its
  output replaced by heatmaps/PAFs of known skeletons (one to three people
  per image), so peak search, limb association and drawing do real work
  (random weights detect nobody). The headline numbers stay the random-weight
  ones.

``ours`` and ``bare_forward`` are timed over the same number of images (at
least ``--images``, default 1024) in batches of ``--batch-size``, after
warm-up batches that are not timed.

Weights are seeded random tensors of the real architectures (nothing is
downloaded). Prints one JSON summary on stdout.

    python bench/bench_neural_annotators.py                  # GPU, 512 px
    python bench/bench_neural_annotators.py --smoke          # tiny CPU check
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import warnings

import cv2
import numpy as np

warnings.filterwarnings("ignore")


def save_random_weights(folder: str, seed: int = 0) -> dict:
    """Seeded random weights of the real networks under their real file names."""
    import torch
    from controlnet_aux.hed import ControlNetHED_Apache2
    from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large
    from controlnet_aux.open_pose.model import bodypose_model

    torch.manual_seed(seed)
    nets = {
        "ControlNetHED.pth": ControlNetHED_Apache2().float().eval(),
        "mlsd_large_512_fp32.pth": MobileV2_MLSD_Large().eval(),
        "body_pose_model.pth": bodypose_model().eval(),
    }
    for name, net in nets.items():
        state = net.state_dict()
        if name == "body_pose_model.pth":  # the file omits the block prefix
            state = {k.split(".", 1)[1]: v for k, v in state.items()}
        torch.save(state, os.path.join(folder, name))
    return nets


def photos(n: int, size: int) -> list[np.ndarray]:
    from skimage import data

    base = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    out = []
    for i in range(n):
        im = base[i % len(base)]
        if im.ndim == 2:
            im = np.stack([im] * 3, -1)
        im = cv2.resize(im[..., :3], (size, size), interpolation=cv2.INTER_AREA)
        if i >= len(base):  # vary the pixels so nothing is cached by accident
            im = np.ascontiguousarray(np.roll(im, 7 * i, axis=1))
        out.append(im)
    return out


def reference_detector(name: str, nets: dict, device):
    from controlnet_aux.hed import HEDdetector
    from controlnet_aux.mlsd import MLSDdetector
    from controlnet_aux.open_pose import OpenposeDetector
    from controlnet_aux.open_pose.body import Body

    if name == "hed":
        return HEDdetector(nets["ControlNetHED.pth"]).to(device)
    if name == "mlsd":
        return MLSDdetector(nets["mlsd_large_512_fp32.pth"]).to(device)
    body = Body.__new__(Body)
    body.model = nets["body_pose_model.pth"]
    return OpenposeDetector(body.to(device))


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_input(name: str, ann, batch: int, size: int):
    """A prepared network input batch on the device, as ``ours`` builds it."""
    import torch

    g = torch.Generator().manual_seed(0)
    if name == "hed":
        x = torch.rand((batch, 3, size, size), generator=g) * 255
    elif name == "mlsd":
        x = torch.rand((batch, 4, size, size), generator=g) * 2 - 1
    else:
        geo = ann.geometry(size, size)
        x = torch.rand((batch, 3, geo.ph, geo.pw), generator=g) - 0.5
    return x.to(ann._device)


def bare_forward_rate(name: str, ann, batch: int, size: int, iters: int, warmup: int = 2) -> float:
    import torch

    from annotators import weights as W

    net = {"hed": "_net", "mlsd": "_net", "openpose": "_body"}[name]
    net = getattr(ann, net)
    x = W.to_input(bare_input(name, ann, batch, size), ann._device, ann._dtype)
    with torch.inference_mode():
        for _ in range(warmup):
            net(x)
        sync(ann._device)
        t = time.perf_counter()
        for _ in range(iters):
            net(x)
        sync(ann._device)
    return batch * iters / (time.perf_counter() - t)


def ours_rate(ann, images: list[np.ndarray], batch: int, warmup: int = 2) -> tuple[float, dict]:
    for _ in range(warmup):  # kernels, cached matrices, pinned host blocks
        ann.annotate_batch(images[:batch])
    sync(ann._device)
    t = time.perf_counter()
    metas = []
    for i in range(0, len(images), batch):
        metas += [a.meta for a in ann.annotate_batch(images[i : i + batch])]
    sync(ann._device)
    rate = len(images) / (time.perf_counter() - t)
    summary = {}
    for key in ("lines", "people", "keypoints", "edge_fraction"):
        vals = [m[key] for m in metas if key in m]
        if vals:
            summary[f"mean_{key}"] = round(float(np.mean(vals)), 4)
    return rate, summary


class _WithDetections:
    """Wraps the body network: runs it (so its cost is real), then returns
    heatmaps/PAFs rendered from known skeletons, cycling over the scenes."""

    def __init__(self, net, geo, device, dtype) -> None:
        import torch

        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        import _neural_fixtures as fx

        pafs, heats = zip(*(fx._render(fx.SCENES[k], geo.oh, geo.ow, geo.sh, geo.sw) for k in sorted(fx.SCENES)))
        self.net = net
        self.paf = torch.as_tensor(np.stack(pafs), dtype=dtype, device=device)
        self.heat = torch.as_tensor(np.stack(heats), dtype=dtype, device=device)

    def __call__(self, x):
        import torch

        self.net(x)
        pick = torch.arange(x.shape[0], device=self.paf.device) % self.paf.shape[0]
        return self.paf[pick], self.heat[pick]


def reference_rate(det, images: list[np.ndarray], device) -> float:
    import torch

    size = min(images[0].shape[:2])
    with torch.no_grad():
        det(images[0], detect_resolution=size, image_resolution=size, output_type="np")
        sync(device)
        t = time.perf_counter()
        for im in images:
            det(im, detect_resolution=size, image_resolution=size, output_type="np")
        sync(device)
    return len(images) / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (64 px, a few images)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--precision", default=None, help="fp32, bf16, fp16 (default: bf16 on GPU)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--images", type=int, default=960,
                   help="timed images for ours and the bare forward (960: whole batches of 64 and of 160)")
    p.add_argument("--ref-images", type=int, default=None, help="images for the reference (default: per annotator)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per annotate_batch call and per bare forward (default: each annotator's own)")
    p.add_argument("--chunk-size", type=int, default=None, help="pipeline chunk (default: the annotators' own)")
    p.add_argument("--no-detections", action="store_true", help="skip the OpenPose run with synthetic detections")
    p.add_argument("--annotators", default="hed,mlsd,openpose")
    args = p.parse_args(argv)

    import torch

    from annotators import create_annotator
    from annotators._torch import resolve_device

    if args.smoke:
        args.device = args.device or "cpu"
        args.size, args.images, args.batch_size = 128, 4, 2
        args.ref_images = args.ref_images or 2
    device = resolve_device(args.device)
    names = [n.strip() for n in args.annotators.split(",") if n.strip()]
    # the per-image reference is slow; fewer images keep the run short
    default_ref = {"hed": 64, "mlsd": 64, "openpose": 16}

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        nets = save_random_weights(folder)
        images = photos(args.images, args.size)
        for name in names:
            ann = create_annotator(
                name, weights=folder, device=str(device), precision=args.precision,
                **({"chunk_size": args.chunk_size} if args.chunk_size else {}),
            )
            ann.setup()
            # the annotator's own default batch unless --batch-size says otherwise
            batch = args.batch_size or ann.default_batch_size
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            ours, summary = ours_rate(ann, images, batch)
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
            eager = None
            if device.type == "cuda":
                # the annotator replays CUDA graphs of its network by default; the same without
                plain = create_annotator(
                    name, weights=folder, device=str(device), precision=args.precision, cuda_graphs=False,
                    **({"chunk_size": args.chunk_size} if args.chunk_size else {}),
                )
                plain.setup()
                eager, _ = ours_rate(plain, images, batch)
                del plain
            # the same number of images as ours, in batches of the same size
            bare = bare_forward_rate(name, ann, batch, args.size, -(-len(images) // batch))
            detections = {}
            if name == "openpose" and not args.no_detections:
                geo = ann.geometry(args.size, args.size)
                ann._body = _WithDetections(ann._body, geo, ann._device, ann._dtype)
                # graphs captured so far replay the plain network: capture anew
                ann.__dict__.pop("_graphed_forwards", None)
                ann.__dict__.pop("_body_stages", None)
                rate, seen = ours_rate(ann, images, batch)
                detections = {
                    "ours_with_detections_img_s": round(rate, 2),
                    "fraction_of_bare_forward_with_detections": round(rate / bare, 3),
                    **{f"{k}_with_detections": v for k, v in seen.items()},
                }
            del ann
            if device.type == "cuda":
                torch.cuda.empty_cache()
            det = reference_detector(name, nets, device)
            n_ref = args.ref_images or default_ref.get(name, 16)
            ref = reference_rate(det, images[:n_ref], device)
            results[name] = {
                "ours_img_s": round(ours, 2),
                "ours_no_cuda_graphs_img_s": None if eager is None else round(eager, 2),
                "reference_img_s": round(ref, 2),
                "bare_forward_img_s": round(bare, 2),
                "speedup_vs_reference": round(ours / ref, 2),
                "fraction_of_bare_forward": round(ours / bare, 3),
                "peak_gpu_mem_mib": None if peak is None else round(peak, 1),
                "batch_size": batch,
                "images_ours": len(images),
                "images_reference": n_ref,
                **summary,
                **detections,
            }
            print(f"{name}: {json.dumps(results[name])}", file=sys.stderr)

    summary = {
        "benchmark": "neural_annotators",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "precision": args.precision or ("bf16" if device.type == "cuda" else "fp32"),
        "torch": torch.__version__,
        "size": args.size,
        "batch_size": args.batch_size,
        "chunk_size": args.chunk_size,
        "smoke": args.smoke,
        "weights": "seeded random (real architectures)",
        "results": results,
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
