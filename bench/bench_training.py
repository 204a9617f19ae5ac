"""Training throughput: ControlNet locked / unlocked and plain UNet fine-tuning,
a diffusers-style step against the trainer's optimised step, in one run.

SD 1.5 architecture with random weights (the configuration is public and
built here in code, nothing is downloaded), 512 px, bf16, on one GPU::

    python bench/bench_training.py                 # GPU, SD1.5 shapes, 512 px
    python bench/bench_training.py --smoke         # tiny model on CPU (checks the script)
    torchrun --nproc-per-node 2 bench/bench_training.py --kinds locked   # DDP, two GPUs

Two step styles are measured for each of ``finetune``, ``locked``, ``unlocked``:

* ``diffusers``: what ``train_controlnet.py`` does every step: VAE-encode the
  images and run the text encoder, then the UNet (+ ControlNet) forward and
  backward; frozen weights in bf16, trained ones in fp32 under autocast,
  AdamW (for-each), contiguous (NCHW) tensors.
* ``optimised``: latents and text embeddings come from the cache that
  ``controlset cache-latents`` writes (the VAE and text encoder run once per
  sample, not once per epoch, so neither network is on the GPU while
  training): each step moves a cached batch (float16 latent distributions
  and text embeddings, as the trainer's DataLoader delivers them) to the
  device and turns it into model inputs with the trainer's own
  ``training.cache.cached_inputs``; channels-last memory format, fused
  AdamW, optional ``torch.compile``.

The caching stage itself is measured too (``cache_stage``: images/s of
``training.cache.encode_cache_batch``, the VAE on each image and its mirror
plus the text encoder), so its one-off cost can be set against the
training speed-up.

Prints one JSON summary (device, date, command, per-configuration images/s
and peak memory, the cache stage, and the speed-up of the optimised locked
step).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KINDS = ("finetune", "locked", "unlocked")
STYLES = ("diffusers", "optimised")


def sd15_components() -> dict:
    """Stable Diffusion 1.5's UNet, VAE and CLIP text encoder shapes, random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.18215,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    ))
    return {"unet": unet, "vae": vae, "text_encoder": text, "text_len": 77}


def tiny_components() -> dict:
    from training.tiny import tiny_components as tiny

    c = tiny()
    return {"unet": c["unet"], "vae": c["vae"], "text_encoder": c["text_encoder"], "text_len": 77}


def bench_base(comps: dict, vae=None, text_encoder=None):
    """A :class:`training.models.Base` over the benchmark's VAE and text
    encoder, with the byte-level tokenizer of the tiny model (its ids are
    valid for both text encoders; the weights are random either way)."""
    from training.models import Base
    from training.tiny import build_tokenizer

    return Base(unet=None, vae=vae or comps["vae"], text_encoder=text_encoder or comps["text_encoder"],
                tokenizer=build_tokenizer(comps["text_len"]), noise_scheduler=None, source="benchmark")


def cached_batch(comps: dict, batch_size: int, resolution: int, seed: int = 0) -> dict:
    """A batch as the trainer's DataLoader delivers it from cached shards
    (CPU tensors): float16 latent distributions (mean, log-variance) and
    text embeddings, and the prompt-dropout mask."""
    gen = torch.Generator().manual_seed(seed)
    c = comps["vae"].config.latent_channels
    h = resolution // 8
    mean = torch.randn(batch_size, c, h, h, generator=gen) * 4
    logvar = torch.full((batch_size, c, h, h), -8.0) + torch.randn(batch_size, c, h, h, generator=gen)
    hidden = comps["text_encoder"].config.hidden_size
    return {
        "latents": torch.cat([mean, logvar], dim=1).half(),
        "text_embeds": torch.randn(batch_size, comps["text_len"], hidden, generator=gen).half(),
        "empty_prompt": torch.rand(batch_size, generator=gen) < 0.5,
    }


