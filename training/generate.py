"""``controlset generate``: images from a trained ControlNet and a base model."""

from __future__ import annotations

import logging
import os

from schemas.errors import UsageError

log = logging.getLogger(__name__)


def load_condition(paths: list[str], size: tuple[int, int] | None = None):
    """Condition image(s) -> float tensor 1 x 3K x H x W in [0, 1] (each as RGB,
    stacked in the order given, as in training)."""
    import numpy as np
    import torch
    from PIL import Image

    arrays = []
    for p in paths:
        try:
            im = Image.open(p).convert("RGB")
        except OSError as exc:
            raise UsageError(f"cannot read condition image {p}: {exc}") from exc
        if size is not None and im.size != size:
            im = im.resize(size, Image.NEAREST)
        size = im.size
        arrays.append(np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0)
    return torch.from_numpy(np.concatenate(arrays, 0))[None]


def generate(
    controlnet: str,
    base: str,
    conditions: list[str],
    prompt: str,
    output: str,
    *,
    negative_prompt: str | None = None,
    num_images: int = 1,
    steps: int = 30,
    guidance_scale: float = 7.5,
    conditioning_scale: float = 1.0,
    seed: int = 0,
    unet: str | None = None,
    device: str | None = None,
    precision: str | None = None,
    base_config: str | None = None,
) -> list[str]:
    """Generate ``num_images`` images and save them as ``output`` (PNG; numbered
    when several). ``unet`` replaces the base UNet (a run with an unlocked
    decoder exports one beside the ControlNet)."""
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UNet2DConditionModel, UniPCMultistepScheduler

    from training.models import load_base

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device} requested but no CUDA GPU is available")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        precision or ("fp16" if dev.type == "cuda" else "fp32")
    )
    if dtype is None:
        raise UsageError(f"--precision must be fp32, bf16 or fp16, got {precision!r}")
    try:
        cn = ControlNetModel.from_pretrained(controlnet, local_files_only=True)
    except (OSError, EnvironmentError) as exc:
        raise UsageError(f"--controlnet {controlnet}: not a diffusers ControlNet folder ({exc})") from exc
    b = load_base(base, base_config)
    if unet:
        b.unet = UNet2DConditionModel.from_pretrained(unet, local_files_only=True)
    pipe = StableDiffusionControlNetPipeline(
        vae=b.vae, text_encoder=b.text_encoder, tokenizer=b.tokenizer, unet=b.unet, controlnet=cn,
        scheduler=UniPCMultistepScheduler.from_config(b.noise_scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(dev, dtype)
    cond = load_condition(conditions)
    if cond.shape[1] != cn.config.conditioning_channels:
        raise UsageError(
            f"the ControlNet takes {cn.config.conditioning_channels} condition channels; "
            f"{len(conditions)} condition image(s) give {cond.shape[1]}"
        )
    h, w = cond.shape[-2:]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    images = pipe(
        prompt, image=cond.to(dev, dtype), negative_prompt=negative_prompt, num_images_per_prompt=num_images,
        num_inference_steps=steps, guidance_scale=guidance_scale, controlnet_conditioning_scale=conditioning_scale,
        generator=gen, height=h - h % 8, width=w - w % 8,
    ).images
    root, ext = os.path.splitext(output)
    ext = ext or ".png"
    paths = [output if num_images == 1 else f"{root}-{i}{ext}" for i in range(num_images)]
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    for im, p in zip(images, paths):
        im.save(p)
    return paths
