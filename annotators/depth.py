"""MiDaS depth (``depth.png``) and normals derived from it (``normal.png``),
batched on the GPU through transformers' depth-estimation models.

Depth
    ``Intel/dpt-hybrid-midas`` (MiDaS v3 DPT-hybrid, the network behind
    ControlNet's depth annotator) by default; DPT-large and Depth Anything
    (v1/v2) are selectable by alias or repo id, all through
    ``AutoModelForDepthEstimation``. Inputs are pre-processed on the device as
    the model's image processor specifies; the prediction is upsampled to the
    image size as transformers' ``post_process_depth_estimation`` does
    (bicubic) and then normalised per image to 0-255 the way ControlNet does
    (``(d - min) / (max - min) * 255``, truncated), or to 0-65535 with
    ``bits=16``. The model predicts relative *inverse* depth, so near is
    bright, as ControlNet's depth model expects.

Normals
    ControlNet's normal annotator from the same MiDaS prediction, at the
    model's output resolution (ControlNet also computes them at the detection
    resolution): Sobel x/y gradients (3x3, reflected border) of the raw
    prediction, set to 0 where the normalised depth is below ``bg_th`` (0.4
    as ControlNet's normal model used), stacked with a constant ``a`` = 2*pi,
    normalised to unit length, mapped to ``n * 127.5 + 127.5`` and written
    with the channels reversed, exactly as ``controlnet_aux``'s
    ``MidasDetector`` returns them. The map is then resized bilinearly to the
    image size, as ControlNet resizes its detected map.

One forward pass for both
    ``depth`` and ``normal`` annotators with the same ``model``, ``device``
    and ``precision`` share one loaded model per process, and the model keeps
    the raw predictions of the last batch it saw: when the pipeline runs
    ``depth`` and then ``normal`` over the same batch (same keys, same image
    arrays), the second annotator reuses the first one's prediction instead
    of running the network again.

Speed
    A batch larger than ``chunk_size`` runs in pieces, each queued on the
    device (upload, forward, post-processing, asynchronous copy back) before
    the host waits for the previous one, so that host and device work
    overlap; nothing in that path waits for the device except the copy back
    of the piece being finished. ``compile=True`` runs the forward pass
    through ``torch.compile`` (about 1.5x the images/s of eager on an H200 at
    batch 32 in bf16, after some 30 s of compilation per batch size).
"""

from __future__ import annotations

import math
import threading
from typing import Any, Sequence

import numpy as np

from annotators.base import Annotation, Annotator, check_chunk_size, check_image
from annotators.registry import register_annotator

#: Short names accepted for ``model``, besides any repo id or local folder.
DEPTH_MODELS = {
    "dpt-hybrid": "Intel/dpt-hybrid-midas",
    "dpt-large": "Intel/dpt-large",
    "depth-anything-small": "LiheYoung/depth-anything-small-hf",
    "depth-anything-base": "LiheYoung/depth-anything-base-hf",
    "depth-anything-large": "LiheYoung/depth-anything-large-hf",
    "depth-anything-v2-small": "depth-anything/Depth-Anything-V2-Small-hf",
    "depth-anything-v2-base": "depth-anything/Depth-Anything-V2-Base-hf",
    "depth-anything-v2-large": "depth-anything/Depth-Anything-V2-Large-hf",
}
DEFAULT_DEPTH_MODEL = "Intel/dpt-hybrid-midas"


# --------------------------------------------------------------- pure steps


def upsample_depth(depth: "torch.Tensor", size: tuple[int, int]) -> "torch.Tensor":
    """Bx h x w raw predictions -> B x H x W, bicubic (align_corners=False),
    as transformers' ``post_process_depth_estimation`` resizes them."""
    import torch.nn.functional as F

    if tuple(depth.shape[-2:]) == tuple(size):
        return depth
    return F.interpolate(depth[:, None].float(), size=size, mode="bicubic", align_corners=False)[:, 0]


def normalize_depth(depth: "torch.Tensor", bits: int = 8) -> "torch.Tensor":
    """Per image ``(d - min) / (max - min)`` scaled to 0..2**bits-1 and
    truncated, as ControlNet's MiDaS annotator does (a flat map gives 0).

    Returns uint8 for 8 bits, int32 holding 0..65535 for 16 bits (torch has
    no general uint16 arithmetic; cast on the host).
    """
    return _normalize(depth, bits)[0]