def run_cache_stage(comps: dict, args, device: torch.device, dtype: torch.dtype) -> dict:
    """Images/s of the caching stage's encoder batch (image + mirror through
    the VAE encoder, caption through the text encoder) and its peak memory."""
    from training.cache import encode_cache_batch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    vae = copy.deepcopy(comps["vae"]).to(device, dtype).requires_grad_(False).eval()
    text_encoder = copy.deepcopy(comps["text_encoder"]).to(device, dtype).requires_grad_(False).eval()
    base = bench_base(comps, vae, text_encoder)
    b, r = args.cache_batch_size, args.resolution
    pixels = torch.rand(b, 3, r, r, generator=torch.Generator().manual_seed(0)) * 2 - 1
    captions = [f"a photograph of subject {i}, detailed" for i in range(b)]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        encode_cache_batch(base, pixels, captions, device, dtype)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        moments, _text = encode_cache_batch(base, pixels, captions, device, dtype)
    sync()
    elapsed = time.perf_counter() - t0
    result = {"stage": "cache", "batch_size": b, "images_per_s": round(b * args.steps / elapsed, 3),
              "batch_ms": round(1000 * elapsed / args.steps, 2), "latents_shape": list(moments.shape[1:])}
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del vae, text_encoder, base
    gc.collect()
    return result


