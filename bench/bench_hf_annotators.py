"""Throughput of the depth, seg and caption annotators: batched on the GPU in
bf16, side by side in the same run with three baselines: the annotator at
batch 1 in fp32, transformers' own per-image fp32 inference, and
transformers' own batched bf16 inference (processor on the host for the
batch, bf16 weights, same post-processing). Warm-up batches are excluded
from every timing.

Models are random-weight instances of the real default architectures
(MiDaS DPT-hybrid, UperNet-ConvNeXt-S, BLIP-large), their configs built here
from the published config values (nothing is downloaded), written with
``save_pretrained`` and loaded by the annotators as local folders. Inputs are
512 px photos; post-processing (maps back on the host as numpy arrays,
captions decoded) is included in every number. Captions are forced to
exactly 20 new tokens so that random weights do the same work as real ones.

Also timed in the same run: the bare forward pass alone (pixel values
already on the device, nothing copied back) of transformers' model as loaded
and of the annotator's prepared model, at the same batch and precision, so
that "ours / bare" separates the cost of pre- and post-processing and
transfers from the network itself. Depth and seg rows replay CUDA graphs of
the forward pass (the annotators' default on a GPU) unless named
``no_cuda_graphs``; the batch-1 fp32 baseline launches eagerly. ``--compile`` adds the annotators with
``compile=True`` (and their bare compiled forward; the compile time is the
warm-up, reported apart); ``--chunk-sizes`` times other ``chunk_size``
values of depth and seg.

    python bench/bench_hf_annotators.py                # on a GPU
    python bench/bench_hf_annotators.py --compile --models depth,seg
    python bench/bench_hf_annotators.py --smoke        # tiny models on the CPU

Prints one JSON summary on stdout (and writes it to ``--out`` if given).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: Images/s targets on one H100-class GPU, batched bf16, post-processing included.
TARGETS = {"depth": 700.0, "seg": 350.0, "caption": 150.0}
CAPTION_TOKENS = 20
#: Warm-up goes on for at least this long (and the given number of batches)
#: before a row is timed, so GPU clocks and allocator pools have settled;
#: set from ``--min-warmup-s``.
MIN_WARMUP_S = 0.0


def _warm_up(step, warmup: int) -> int:
    """Run ``step(i)`` for at least ``warmup`` steps and ``MIN_WARMUP_S``
    seconds; returns how many ran."""
    t0 = time.perf_counter()
    i = 0
    while i < warmup or time.perf_counter() - t0 < MIN_WARMUP_S:
        step(i)
        i += 1
    return i


# ------------------------------------------------------------------ models


def build_dpt_hybrid(folder: str, tiny: bool) -> str:
    """Intel/dpt-hybrid-midas: ViT-B/16 on a BiT-R50 stem, 384 px, MiDaS head."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    size = 64 if tiny else 384
    bit = dict(
        global_padding="same", layer_type="bottleneck", embedding_dynamic_padding=True,
        out_features=["stage1", "stage2", "stage3"],
        depths=[1, 1, 1] if tiny else [3, 4, 9],
        hidden_sizes=[8, 16, 32, 64] if tiny else [256, 512, 1024, 2048],
        num_groups=2 if tiny else 32,
    )
    config = DPTConfig(
        is_hybrid=True, image_size=size, patch_size=16, readout_type="project",
        hidden_size=32 if tiny else 768,
        num_hidden_layers=4 if tiny else 12,
        num_attention_heads=4 if tiny else 12,
        intermediate_size=37 if tiny else 3072,
        backbone_out_indices=[0, 1, 2, 3] if tiny else [2, 5, 8, 11],
        backbone_config=bit,
        backbone_featmap_shape=[1, bit["hidden_sizes"][2], size // 16, size // 16],
        neck_hidden_sizes=[8, 16, 32, 32] if tiny else [256, 512, 768, 768],
        reassemble_factors=[1, 1, 1, 0.5],
        fusion_hidden_size=16 if tiny else 256,
        neck_ignore_stages=[0, 1],
        use_auxiliary_head=False,
    )
    DPTForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(
        size={"height": size, "width": size}, keep_aspect_ratio=False, ensure_multiple_of=1,
        image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3,
    ).save_pretrained(folder)
    return folder


def build_upernet_convnext_small(folder: str, tiny: bool) -> str:
    """openmmlab/upernet-convnext-small: ConvNeXt-S backbone, UperNet head, 150 classes, 512 px."""
    from transformers import ConvNextConfig, ConvNextImageProcessor, UperNetConfig, UperNetForSemanticSegmentation

    backbone = ConvNextConfig(
        depths=[1, 1, 1, 1] if tiny else [3, 3, 27, 3],
        hidden_sizes=[8, 16, 32, 64] if tiny else [96, 192, 384, 768],
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = UperNetConfig(
        backbone_config=backbone,
        hidden_size=16 if tiny else 512,
        pool_scales=[1, 2, 3, 6],
        use_auxiliary_head=not tiny,
        auxiliary_in_channels=backbone.hidden_sizes[2],
        auxiliary_channels=16 if tiny else 256,
        num_labels=150,
    )
    UperNetForSemanticSegmentation(config).save_pretrained(folder)
    ConvNextImageProcessor(
        size={"shortest_edge": 384 if tiny else 512}, crop_pct=0.875, resample=3,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)
    return folder


def build_blip_large(folder: str, tiny: bool) -> str:
    """Salesforce/blip-image-captioning-large: ViT-L/16 at 384 px + BERT-base decoder."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    vocab_size = 64 if tiny else 30524
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # BERT's layout: [PAD]=0, [CLS]=101, [SEP]=102, [DEC]=30522 (BLIP's bos)
    vocab = [f"w{i}" for i in range(vocab_size)]
    pad, unk, cls, sep, mask = (0, 1, 2, 3, 4) if tiny else (0, 100, 101, 102, 103)
    for tok, i in zip(specials, (pad, unk, cls, sep, mask)):
        vocab[i] = tok
    dec = vocab_size - 2
    vocab[dec] = "[DEC]"
    table = {tok: i for i, tok in enumerate(vocab)}
    os.makedirs(folder, exist_ok=True)
    try:
        tokenizer = BertTokenizer(vocab=table, bos_token="[DEC]")
    except TypeError:  # transformers 4 reads a vocab file
        path = os.path.join(folder, "vocab.txt")
        with open(path, "w") as f:
            f.write("\n".join(vocab) + "\n")
        tokenizer = BertTokenizer(vocab_file=path, bos_token="[DEC]")
    size = 64 if tiny else 384
    config = BlipConfig(
        vision_config=dict(
            image_size=size, patch_size=16,
            hidden_size=32 if tiny else 1024,
            num_hidden_layers=2 if tiny else 24,
            num_attention_heads=4 if tiny else 16,
            intermediate_size=37 if tiny else 4096,
        ),
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=32 if tiny else 768,
            num_hidden_layers=2 if tiny else 12,
            num_attention_heads=4 if tiny else 12,
            intermediate_size=37 if tiny else 3072,
            encoder_hidden_size=32 if tiny else 1024,
            max_position_embeddings=64 if tiny else 512,
            bos_token_id=dec, sep_token_id=sep, pad_token_id=pad, eos_token_id=sep,
        ),
        projection_dim=32 if tiny else 256,
        image_text_hidden_size=32 if tiny else 256,
    )
    BlipForConditionalGeneration(config).save_pretrained(folder)
    BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": size, "width": size}), tokenizer=tokenizer
    ).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------ inputs


def photos(n: int, size: int) -> list[np.ndarray]:
    """``n`` distinct RGB uint8 ``size`` x ``size`` arrays cut from skimage photos."""
    import cv2
    from skimage import data

    base = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    out = []
    for i in range(n):
        im = base[i % len(base)]
        h, w = im.shape[:2]
        s = min(h, w) - (i // len(base)) % 32  # vary the crop so images differ
        top, left = (h - s) // 2, (w - s) // 2
        crop = im[top : top + s, left : left + s]
        out.append(np.ascontiguousarray(cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)))
    return out


# ------------------------------------------------------------------ timing


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    import torch

    if device.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return None


def time_ours(annotators, images, batch: int, iters: int, warmup: int, device: str) -> dict:
    """images/s of ``annotate_batch`` over ``iters`` batches (fresh keys each
    batch, so no result is reused across batches)."""
    for a in annotators:
        a.setup()
    batches = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)] or [images[:batch]]

    def run(it: int) -> None:
        chunk = batches[it % len(batches)]
        keys = [f"b{it}-{j}" for j in range(len(chunk))]
        for a in annotators:
            out = a.annotate_batch(chunk, keys)
            assert len(out) == len(chunk)

    t0 = time.perf_counter()
    done = _warm_up(run, warmup)
    _sync(device)
    warmup_s = time.perf_counter() - t0
    _reset_peak(device)
    t0 = time.perf_counter()
    for it in range(iters):
        run(done + it)
    _sync(device)
    seconds = time.perf_counter() - t0
    n = iters * len(batches[0])
    return {"images": n, "seconds": round(seconds, 4), "images_per_s": round(n / seconds, 2),
            "batch": len(batches[0]), "peak_gib": _peak_gib(device), "warmup_s": round(warmup_s, 2)}


def time_forward(forward, pixels, iters: int, warmup: int, device: str) -> dict:
    """images/s of ``forward(pixels)`` alone: the inputs already on the
    device, nothing copied back, one synchronisation at the end."""
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        _warm_up(lambda _: forward(pixels), warmup)
        _sync(device)
        warmup_s = time.perf_counter() - t0
        _reset_peak(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            forward(pixels)
        _sync(device)
        seconds = time.perf_counter() - t0
    n = iters * int(pixels.shape[0])
    return {"images": n, "seconds": round(seconds, 4), "images_per_s": round(n / seconds, 2),
            "batch": int(pixels.shape[0]), "peak_gib": _peak_gib(device), "warmup_s": round(warmup_s, 2)}


def bare_forwards(kind: str, folder: str, device: str, images, iters: int, warmup: int) -> dict:
    """Forward-only rows of transformers' model as loaded (bf16 weights,
    its own layout, the auxiliary head where the config has one) and, for
    seg, without the auxiliary head (what the annotator runs)."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation, AutoModelForSemanticSegmentation

    cls = AutoModelForDepthEstimation if kind == "depth" else AutoModelForSemanticSegmentation
    proc = AutoImageProcessor.from_pretrained(folder)
    model = cls.from_pretrained(folder).to(device, torch.bfloat16).eval()
    pixels = proc(images=list(images), return_tensors="pt")["pixel_values"].to(device, torch.bfloat16)
    b = len(images)
    try:
        rows = {f"transformers_forward_bf16_batch{b}": time_forward(lambda x: model(pixel_values=x), pixels,
                                                                     iters, warmup, device)}
    except RuntimeError as exc:
        # e.g. DPT over 113 images at once: CUDA's NHWC upsampling refuses
        # tensors of INT_MAX elements (the annotator splits such batches)
        rows = {f"transformers_forward_bf16_batch{b}": {"error": (str(exc).splitlines() or [type(exc).__name__])[0]}}
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return rows
    if getattr(model, "auxiliary_head", None) is not None:
        model.auxiliary_head = None
        rows[f"transformers_forward_bf16_batch{b}_no_aux_head"] = time_forward(
            lambda x: model(pixel_values=x), pixels, iters, warmup, device)
    del model
    return rows


def ours_forward(annotator, images, iters: int, warmup: int, device: str) -> dict:
    """Forward-only row of the annotator's prepared model (its layout,
    precision and, if enabled, compiled forward) on device-side pixels."""
    from annotators.hf_models import model_batches

    annotator.setup()
    m = annotator._model
    ((_, pixels),) = model_batches(images, m.preprocess, m.device, m.dtype)
    return time_forward(m.forward, pixels, iters, warmup, device)


def reference_runner(kind: str, folder: str, device: str, caption_kwargs: dict, dtype: str = "fp32"):
    """transformers' own inference as its documentation shows it: processor
    on the host for a list of images, model on ``device`` with its weights
    in ``dtype`` (``torch_dtype``-style), then the same post-processing as
    the annotator (maps back on the host, captions decoded). Called with one
    image, it is the per-image baseline; with a batch, the batched one."""
    import torch
    from transformers import (AutoImageProcessor, AutoModelForDepthEstimation,
                              AutoModelForSemanticSegmentation, AutoProcessor, BlipForConditionalGeneration)

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    if kind == "depth":
        proc = AutoImageProcessor.from_pretrained(folder)
        model = AutoModelForDepthEstimation.from_pretrained(folder).to(device, torch_dtype).eval()

        def run(batch):
            with torch.inference_mode():
                inputs = proc(images=list(batch), return_tensors="pt").to(device)
                out = model(pixel_values=inputs["pixel_values"].to(torch_dtype))
                out.predicted_depth = out.predicted_depth.float()
                sizes = [im.shape[:2] for im in batch]
                maps = []
                for r in proc.post_process_depth_estimation(out, target_sizes=sizes):
                    d = r["predicted_depth"]
                    d = (d - d.min()) / (d.max() - d.min())
                    maps.append((d * 255).clamp(0, 255).to(torch.uint8).cpu().numpy())
                return maps
    elif kind == "seg":
        proc = AutoImageProcessor.from_pretrained(folder)
        model = AutoModelForSemanticSegmentation.from_pretrained(folder).to(device, torch_dtype).eval()

        def run(batch):
            with torch.inference_mode():
                inputs = proc(images=list(batch), return_tensors="pt").to(device)
                logits = model(pixel_values=inputs["pixel_values"].to(torch_dtype)).logits
                logits = torch.nn.functional.interpolate(logits, size=batch[0].shape[:2], mode="bilinear")
                return logits.argmax(1).to(torch.uint8).cpu().numpy()
    else:
        proc = AutoProcessor.from_pretrained(folder)
        model = BlipForConditionalGeneration.from_pretrained(folder).to(device, torch_dtype).eval()

        def run(batch):
            with torch.inference_mode():
                inputs = proc(images=list(batch), return_tensors="pt").to(device)
                tokens = model.generate(pixel_values=inputs["pixel_values"].to(torch_dtype), **caption_kwargs)
                return proc.batch_decode(tokens, skip_special_tokens=True)
    return run


def time_reference(run, images, iters: int, warmup: int, device: str, batch: int = 1) -> dict:
    """images/s of ``run`` over ``iters`` batches of ``batch`` images."""
    chunks = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)] or [images[:batch]]
    _warm_up(lambda i: run(chunks[i % len(chunks)]), warmup)
    _sync(device)
    _reset_peak(device)
    t0 = time.perf_counter()
    for i in range(iters):
        run(chunks[i % len(chunks)])
    _sync(device)
    seconds = time.perf_counter() - t0
    n = iters * len(chunks[0])
    return {"images": n, "seconds": round(seconds, 4), "images_per_s": round(n / seconds, 2),
            "batch": len(chunks[0]), "peak_gib": _peak_gib(device)}


