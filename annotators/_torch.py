"""Device and precision choices shared by the neural annotators.

Imported only from ``setup()`` methods, so torch loads when a neural
annotator is first used, not when the registry is listed.
"""

from __future__ import annotations

import contextlib

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