def run_config(kind: str, style: str, comps: dict, args, device: torch.device, dtype: torch.dtype) -> dict:
    """Measure one (kind, style): images/s over ``args.steps`` timed steps, peak memory."""
    from diffusers import ControlNetModel, DDPMScheduler

    from training.cache import cached_inputs
    from training.models import decoder_modules

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    optimised = style == "optimised"
    # Fixed shapes: let cuDNN pick the fastest convolution algorithms (as the
    # trainer does); diffusers' script leaves this off.
    torch.backends.cudnn.benchmark = optimised and device.type == "cuda"
    unet = copy.deepcopy(comps["unet"])
    controlnet = ControlNetModel.from_unet(unet) if kind != "finetune" else None

    # Trained parameters stay fp32 (master weights); frozen ones are stored in dtype.
    if kind == "finetune":
        trained = list(unet.parameters())
    else:
        trained = list(controlnet.parameters())
        keep = {id(p) for m in decoder_modules(unet) for p in m.parameters()} if kind == "unlocked" else set()
        for p in unet.parameters():
            if id(p) not in keep:
                p.data = p.data.to(dtype)
        if kind == "unlocked":
            trained += [p for m in decoder_modules(unet) for p in m.parameters()]
    ids = {id(p) for p in trained}
    for m in (unet, controlnet):
        if m is not None:
            for p in m.parameters():
                p.requires_grad_(id(p) in ids)
            m.to(device).train()
            if optimised and args.channels_last:
                m.to(memory_format=torch.channels_last)
    vae = text_encoder = None
    if not optimised:  # the diffusers-style step runs both every step
        vae = copy.deepcopy(comps["vae"]).to(device, dtype).requires_grad_(False).eval()
        text_encoder = copy.deepcopy(comps["text_encoder"]).to(device, dtype).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(trained, lr=1e-5, fused=optimised and device.type == "cuda")
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    world = dist.get_world_size() if dist.is_initialized() else 1
    cn_run, unet_run = controlnet, unet
    if world > 1:  # what the trainer does under torchrun: DDP over the trained modules
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids_ = [device.index] if device.type == "cuda" else None

        if controlnet is not None:
            cn_run = DDP(controlnet, device_ids=ids_, gradient_as_bucket_view=True)
        if any(p.requires_grad for p in unet.parameters()):
            unet_run = DDP(unet, device_ids=ids_, gradient_as_bucket_view=True)

    def model(noisy, t, text, cond):
        kw = {}
        if cn_run is not None:
            down, mid = cn_run(noisy, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
            kw = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return unet_run(noisy, t, encoder_hidden_states=text, return_dict=False, **kw)[0]

    if optimised and args.compile:
        model = torch.compile(model)

    b, r = args.batch_size, args.resolution
    gen = torch.Generator(device=device).manual_seed(0)
    pixels = torch.rand(b, 3, r, r, device=device, generator=gen) * 2 - 1
    cond = torch.rand(b, 3, r, r, device=device, generator=gen)
    ids_ = torch.randint(0, 500, (b, comps["text_len"]), device=device, generator=gen)
    # The optimised step reads what `controlset cache-latents` wrote, as the trainer does.
    batch = cached_batch(comps, b, r)
    scaling = comps["vae"].config.scaling_factor
    if optimised and args.channels_last:
        cond = cond.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if optimised:
                with torch.no_grad():
                    latents, text = cached_inputs(batch, gen, device, scaling_factor=scaling,
                                                  empty_embedding=comps["empty_embedding"], dtype=dtype)
            else:
                with torch.no_grad():
                    latents = vae.encode(pixels.to(dtype)).latent_dist.sample(gen) * vae.config.scaling_factor
                    text = text_encoder(ids_, return_dict=False)[0]
            noise = torch.randn(latents.shape, device=device, generator=gen)
            t = torch.randint(0, 1000, (b,), device=device, generator=gen)
            noisy = sched.add_noise(latents.float(), noise, t)
            if optimised and args.channels_last:
                noisy = noisy.contiguous(memory_format=torch.channels_last)
            pred = model(noisy, t, text, cond)
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    if world > 1:
        dist.barrier()
    elapsed = time.perf_counter() - t0
    result = {
        "kind": kind,
        "style": style,
        "gpus": world,
        "images_per_s": round(world * b * args.steps / elapsed, 3),  # all ranks together
        "step_ms": round(1000 * elapsed / args.steps, 2),
        "trainable_params": sum(p.numel() for p in trained),
        "final_loss": float(loss),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del unet, controlnet, vae, text_encoder, optimizer, model, cn_run, unet_run
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, 64 px, CPU-sized: checks the script runs")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the optimised step (default: on for CUDA)")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--device", default=None)
    ap.add_argument("--cache-stage", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure the caching stage (VAE on image + mirror, text encoder)")
    ap.add_argument("--cache-batch-size", type=int, default=None, help="images per cache batch (default: --batch-size)")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun --nproc-per-node N bench/bench_training.py ...: data-parallel
        # throughput of the same steps, one process per GPU
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    if args.smoke:
        args.batch_size, args.resolution, args.steps, args.warmup = 2, 64, 2, 1
        if device.type == "cpu":
            args.precision = "fp32"
    if args.compile is None:
        args.compile = device.type == "cuda" and not args.smoke
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args.cache_batch_size = args.cache_batch_size or args.batch_size
    comps = tiny_components() if args.smoke else sd15_components()
    # The trainer computes the empty prompt's embedding once, at start.
    from training.cache import empty_prompt_embedding

    comps["empty_embedding"] = empty_prompt_embedding(bench_base(comps), torch.device("cpu"), torch.float32)

    results = []
    for k in args.kinds:
        for s in STYLES:
            results.append(run_config(k, s, comps, args, device, dtype))
            if _rank0():
                print(json.dumps(results[-1]), flush=True)  # partial results survive a time limit
    cache_stage = None
    if args.cache_stage:
        cache_stage = run_cache_stage(comps, args, device, dtype)
        if _rank0():
            print(json.dumps(cache_stage), flush=True)
    by = {(r["kind"], r["style"]): r for r in results}
    speedups = {}
    for k in args.kinds:
        base, ours = by[(k, "diffusers")], by[(k, "optimised")]
        speedups[k] = {
            "images_per_s_ratio": round(ours["images_per_s"] / base["images_per_s"], 3),
            **({"memory_ratio": round(ours["peak_memory_gib"] / base["peak_memory_gib"], 3)} if "peak_memory_gib" in ours else {}),
        }
    summary = {
        "benchmark": "training_throughput",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
        "torch": torch.__version__,
        "model": "tiny random (smoke)" if args.smoke else "SD1.5 architecture, random weights",
        "batch_size": args.batch_size,
        "resolution": args.resolution,
        "precision": args.precision,
        "compile": args.compile,
        "channels_last": args.channels_last,
        "gpus": dist.get_world_size() if dist.is_initialized() else 1,
        "steps": args.steps,
        "results": results,
        "cache_stage": cache_stage,
        "speedup_optimised_vs_diffusers": speedups,
        "target": "locked: images_per_s_ratio >= 2 with memory_ratio <= 1",
    }
    if _rank0():
        print(json.dumps(summary, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


if __name__ == "__main__":
    main()