# -------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, few CPU iterations")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--models", default="depth,seg,caption", help="subset of depth,seg,caption")
    parser.add_argument("--iters", type=int, default=None, help="timed batches per batched config")
    parser.add_argument("--ref-images", type=int, default=None, help="images timed one by one")
    parser.add_argument("--ref-iters", type=int, default=None,
                        help="timed batches of transformers' batched bf16 baseline (default: --iters / 2)")
    parser.add_argument("--size", type=int, default=None, help="input image size (default 512; smoke 96)")
    parser.add_argument("--depth-batch", type=int, default=64)
    parser.add_argument("--seg-batch", type=int, default=32)
    parser.add_argument("--caption-batch", type=int, default=64)
    parser.add_argument("--caption-beams", default="3,1", help="beam widths to time (batched)")
    parser.add_argument("--compile", action="store_true",
                        help="also time depth/seg with compile=True (after the eager rows)")
    parser.add_argument("--chunk-sizes", default="",
                        help="comma-separated chunk_size values of depth/seg to time besides the default")
    parser.add_argument("--no-reference", action="store_true",
                        help="depth, seg: skip the batch-1 fp32 and transformers end-to-end baselines")
    parser.add_argument("--min-warmup-s", type=float, default=None,
                        help="warm up each row for at least this long (default 2 s; smoke 0)")
    parser.add_argument("--out", default=None, help="also write the JSON summary here")
    args = parser.parse_args(argv)

    import torch
    import transformers

    from annotators import create_annotator
    from annotators.hf_models import clear_shared

    transformers.logging.set_verbosity_error()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.smoke
    size = args.size or (96 if tiny else 512)
    iters = args.iters or (1 if tiny else 20)
    ref_n = args.ref_images or (3 if tiny else 32)
    ref_iters = args.ref_iters or max(1, iters // 2)
    warmup = 1 if tiny else 3
    global MIN_WARMUP_S
    MIN_WARMUP_S = args.min_warmup_s if args.min_warmup_s is not None else (0.0 if tiny else 2.0)
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    chunk_sizes = [int(c) for c in args.chunk_sizes.split(",") if c.strip()]
    beams = [int(b) for b in args.caption_beams.split(",") if b.strip()]
    if tiny:
        args.depth_batch, args.seg_batch, args.caption_batch = 4, 4, 4
        beams = beams[:1]
    caption_kwargs = dict(max_new_tokens=CAPTION_TOKENS, min_new_tokens=CAPTION_TOKENS)

    summary: dict = {
        "benchmark": "hf_annotators",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers_version": transformers.__version__,
        "smoke": tiny,
        "image_size": size,
        "caption_new_tokens": CAPTION_TOKENS,
        "ours": "weights in the timed precision (bf16 rows: bf16 weights, no autocast); on a GPU "
                "NHWC convolutions (depth neck/head, all of seg) and fused ViT attention (caption); "
                "pre-processing on the device, one device-to-host copy per batch",
        "transformers": "processor on the host, model weights in the row's precision, same post-processing",
        "forward_rows": "*_forward_*: forward pass alone, pixel values already on the device, one sync at the end",
        "compile": args.compile,
        "results": {},
    }
    builders = {"depth": build_dpt_hybrid, "seg": build_upernet_convnext_small, "caption": build_blip_large}
    batch_of = {"depth": args.depth_batch, "seg": args.seg_batch, "caption": args.caption_batch}
    with tempfile.TemporaryDirectory(prefix="bench_hf_") as tmp:
        for kind in wanted:
            torch.manual_seed(0)
            t0 = time.perf_counter()
            folder = builders[kind](os.path.join(tmp, kind), tiny)
            build_s = round(time.perf_counter() - t0, 1)
            batch = batch_of[kind]
            images = photos(max(batch * min(iters, 4), ref_n), size)
            rows: dict = {"model_build_s": build_s}

            def make(precision: str, **extra):
                return create_annotator(kind, model=folder, device=device, precision=precision, **extra)

            if kind == "caption":
                for nb in beams:
                    rows[f"ours_bf16_batch{batch}_beams{nb}"] = time_ours(
                        [make("bf16", num_beams=nb, **caption_kwargs)], images, batch, iters, warmup, device)
                rows[f"ours_fp32_batch1_beams{beams[0]}"] = time_ours(
                    [make("fp32", num_beams=beams[0], **caption_kwargs)], images, 1, ref_n, warmup, device)
                clear_shared()
                gen = dict(num_beams=beams[0], **caption_kwargs)
                run = reference_runner(kind, folder, device, gen)
                rows[f"transformers_fp32_batch1_beams{beams[0]}"] = time_reference(run, images, ref_n, warmup, device)
                del run
                run = reference_runner(kind, folder, device, gen, dtype="bf16")
                rows[f"transformers_bf16_batch{batch}_beams{beams[0]}"] = time_reference(
                    run, images, ref_iters, warmup, device, batch)
                headline = rows[f"ours_bf16_batch{batch}_beams{beams[0]}"]
            else:
                def normal(**extra):
                    return create_annotator("normal", model=folder, device=device, precision="bf16", **extra)

                rows[f"ours_bf16_batch{batch}"] = time_ours([make("bf16")], images, batch, iters, warmup, device)
                if device.startswith("cuda"):
                    # the headline row replays CUDA graphs (the default on a GPU); this one launches eagerly
                    rows[f"ours_bf16_batch{batch}_no_cuda_graphs"] = time_ours(
                        [make("bf16", cuda_graphs=False)], images, batch, iters, warmup, device)
                    probe = make("bf16")
                    probe.setup()
                    graphs = list(probe._model.__dict__.get("_graphed_forwards", {}).values())
                    rows["cuda_graphs_captured"] = sum(g.captured for g in graphs)
                    rows["cuda_graphs_error"] = next((g.error for g in graphs if g.error), None)
                    del probe
                if kind == "depth":
                    both = [make("bf16"), normal()]
                    rows[f"ours_bf16_batch{batch}_depth+normal"] = time_ours(both, images, batch, iters, warmup, device)
                for c in chunk_sizes:
                    rows[f"ours_bf16_batch{batch}_chunk{c}"] = time_ours(
                        [make("bf16", chunk_size=c)], images, batch, iters, warmup, device)
                rows[f"ours_forward_bf16_batch{batch}"] = ours_forward(make("bf16"), images[:batch], iters, warmup, device)
                clear_shared()
                rows.update(bare_forwards(kind, folder, device, images[:batch], iters, warmup))
                if args.compile:
                    # after every eager row: the compiled forward belongs to the shared model
                    rows[f"ours_bf16_batch{batch}_compiled"] = time_ours(
                        [make("bf16", compile=True)], images, batch, iters, warmup, device)
                    if kind == "depth":
                        both = [make("bf16", compile=True), normal(compile=True)]
                        rows[f"ours_bf16_batch{batch}_depth+normal_compiled"] = time_ours(
                            both, images, batch, iters, warmup, device)
                    for c in chunk_sizes:
                        rows[f"ours_bf16_batch{batch}_chunk{c}_compiled"] = time_ours(
                            [make("bf16", chunk_size=c, compile=True)], images, batch, iters, warmup, device)
                    compiled = make("bf16", compile=True)
                    rows[f"ours_forward_bf16_batch{batch}_compiled"] = ours_forward(
                        compiled, images[:batch], iters, warmup, device)
                    rows["compile_active"] = compiled._model.compiled.active
                    rows["compile_error"] = compiled._model.compiled.error
                    del compiled
                    clear_shared()
                if not args.no_reference:
                    rows["ours_fp32_batch1"] = time_ours([make("fp32", cuda_graphs=False)], images, 1, ref_n,
                                                         warmup, device)
                    clear_shared()
                    run = reference_runner(kind, folder, device, {})
                    rows["transformers_fp32_batch1"] = time_reference(run, images, ref_n, warmup, device)
                    del run
                    run = reference_runner(kind, folder, device, {}, dtype="bf16")
                    rows[f"transformers_bf16_batch{batch}"] = time_reference(
                        run, images, ref_iters, warmup, device, batch)
                headline = rows[f"ours_bf16_batch{batch}"]
                fwd = rows[f"transformers_forward_bf16_batch{batch}"].get("images_per_s", float("nan"))
                own = rows[f"ours_forward_bf16_batch{batch}"]["images_per_s"]
                rows["ours_over_transformers_forward"] = round(headline["images_per_s"] / fwd, 3)
                rows["ours_over_own_forward"] = round(headline["images_per_s"] / own, 3)
                if args.compile:
                    best = rows[f"ours_bf16_batch{batch}_compiled"]["images_per_s"]
                    rows["compiled_over_transformers_forward"] = round(best / fwd, 3)
                    rows["compiled_over_eager"] = round(best / headline["images_per_s"], 3)
            run = None
            clear_shared()
            def speedup(prefix: str) -> float | None:
                found = [k for k in rows if k.startswith(prefix)]
                if not found:
                    return None
                return round(headline["images_per_s"] / rows[found[0]]["images_per_s"], 2)

            rows["speedup_vs_ours_batch1_fp32"] = speedup("ours_fp32_batch1")
            rows["speedup_vs_transformers_batch1_fp32"] = speedup("transformers_fp32")
            rows["speedup_vs_transformers_batched_bf16"] = speedup("transformers_bf16")
            rows["target_images_per_s"] = None if tiny else TARGETS[kind]
            rows["meets_target"] = None if tiny else headline["images_per_s"] >= TARGETS[kind]
            summary["results"][kind] = rows
            line = f"{kind}: {headline['images_per_s']} img/s batched bf16"
            if f"ours_bf16_batch{batch}_compiled" in rows:
                line += f", {rows[f'ours_bf16_batch{batch}_compiled']['images_per_s']} compiled"
            if f"transformers_forward_bf16_batch{batch}" in rows:
                line += f"; bare transformers forward {rows[f'transformers_forward_bf16_batch{batch}'].get('images_per_s', 'failed')}"
            if rows["speedup_vs_transformers_batch1_fp32"] is not None:
                line += f" ({rows['speedup_vs_transformers_batch1_fp32']}x transformers batch-1 fp32)"
            print(line, file=sys.stderr)

    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
