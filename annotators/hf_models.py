"""Transformers models for the neural annotators: loading by Hub repo id or
local folder, and pre-processing of whole batches on the device.

Loading
    A model is named by a Hub repo id (``Intel/dpt-hybrid-midas``), a short
    alias the annotator knows (``dpt-hybrid``) or a local model folder (what
    ``save_pretrained`` writes). Repo ids are read from the standard Hugging
    Face cache first, without touching the network; only when they are not
    cached, and ``HF_HUB_OFFLINE`` is not set, is the Hub asked. Anything that
    cannot be found raises :class:`annotators.MissingWeightsError` naming the
    repo id or folder, the cache searched and how to get the weights.

Pre-processing
    :class:`BatchPreprocessor` reads a model's image-processor settings
    (resize rule, resampling filter, rescale factor, mean and std) and applies
    them to a uint8 batch already on the device, with the same torchvision
    calls transformers' own image processors use, so that the model sees the
    same pixels as with ``processor(images)`` but the work runs once per batch
    on the GPU instead of image by image on the CPU.

Everything heavy (torch, torchvision, transformers) is imported inside
functions so that ``import annotators`` stays light.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from annotators.base import MissingWeightsError

log = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}


# --------------------------------------------------------------------- where


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set."""
    return any(
        os.environ.get(var, "").strip().lower() in _TRUE
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_cache_dir() -> str:
    """The Hugging Face hub cache in effect now.

    Read from the environment at call time (``HF_HUB_CACHE``, else
    ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``) rather than from
    ``huggingface_hub.constants``, which freezes it at import.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "huggingface", "hub")


def resolve_model_name(model: str, aliases: Mapping[str, str]) -> str:
    """A short alias -> its repo id; anything else is returned unchanged."""
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model must be a Hub repo id, an alias or a folder, got {model!r}")
    return aliases.get(model, model)


def is_local_reference(model: str) -> bool:
    """True if ``model`` names a local folder rather than a Hub repo id.

    An existing directory always wins; a path that is absolute, starts with
    ``.`` or ``~``, or has more than one ``/`` cannot be a repo id, so it is
    a (missing) folder.
    """
    if os.path.isdir(os.path.expanduser(model)):
        return True
    return (
        os.path.isabs(model)
        or model.startswith((".", "~"))
        or model.count("/") > 1
        or os.sep != "/" and os.sep in model
    )


def load_pretrained(
    loader: Callable[..., Any] | Any,
    model: str,
    *,
    what: str,
    **kwargs: Any,
) -> Any:
    """``loader.from_pretrained(model, **kwargs)`` with the project's rules.

    ``loader`` is a transformers class (``AutoModelForDepthEstimation``,
    ``AutoImageProcessor``, ...) or a callable with the same signature.
    ``what`` names the thing in errors (e.g. ``"depth model"``).

    Local folders load with ``local_files_only=True``. Repo ids try the cache
    first (no network); then, unless offline, the Hub; a network failure
    there ends in the same clear :class:`MissingWeightsError`.
    """
    from_pretrained = getattr(loader, "from_pretrained", loader)
    if is_local_reference(model):
        folder = os.path.abspath(os.path.expanduser(model))
        if not os.path.isdir(folder):
            raise MissingWeightsError(
                f"{what}: local model folder {folder} does not exist. Pass an existing folder "
                f"written by save_pretrained, or a Hub repo id such as the default."
            )
        try:
            return from_pretrained(folder, local_files_only=True, **kwargs)
        except (OSError, ValueError) as exc:
            listing = ", ".join(sorted(os.listdir(folder))[:12]) or "(empty)"
            raise MissingWeightsError(
                f"{what}: local model folder {folder} is not a complete transformers model "
                f"folder ({_first_line(exc)}); it holds: {listing}. Write it with "
                f"save_pretrained, or fetch a full copy with "
                f"`huggingface-cli download <repo> --local-dir {folder}`."
            ) from exc

    cache_dir = hub_cache_dir()
    try:
        return from_pretrained(model, cache_dir=cache_dir, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        cached_error = exc
    offline = hub_offline()
    if not offline:
        try:
            return from_pretrained(model, cache_dir=cache_dir, **kwargs)
        except Exception as exc:  # network errors come in many types
            log.debug("download of %s failed", model, exc_info=True)
            cached_error = exc
    reason = (
        "HF_HUB_OFFLINE=1, so the Hub was not asked"
        if offline
        else f"the Hub could not provide it either ({_first_line(cached_error)})"
    )
    raise MissingWeightsError(
        f"{what}: Hub repo {model!r} is not in the Hugging Face cache {cache_dir} and {reason}. "
        f"Get it with `huggingface-cli download {model}` (on a machine with access, then copy "
        f"the cache or set HF_HUB_CACHE), or pass a local model folder as the model option."
    ) from cached_error


def preflight_pretrained(model: str, *, what: str) -> None:
    """Fail early, without loading anything, when ``model`` cannot be found:
    a local folder without ``config.json``, or (offline) a repo id that is not
    in the cache. Online, a repo id not cached is left to ``load_pretrained``,
    which may download it."""
    if is_local_reference(model):
        folder = os.path.abspath(os.path.expanduser(model))
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise MissingWeightsError(
                f"{what}: local model folder {folder} has no config.json (missing or incomplete). "
                f"Pass a folder written by save_pretrained, or a Hub repo id such as the default."
            )
        return
    if not hub_offline():
        return
    from huggingface_hub import try_to_load_from_cache

    cache_dir = hub_cache_dir()
    if not isinstance(try_to_load_from_cache(model, "config.json", cache_dir=cache_dir), str):
        raise MissingWeightsError(
            f"{what}: Hub repo {model!r} is not in the Hugging Face cache {cache_dir} and "
            f"HF_HUB_OFFLINE=1, so the Hub will not be asked. Get it with `huggingface-cli download "
            f"{model}` (on a machine with access, then copy the cache or set HF_HUB_CACHE), or pass "
            f"a local model folder as the model option."
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


# -------------------------------------------------------------- sharing


_SHARED: dict[tuple, Any] = {}
_SHARED_LOCK = threading.Lock()


def shared(key: tuple, factory: Callable[[], Any]) -> Any:
    """One object per ``key`` in this process, built by ``factory`` once.

    Lets annotators that use the same weights on the same device (``depth``
    and ``normal``) hold one copy of the model and share its results.
    """
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = factory()
        return _SHARED[key]


def clear_shared() -> None:
    """Forget every shared model (frees their memory once unreferenced)."""
    with _SHARED_LOCK:
        _SHARED.clear()


# -------------------------------------------------------- pre-processing


@dataclass(frozen=True)
class ResizePlan:
    """Where an input of a given size goes: resized to ``size`` (h, w), then
    optionally cropped to ``crop`` = (top, left, height, width)."""

    size: tuple[int, int]
    crop: tuple[int, int, int, int] | None = None

    @property
    def output_size(self) -> tuple[int, int]:
        return (self.crop[2], self.crop[3]) if self.crop else self.size


def _get(obj: Any, key: str) -> Any:
    """A field of a size dict (transformers 4) or SizeDict (transformers 5)."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def _multiple(val: float, multiple: int) -> int:
    # DPT's constrain_to_multiple_of without bounds: nearest multiple, never 0.
    x = round(val / multiple) * multiple
    if x < multiple:
        x = math.ceil(val / multiple) * multiple
    return int(x)


class BatchPreprocessor:
    """Batched resize + rescale + normalise following an image processor.

    Supported resize rules (what the depth, segmentation and caption models
    in use need): fixed ``{height, width}`` (BLIP, Segformer, DPT) with DPT's
    ``keep_aspect_ratio`` / ``ensure_multiple_of``; ``{shortest_edge}`` with
    ConvNeXt's ``crop_pct`` rule (warp to a square at >= 384, else resize and
    centre-crop) or a plain aspect-keeping resize; and an optional
    ``do_center_crop``. Anything else raises ``ValueError`` at construction,
    so a model whose processor is not followed exactly is never used silently.
    """

    def __init__(self, image_processor: Any) -> None:
        p = image_processor
        self.kind = type(p).__name__
        self.do_resize = bool(getattr(p, "do_resize", True))
        self.size = getattr(p, "size", None)
        self.resample = getattr(p, "resample", 3)
        self.keep_aspect_ratio = bool(getattr(p, "keep_aspect_ratio", False) or False)
        self.ensure_multiple_of = int(getattr(p, "ensure_multiple_of", 1) or 1)
        self.crop_pct = getattr(p, "crop_pct", None)
        self.do_center_crop = bool(getattr(p, "do_center_crop", False) or False)
        self.crop_size = getattr(p, "crop_size", None)
        self.do_rescale = bool(getattr(p, "do_rescale", True))
        self.rescale_factor = float(getattr(p, "rescale_factor", 1 / 255) or 1 / 255)
        self.do_normalize = bool(getattr(p, "do_normalize", True))
        self.image_mean = [float(v) for v in np.broadcast_to(getattr(p, "image_mean", 0.0), 3)]
        self.image_std = [float(v) for v in np.broadcast_to(getattr(p, "image_std", 1.0), 3)]
        if getattr(p, "do_pad", False):
            raise ValueError(f"{self.kind} pads its inputs (do_pad); padded models are not supported")
        if self.do_resize and not (
            (_get(self.size, "height") and _get(self.size, "width")) or _get(self.size, "shortest_edge")
        ):
            raise ValueError(f"{self.kind}: unsupported resize rule size={self.size!r}")
        if self.do_center_crop and not (_get(self.crop_size, "height") and _get(self.crop_size, "width")):
            raise ValueError(f"{self.kind}: unsupported crop_size={self.crop_size!r}")

    # -- geometry (pure; mirrors the processors' size rules)

    def plan(self, height: int, width: int) -> ResizePlan:
        """The resize (and crop) an input of ``height`` x ``width`` gets."""
        size: tuple[int, int] = (height, width)
        crop = None
        if self.do_resize:
            h_t, w_t = _get(self.size, "height"), _get(self.size, "width")
            short = _get(self.size, "shortest_edge")
            if h_t and w_t:
                sh, sw = h_t / height, w_t / width
                if self.keep_aspect_ratio:
                    # scale as little as possible, as DPT does
                    if abs(1 - sw) < abs(1 - sh):
                        sh = sw
                    else:
                        sw = sh
                m = self.ensure_multiple_of
                size = (_multiple(sh * height, m), _multiple(sw * width, m)) if (
                    self.keep_aspect_ratio or m != 1
                ) else (int(h_t), int(w_t))
            elif self.crop_pct is not None and "ConvNext" in self.kind:
                if short >= 384:
                    size = (int(short), int(short))  # warp, no crop
                else:
                    size = _shortest_edge(height, width, int(short / self.crop_pct))
                    crop = _centre(size, (int(short), int(short)))
            else:
                size = _shortest_edge(height, width, int(short))
        if self.do_center_crop:
            ch, cw = int(_get(self.crop_size, "height")), int(_get(self.crop_size, "width"))
            base = crop[2:] if crop else size
            crop = _centre(base, (ch, cw))
        return ResizePlan(size=size, crop=crop)

    # -- pixels

    def __call__(self, images: "torch.Tensor", dtype: "torch.dtype | None" = None) -> "torch.Tensor":
        """uint8 NCHW batch of one input size (on any device) -> model input.

        Same calls as transformers' torchvision backend: ``tvF.resize`` on the
        uint8 batch with antialiasing, then a fused rescale + normalise in
        float32 (cast to ``dtype`` at the end when given).
        """
        import torch
        from torchvision.transforms.v2 import functional as tvF

        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a uint8 Nx3xHxW batch, got {images.dtype} {tuple(images.shape)}")
        plan = self.plan(int(images.shape[2]), int(images.shape[3]))
        x = images
        if self.do_resize and tuple(x.shape[2:]) != plan.size:
            x = tvF.resize(x, list(plan.size), interpolation=_interpolation(self.resample), antialias=True)
        if plan.crop is not None:
            top, left, h, w = plan.crop
            x = x[:, :, top : top + h, left : left + w]
        x = x.to(torch.float32)
        if self.do_normalize:
            mean, std = self._mean_std(x.device)
            x = (x - mean) / std
        elif self.do_rescale:
            x = x * self.rescale_factor
        return x if dtype is None else x.to(dtype)


    def _mean_std(self, device: "torch.device") -> tuple["torch.Tensor", "torch.Tensor"]:
        """Mean and std (scaled to 0..255 input) as 1x3x1x1 tensors on ``device``,
        made once per device: building them from Python lists on every call
        is a blocking host-to-device copy, which would stop the host from
        queueing work while the device is busy."""
        import torch

        cache = self.__dict__.setdefault("_norm_cache", {})
        key = str(device)
        if key not in cache:
            scale = 1.0 / self.rescale_factor if self.do_rescale else 1.0
            mean = torch.tensor(self.image_mean, dtype=torch.float32).view(1, 3, 1, 1) * scale
            std = torch.tensor(self.image_std, dtype=torch.float32).view(1, 3, 1, 1) * scale
            cache[key] = (mean.to(device), std.to(device))
        return cache[key]


def _shortest_edge(height: int, width: int, short: int) -> tuple[int, int]:
    # transformers' get_resize_output_image_size(default_to_square=False)
    if height <= width:
        return short, int(short * width / height)
    return int(short * height / width), short


def _centre(size: tuple[int, int], crop: tuple[int, int]) -> tuple[int, int, int, int]:
    h, w = size
    ch, cw = crop
    if ch > h or cw > w:
        raise ValueError(f"crop {crop} larger than the resized image {size}")
    return int((h - ch) / 2.0), int((w - cw) / 2.0), ch, cw


def _interpolation(resample: Any) -> Any:
    from torchvision.transforms.v2 import InterpolationMode

    if isinstance(resample, InterpolationMode):
        return resample
    # PIL codes: 0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming.
    # Lanczos has no GPU kernel; transformers falls back to bicubic there too.
    table = {
        0: InterpolationMode.NEAREST,
        1: InterpolationMode.BICUBIC,
        2: InterpolationMode.BILINEAR,
        3: InterpolationMode.BICUBIC,
        4: InterpolationMode.BOX,
        5: InterpolationMode.HAMMING,
    }
    try:
        return table[int(resample)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"unsupported resample filter {resample!r}") from None


# ------------------------------------------------------------ batching


def group_by_size(images: Sequence[np.ndarray]) -> dict[tuple[int, int], list[int]]:
    """Indices of the images of each (height, width), in first-seen order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault((int(image.shape[0]), int(image.shape[1])), []).append(i)
    return groups


def to_device(images: Sequence[np.ndarray], device: "torch.device") -> "torch.Tensor":
    """Stack same-sized RGB uint8 HxWx3 arrays into a uint8 NCHW device tensor.

    The copy moves uint8 pixels (a quarter of the float bytes); the layout
    change happens on the device, where it is nearly free. For a GPU the
    arrays are stacked straight into page-locked memory (torch's caching
    host allocator, so the pages are locked once and then reused) and
    uploaded asynchronously: one host copy instead of a stack plus the
    driver's staging copy, and no wait for the upload. Freeing the staging
    tensor right away is safe: the allocator does not hand its block out
    again before the upload recorded on it has finished.
    """
    import torch

    shape = (len(images), *np.shape(images[0]))
    if device.type == "cuda":
        host = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        np.stack([np.asarray(im, dtype=np.uint8) for im in images], out=host.numpy())
        batch = host.to(device, non_blocking=True)
    else:
        batch = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images])).to(device)
    return batch.permute(0, 3, 1, 2).contiguous()


def fetch(*tensors: "torch.Tensor") -> list[np.ndarray]:
    """Device tensors -> numpy arrays with one device-to-host copy.

    The tensors (any dtypes and shapes) are packed as bytes into one buffer
    on the device, copied once (one transfer, one synchronisation instead of
    one per tensor) and unpacked as views of that host buffer.
    """
    if not tensors:
        return []
    packed, layout = _pack(tensors)
    return _unpack(packed.cpu().numpy(), layout)


def _pack(tensors: Sequence["torch.Tensor"]) -> tuple["torch.Tensor", list[tuple[int, int, Any, tuple[int, ...]]]]:
    """The tensors' bytes in one uint8 tensor on their device, each array
    aligned to 16 bytes, and the (offset, bytes, dtype, shape) of each."""
    import torch

    parts, layout, offset = [], [], 0
    for t in tensors:
        t = t.detach().contiguous()
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)
        pad = -offset % 16  # keep every array aligned for its dtype
        if pad:
            parts.append(raw.new_zeros(pad))
            offset += pad
        parts.append(raw)
        layout.append((offset, raw.numel(), t.dtype, tuple(t.shape)))
        offset += raw.numel()
    return (parts[0] if len(parts) == 1 else torch.cat(parts)), layout


def _unpack(host: np.ndarray, layout: list[tuple[int, int, Any, tuple[int, ...]]]) -> list[np.ndarray]:
    """Numpy views of a packed host buffer (see :func:`_pack`)."""
    import torch

    out = []
    for start, nbytes, dtype, shape in layout:
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        out.append(host[start : start + nbytes].view(np_dtype).reshape(shape))
    return out


def model_batches(
    images: Sequence[np.ndarray],
    preprocess: BatchPreprocessor,
    device: "torch.device",
    dtype: "torch.dtype | None" = None,
) -> list[tuple[list[int], "torch.Tensor"]]:
    """Pre-process a batch of images of any sizes on ``device``.

    Images of one input size are resized together; groups that land on the
    same model input size are concatenated into one forward batch. Returns
    ``(indices, pixel_values)`` pairs covering every image once.
    """
    import torch

    by_input: dict[tuple[int, int], list[tuple[list[int], torch.Tensor]]] = {}
    for (h, w), idx in group_by_size(images).items():
        pixels = preprocess(to_device([images[i] for i in idx], device), dtype)
        by_input.setdefault(tuple(pixels.shape[2:]), []).append((idx, pixels))
    out = []
    for parts in by_input.values():
        idx = [i for part_idx, _ in parts for i in part_idx]
        out.append((idx, parts[0][1] if len(parts) == 1 else torch.cat([p for _, p in parts])))
    return out


# ------------------------------------------------------------ overlapping


class PendingFetch:
    """Device tensors on their way to the host, started by :func:`fetch_async`.

    On a GPU the tensors are packed into one device buffer and copied
    asynchronously into page-locked memory, with an event recorded after
    the copy: the host can queue the next chunk's work before it waits.
    :meth:`arrays` waits for that event only (not for the whole device).
    The arrays it returns are views of that page-locked block (which they
    keep alive; it goes back to torch's caching host allocator, for reuse by
    later copies, when the last of them is gone): copying them out into
    ordinary memory would cost the host one more pass over every map, and
    the host is what limits these annotators (measured on an H200 at batch
    32: 3-8 % more images/s without the copy). Set :attr:`copy_out` to copy
    instead. On the CPU the tensors are read as they are.
    """

    #: Copy the bytes out of page-locked memory (True) or return views of it.
    copy_out = False

    def __init__(self, tensors: Sequence["torch.Tensor"]) -> None:
        import torch

        self._event = None
        self._layout: list[tuple[int, int, Any, tuple[int, ...]]] = []
        if not tensors:
            self._host = None
            return
        packed, self._layout = _pack(tensors)
        if packed.device.type == "cuda":
            host = torch.empty(packed.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(packed.device))
            self._host = host
        else:
            self._host = packed.cpu()

    def ready(self) -> bool:
        """True once the copy has finished (always on the CPU)."""
        return self._event is None or bool(self._event.query())

    def arrays(self) -> list[np.ndarray]:
        """The tensors as numpy arrays, in the order given (waits for the copy)."""
        if self._host is None:
            return []
        if self._event is not None:
            self._event.synchronize()
            host = self._host.numpy().copy() if self.copy_out else self._host.numpy()
        else:
            host = self._host.numpy()
        self._host = None
        return _unpack(host, self._layout)


def fetch_async(*tensors: "torch.Tensor") -> PendingFetch:
    """Start the device-to-host copy of ``tensors`` (see :class:`PendingFetch`);
    ``fetch_async(...).arrays()`` gives what :func:`fetch` gives."""
    return PendingFetch(tensors)


def split_chunks(idx: Sequence[int], chunk: int) -> list[list[int]]:
    """``idx`` in consecutive pieces of at most ``chunk``, balanced so that no
    piece is much smaller than the others (40 at 32 -> 20 + 20, not 32 + 8)."""
    idx = list(idx)
    if not idx:
        return []
    pieces = -(-len(idx) // max(1, chunk))
    base, extra = divmod(len(idx), pieces)
    out, start = [], 0
    for p in range(pieces):
        stop = start + base + (1 if p < extra else 0)
        out.append(idx[start:stop])
        start = stop
    return out