def _normalize(depth: "torch.Tensor", bits: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """:func:`normalize_depth` and the B x 2 (min, max) range it used."""
    import torch

    d = depth.float()
    flat = d.flatten(1)
    lo, hi = flat.amin(1), flat.amax(1)
    span = (hi - lo).view(-1, 1, 1)
    unit = torch.where(span > 0, (d - lo.view(-1, 1, 1)) / torch.where(span > 0, span, 1.0), 0.0)
    top = float((1 << bits) - 1)
    scaled = (unit * top).clamp(0, top)
    maps = scaled.to(torch.uint8) if bits == 8 else scaled.to(torch.int32)
    return maps, torch.stack([lo, hi], 1)


_SOBEL: dict[str, "torch.Tensor"] = {}


def _sobel_kernels(device: "torch.device") -> "torch.Tensor":
    # made once per device: a tensor built from a Python list is a blocking
    # host-to-device copy, which would stall the queueing of later work
    import torch

    key = str(device)
    if key not in _SOBEL:
        kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        _SOBEL[key] = torch.stack([kx, kx.t()])[:, None].to(device)
    return _SOBEL[key]


def _sobel(depth: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    # cv2.Sobel(ksize=3) with its default BORDER_REFLECT_101 ("reflect" in torch).
    import torch.nn.functional as F

    k = _sobel_kernels(depth.device)
    padded = F.pad(depth[:, None].float(), (1, 1, 1, 1), mode="reflect")
    g = F.conv2d(padded, k)
    return g[:, 0], g[:, 1]


def normals_from_depth(
    depth: "torch.Tensor", a: float = 2.0 * math.pi, bg_th: float = 0.4
) -> "torch.Tensor":
    """ControlNet's normal map of raw MiDaS predictions, B x h x w -> uint8 B x h x w x 3.

    The background test uses the per-image min-max normalised depth; the
    channel order is reversed at the end as ControlNet's annotator does, so
    the map is what ControlNet's normal model was fed.
    """
    import torch

    d = depth.float()
    flat = d.flatten(1)
    lo = flat.amin(1).view(-1, 1, 1)
    span = flat.amax(1).view(-1, 1, 1) - lo
    rel = (d - lo) / span  # NaN for a flat map, like ControlNet: no pixel is background
    gx, gy = _sobel(d)
    background = rel < bg_th
    gx = torch.where(background, 0.0, gx)
    gy = torch.where(background, 0.0, gy)
    n = torch.stack([gx, gy, torch.full_like(gx, float(a))], dim=-1)
    n = n / n.pow(2).sum(-1, keepdim=True).sqrt()
    img = (n * 127.5 + 127.5).clamp(0, 255).to(torch.uint8)  # truncation, like astype
    return img.flip(-1)


def resize_map(maps: "torch.Tensor", size: tuple[int, int]) -> "torch.Tensor":
    """uint8 B x h x w x C -> B x H x W x C, bilinear and rounded (cv2 INTER_LINEAR)."""
    import torch
    import torch.nn.functional as F

    if tuple(maps.shape[1:3]) == tuple(size):
        return maps
    x = F.interpolate(maps.permute(0, 3, 1, 2).float(), size=size, mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# ----------------------------------------------------------- shared model


class DepthModel:
    """A loaded depth model on one device, with a memo of the last few batches.

    ``predict`` returns the raw predictions (float32, model resolution) of
    each image; when called again with the very same batch (same keys and
    the same array objects) it returns the memo instead of running again.

    Reduced precision (``dtype`` bf16/fp16) casts the weights, except the
    head's last (1-channel) convolution, which runs in fp32 so that the
    predicted depth keeps its fine steps. ``channels_last`` (default: on a
    GPU) stores the convolutional neck and head NHWC; the backbone keeps
    its layout (BiT's GroupNorm works on contiguous NCHW on the GPU, so
    NHWC there would add a transpose around every norm).
    ``fast_upsampling`` (default: on a GPU) computes the head's
    ``nn.Upsample`` by matrix products (``_torch.bilinear_resize``; the
    fusion layers' own ``F.interpolate`` calls stay as they are).
    :meth:`enable_compile` switches the forward pass to ``torch.compile``.
    """

    #: Batches whose predictions are memoised.
    MEMO_BATCHES = 4

    def __init__(self, model: str, device: Any, dtype: Any, channels_last: bool | None = None,
                 fast_upsampling: bool | None = None) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        from annotators._torch import keep_fp32, prepare_model, replace_bilinear_upsampling
        from annotators.hf_models import BatchPreprocessor, load_pretrained

        self.device, self.dtype = device, dtype
        self.processor = load_pretrained(AutoImageProcessor, model, what="depth image processor")
        self.preprocess = BatchPreprocessor(self.processor)
        net = load_pretrained(AutoModelForDepthEstimation, model, what="depth model")
        if channels_last is None:
            channels_last = device.type == "cuda"
        nhwc = [m for m in (getattr(net, "neck", None), getattr(net, "head", None)) if m is not None]
        self.net = prepare_model(net, device, dtype, channels_last=nhwc if channels_last else ())
        self.upsamplers = 0
        if (device.type == "cuda") if fast_upsampling is None else fast_upsampling:
            # the head's 2x bilinear upsampling (``nn.Upsample``) by matrix
            # products: torch's bilinear kernels were the largest single item
            # of DPT-hybrid's device time (H200, 64 images: 18.6 of 90 ms)
            self.upsamplers = replace_bilinear_upsampling(net)
        if dtype != torch.float32:
            convs = [m for m in getattr(net, "head", net).modules() if isinstance(m, torch.nn.Conv2d)]
            if convs and convs[-1].out_channels == 1:
                keep_fp32(convs[-1])
        self.compiled = None
        self._lock = threading.Lock()
        #: held by an annotator for a whole batch (see ``_MidasBase._annotate``)
        self.batch_lock = threading.Lock()
        self._memo: dict[tuple, tuple[list, list]] = {}

    def enable_compile(self, backend: Any = "inductor") -> None:
        """Run the forward pass through ``torch.compile`` from now on
        (idempotent; falls back to eager with a warning if compiling fails)."""
        from annotators._torch import enable_compile

        enable_compile(self, self._eager_forward, "depth model", backend)

    def _eager_forward(self, pixels: "torch.Tensor") -> "torch.Tensor":
        return self.net(pixel_values=pixels).predicted_depth

    #: Elements a tensor of the head may hold: CUDA's NHWC bilinear
    #: upsampling refuses outputs of INT_MAX elements or more (DPT at 384 px:
    #: more than 113 images in one pass).
    MAX_ELEMENTS = 2**31 - 1

    def max_pass(self, height: int, width: int) -> int:
        """Most images one forward pass can take at this input size: the head
        upsamples ``fusion_hidden_size / 2`` channels to the full input size.
        :meth:`forward` splits larger batches into passes of the largest
        power of two within it."""
        channels = max(1, int(getattr(self.net.config, "fusion_hidden_size", 256)) // 2)
        return max(1, self.MAX_ELEMENTS // (channels * height * width))

    def forward(self, pixels: "torch.Tensor", graphs: bool = False) -> "torch.Tensor":
        """B x 3 x h x w model input -> B x h' x w' raw predictions (float32);
        ``graphs``: replay CUDA graphs of the forward pass (on a GPU). A batch
        too large for one pass (``max_pass``) runs as several."""
        import torch

        from annotators._torch import forward_runner

        run = forward_runner(self, self._eager_forward, graphs, "depth model")
        # a power of two: compiled and graphed forwards pad a pass up to the
        # next power of two, which must stay within the limit too
        limit = 1 << (self.max_pass(*pixels.shape[-2:]).bit_length() - 1)
        if pixels.shape[0] <= limit:
            return run(pixels).float()
        return torch.cat([run(part).float() for part in pixels.split(limit)])

    @staticmethod
    def _ident(images: Sequence[np.ndarray], keys: Sequence[str]) -> tuple:
        return (tuple(keys), tuple(id(im) for im in images), tuple(im.shape for im in images))

    def recall(self, images: Sequence[np.ndarray], keys: Sequence[str]) -> list | None:
        """The predictions memoised for exactly this batch, or None."""
        ident = self._ident(images, keys)
        with self._lock:
            hit = self._memo.get(ident)
        return None if hit is None else hit[0]

    def remember(self, images: Sequence[np.ndarray], keys: Sequence[str], preds: list) -> None:
        """Memoise ``preds`` as the predictions of this batch (the last
        ``MEMO_BATCHES`` batches are kept: a pipeline batch may reach depth
        and normal as several annotator batches)."""
        with self._lock:
            # the memo holds the arrays themselves so their ids cannot be reused
            self._memo[self._ident(images, keys)] = (preds, list(images))
            while len(self._memo) > self.MEMO_BATCHES:
                self._memo.pop(next(iter(self._memo)))

    def predict_into(self, preds: list, images: Sequence[np.ndarray], ids: Sequence[int],
                     graphs: bool = False) -> None:
        """Queue the forward pass of ``images[i]`` for ``i`` in ``ids`` and
        store each prediction (a device tensor) in ``preds[i]``."""
        import torch

        from annotators.hf_models import model_batches

        with torch.inference_mode():
            for idx, pixels in model_batches([images[i] for i in ids], self.preprocess, self.device, self.dtype):
                pred = self.forward(pixels, graphs)
                for j, i in enumerate(idx):
                    preds[ids[i]] = pred[j]

    def predict(self, images: Sequence[np.ndarray], keys: Sequence[str], graphs: bool = False) -> list["torch.Tensor"]:
        """Raw predictions of a batch (the memo when it is the last batch)."""
        memo = self.recall(images, keys)
        if memo is not None:
            return memo
        out: list = [None] * len(images)
        self.predict_into(out, images, range(len(images)), graphs)
        self.remember(images, keys, out)
        return out


def _depth_model(model: str, device: str | None, precision: str | None, compile: bool = False) -> DepthModel:
    from annotators._torch import resolve_device, resolve_precision
    from annotators.hf_models import resolve_model_name, shared

    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    name = resolve_model_name(model, DEPTH_MODELS)
    m = shared(("depth", name, str(dev), str(dtype)), lambda: DepthModel(name, dev, dtype))
    if compile:
        # one model (and one forward per batch) for depth and normal: the
        # forward is compiled for both as soon as either asks for it
        m.enable_compile()
    return m


def _stack_predictions(preds: Sequence["torch.Tensor"], images: Sequence[np.ndarray]):
    """Group images whose prediction and image sizes match, for batched post-processing."""
    groups: dict[tuple, list[int]] = {}
    for i, (p, im) in enumerate(zip(preds, images)):
        groups.setdefault((tuple(p.shape), im.shape[:2]), []).append(i)
    return groups


#: Images per forward pass on a GPU: larger batches are split so that the
#: host work of one piece (upload, copy back, building the results) overlaps
#: the device work of the next. DPT-hybrid's forward runs 6 % slower at 16
#: than at 32 images a pass, more than the overlap wins back (H200, bf16,
#: eager: 645 images/s in pieces of 16 against 663 whole), so pieces are
#: 32 images and the default batch of 64 is two of them.
GPU_CHUNK = 32


class _MidasBase(Annotator):
    uses_gpu = True
    default_batch_size = 64

    def preflight(self) -> None:
        from annotators.hf_models import preflight_pretrained, resolve_model_name

        preflight_pretrained(resolve_model_name(self._options["model"], DEPTH_MODELS), what="depth model")

    def import_code(self) -> None:
        import torch  # noqa: F401
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation  # noqa: F401

    def setup(self) -> None:
        if getattr(self, "_model", None) is None:
            o = self._options
            self._model = _depth_model(o["model"], o["device"], o["precision"], o["compile"])

    def _annotate(self, images, keys, post, fill) -> list:
        """Predict (or recall) the batch in pieces and post-process each piece.

        ``post(raw, size)`` turns B x h x w raw predictions into device
        tensors for images of ``size``; ``fill(out, ids, arrays)`` builds the
        annotations from their host copies. Piece k+1 is queued on the device
        before the host waits for piece k, so uploads, copies back and the
        host's work hide behind the forward passes.
        """
        self.setup()
        images = [check_image(im) for im in images]
        keys = list(keys) if keys is not None else [""] * len(images)
        # depth and normal asking for the same batch from two threads: the
        # second waits for the first's predictions instead of repeating them
        with self._model.batch_lock:
            return self._annotate_locked(images, keys, post, fill)

    def _annotate_locked(self, images, keys, post, fill) -> list:
        import torch

        from annotators.hf_models import fetch_async, group_by_size, split_chunks
        from annotators.weights import chunk_size, run_pipelined

        m = self._model
        preds = m.recall(images, keys)
        computed = preds is None
        if computed:
            preds = [None] * len(images)
        out: list[Annotation | None] = [None] * len(images)
        order = [i for idx in group_by_size(images).values() for i in idx]
        chunk = chunk_size(self._options["chunk_size"], len(images), m.device, GPU_CHUNK)

        def launch(ids: list[int]) -> list:
            if computed:
                m.predict_into(preds, images, ids, self._options["cuda_graphs"])
            pending = []
            with torch.inference_mode():
                groups = _stack_predictions([preds[i] for i in ids], [images[i] for i in ids])
                for (_, size), grp in groups.items():
                    sel = [ids[g] for g in grp]
                    raw = torch.stack([preds[i] for i in sel])
                    pending.append((sel, fetch_async(*post(raw, size))))
            return pending

        def finish(pending: list) -> None:
            for sel, copy in pending:
                fill(out, sel, copy.arrays())

        run_pipelined(split_chunks(order, chunk), launch, finish)
        if computed:
            m.remember(images, keys, preds)
        return out


def _common_options(name: str, chunk_size: int | None, compile: bool, cuda_graphs: bool) -> dict[str, Any]:
    return {"chunk_size": check_chunk_size(name, chunk_size), "compile": bool(compile),
            "cuda_graphs": bool(cuda_graphs)}


@register_annotator
class Depth(_MidasBase):
    """``depth.png``: relative inverse depth, normalised per image (near = bright).

    Options:
        model: Hub repo id, alias (``dpt-hybrid``, ``dpt-large``,
            ``depth-anything-small`` ... see ``DEPTH_MODELS``) or local folder.
        device, precision: as for every neural annotator (None = auto).
        bits: 8 (uint8 PNG, as ControlNet) or 16 (uint16 PNG).
        chunk_size: images per forward pass (outputs do not depend on it);
            None = ``GPU_CHUNK`` on a GPU, the whole batch on the CPU.
        compile: run the forward pass through ``torch.compile`` (fixed
            shapes; the first batch of each size compiles, which takes a
            while). Shared with ``normal``: either one asking compiles both.
        cuda_graphs: on a GPU, replay the forward pass from CUDA graphs
            captured once per batch shape (a few seconds at the first batch;
            the pass is launch-bound otherwise). No effect on the CPU.

    Per-sample meta: ``depth_min`` / ``depth_max``, the raw prediction range
    the map was normalised from.
    """

    name = "depth"
    version = "1"
    members = ("depth.png",)

    def __init__(
        self,
        model: str = DEFAULT_DEPTH_MODEL,
        device: str | None = None,
        precision: str | None = None,
        bits: int = 8,
        chunk_size: int | None = None,
        compile: bool = False,
        cuda_graphs: bool = True,
    ) -> None:
        if bits not in (8, 16):
            raise ValueError(f"depth bits must be 8 or 16, got {bits!r}")
        super().__init__(
            model=str(model), device=device, precision=precision, bits=int(bits),
            **_common_options("depth", chunk_size, compile, cuda_graphs),
        )

    def annotate_batch(self, images, keys=None):
        return self._annotate(images, keys, self._post, self._fill)

    def _post(self, raw, size):
        import torch

        bits = self._options["bits"]
        maps, ranges = _normalize(upsample_depth(raw, size), bits)
        if bits == 16 and hasattr(torch, "uint16"):
            # 2 bytes a pixel over the bus, not 4 (torch >= 2.3 copies into uint16)
            maps = maps.to(torch.uint16)
        return maps, ranges

    @staticmethod
    def _fill(out, idx, arrays) -> None:
        maps, ranges = arrays
        if maps.dtype != np.uint16 and maps.dtype != np.uint8:
            maps = maps.astype(np.uint16)
        for j, i in enumerate(idx):
            out[i] = Annotation(
                members={"depth.png": np.ascontiguousarray(maps[j])},
                meta={"depth_min": float(ranges[j, 0]), "depth_max": float(ranges[j, 1])},
            )


@register_annotator
class Normal(_MidasBase):
    """``normal.png``: ControlNet's normal map from MiDaS depth (RGB).

    Options:
        model, device, precision: as for ``depth`` (same defaults; the two
            share one model and one forward pass).
        bg_th: pixels whose normalised depth is below this are flat
            background (ControlNet: 0.4).
        a: the constant z component before normalisation (ControlNet: 2*pi).
        chunk_size, compile, cuda_graphs: as for ``depth``.
    """

    name = "normal"
    version = "1"
    members = ("normal.png",)
    run_after = ("depth",)

    def __init__(
        self,
        model: str = DEFAULT_DEPTH_MODEL,
        device: str | None = None,
        precision: str | None = None,
        bg_th: float = 0.4,
        a: float = 2.0 * math.pi,
        chunk_size: int | None = None,
        compile: bool = False,
        cuda_graphs: bool = True,
    ) -> None:
        if not 0.0 <= float(bg_th) <= 1.0:
            raise ValueError(f"normal bg_th must be in [0, 1], got {bg_th!r}")
        if not float(a) > 0:
            raise ValueError(f"normal a must be > 0, got {a!r}")
        super().__init__(
            model=str(model), device=device, precision=precision, bg_th=float(bg_th), a=float(a),
            **_common_options("normal", chunk_size, compile, cuda_graphs),
        )

    def annotate_batch(self, images, keys=None):
        return self._annotate(images, keys, self._post, self._fill)

    def _post(self, raw, size):
        return (resize_map(normals_from_depth(raw, self._options["a"], self._options["bg_th"]), size),)

    @staticmethod
    def _fill(out, idx, arrays) -> None:
        (maps,) = arrays
        for j, i in enumerate(idx):
            out[i] = Annotation(members={"normal.png": np.ascontiguousarray(maps[j])})
