"""Device and precision choices shared by the neural annotators.

Imported only from ``setup()`` methods, so torch loads when a neural
annotator is first used, not when the registry is listed.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    """``None`` -> ``cuda`` when a GPU is present, else ``cpu``.

    An explicit ``cuda[:N]`` without a GPU is an error rather than a silent
    fall-back, so a misconfigured GPU job fails loudly instead of crawling.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but no CUDA GPU is available")
    return dev


def resolve_precision(precision: str | None, device: torch.device) -> torch.dtype:
    """``None`` -> bf16 on a GPU, fp32 on the CPU."""
    if precision is None or precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise ValueError(
            f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}"
        ) from None


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast context for reduced precision; a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def prepare_model(
    net: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    channels_last: Sequence[torch.nn.Module] = (),
) -> torch.nn.Module:
    """Move ``net`` to ``device`` in evaluation mode with its weights in ``dtype``.

    Reduced precision casts the weights themselves (not autocast over fp32
    weights): every kernel then reads half the bytes and no cast kernels run
    between layers, which matters most for the launch-bound token-by-token
    decoding of captioners. The normalisation kernels (LayerNorm, GroupNorm,
    BatchNorm) accumulate in fp32 internally whatever their input type.
    ``channels_last`` lists sub-modules whose 4-D weights are stored NHWC,
    the layout the tensor-core convolution kernels work in natively.
    """
    net = net.to(device=device, dtype=dtype).eval()
    for module in channels_last:
        module.to(memory_format=torch.channels_last)
    return net


def keep_fp32(module: torch.nn.Module) -> torch.nn.Module:
    """Run ``module`` in fp32 inside a reduced-precision model.

    Its weights become fp32 and its input is cast up on the way in, so its
    output is fp32 too (used for the last layer of a depth head, whose values
    would otherwise be rounded to bf16's 8 significant bits: visible banding
    after per-image normalisation, and useless 16-bit maps).
    """
    module.float()
    module.register_forward_pre_hook(_inputs_to_fp32)
    return module


def _inputs_to_fp32(module: torch.nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
