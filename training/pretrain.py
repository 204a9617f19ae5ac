"""Pre-training a small base model on a new image domain.

A randomly initialised SD-shaped model draws noise: its VAE does not
reconstruct images and its UNet has learnt nothing. To start a control
experiment as the ControlNet paper does - from a model that draws the domain
but does not follow a spatial condition - the base is trained in two stages
on the task's images:

1. :func:`train_autoencoder`: the VAE as an autoencoder (L1 + MSE
   reconstruction, a small KL term; AdamW with warm-up and cosine decay),
   then its ``scaling_factor`` set so that latents have unit variance, as
   Stable Diffusion's was chosen;
2. text-to-image training of the UNet with the ordinary trainer
   (``controlset train --method unet``), VAE and text encoder frozen.

:func:`assemble_base` writes a diffusers folder with replaced components, to
be used as ``--base``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def assemble_base(base_dir: str, out_dir: str, *, vae_dir: str | None = None, unet_dir: str | None = None) -> str:
    """Copy the diffusers SD folder ``base_dir`` to ``out_dir`` with ``vae/``
    and/or ``unet/`` replaced by the given folders."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base_dir, tmp)
    for name, src in (("vae", vae_dir), ("unet", unet_dir)):
        if src:
            shutil.rmtree(os.path.join(tmp, name))
            shutil.copytree(src, os.path.join(tmp, name))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def train_autoencoder(
    base_dir: str,
    shards: list[str],
    out_dir: str,
    *,
    condition: str = "canny",
    resolution: int = 64,
    steps: int = 1000,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
    num_workers: int = 2,
    mixed_precision: str = "auto",
    scale_batches: int = 8,
) -> dict:
    """Train the VAE of ``base_dir`` on the images of ``shards`` and save it
    as ``out_dir/vae`` with the fitted ``scaling_factor``. Returns a summary
    (final reconstruction loss, scaling factor, seconds); per-step losses go
    to ``out_dir/metrics.jsonl``.

    ``condition`` names a member the samples have (the data stream reads it;
    the autoencoder ignores it)."""
    from diffusers import AutoencoderKL

    from training.data import SampleSpec, ShardStream, expand_shards, make_loader
    from training.train import resolve_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_precision(mixed_precision, device)
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(base_dir, subfolder="vae", local_files_only=True).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0, fused=device.type == "cuda")
    spec = SampleSpec((condition,), resolution, random_flip=True, center_crop=False, proportion_empty_prompts=0.0)
    stream = ShardStream(expand_shards(shards), spec, batch_size, seed=seed, num_workers=num_workers,
                         shuffle_buffer=max(64, 4 * batch_size))
    batches = iter(make_loader(stream))
    gen = torch.Generator(device=device).manual_seed(seed)
    os.makedirs(out_dir, exist_ok=True)
    metrics = open(os.path.join(out_dir, "metrics.jsonl"), "w")
    start = time.perf_counter()
    rec = float("nan")
    for step in range(1, steps + 1):
        # Short warm-up, then cosine decay: stable at a high learning rate.
        warm = max(1, steps // 20)
        factor = step / warm if step <= warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
        for g in opt.param_groups:
            g["lr"] = learning_rate * max(factor, 0.02)
        x = next(batches)["pixel_values"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            post = vae.encode(x).latent_dist
            z = post.sample(gen)
            y = vae.decode(z).sample
        y = y.float()
        rec_loss = F.l1_loss(y, x) + F.mse_loss(y, x)
        kl = post.kl().mean() / (z.shape[1] * z.shape[2] * z.shape[3])
        loss = rec_loss + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        rec = rec_loss.item()
        if step % 10 == 0 or step == steps:
            metrics.write(json.dumps({"step": step, "reconstruction": rec, "kl": kl.item()}) + "\n")
    metrics.close()

    # SD chose its scaling factor so that scaled latents have unit variance.
    vae.eval()
    samples = []
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for _ in range(scale_batches):
            x = next(batches)["pixel_values"].to(device)
            samples.append(vae.encode(x).latent_dist.sample(gen).float().flatten())
    std = float(torch.cat(samples).std())
    scaling = 1.0 / max(std, 1e-6)
    vae.register_to_config(scaling_factor=scaling)
    vae.to("cpu").save_pretrained(os.path.join(out_dir, "vae"), safe_serialization=True)
    summary = {"steps": steps, "reconstruction": rec, "scaling_factor": scaling, "seconds": time.perf_counter() - start}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log.info("autoencoder: %s", summary)
    return summary
