"""ADE20K semantic segmentation (``seg.png`` + ``seg_ids.png``), batched on the
GPU through transformers' semantic-segmentation models.

``openmmlab/upernet-convnext-small`` (UperNet, 150 ADE20K classes) by default;
other ADE20K models (UperNet with ConvNeXt or Swin backbones, SegFormer) by
alias or repo id, all through ``AutoModelForSemanticSegmentation``.

Inputs are pre-processed on the device as the model's image processor
specifies; logits are resized bilinearly to the image size and arg-maxed, as
transformers' ``post_process_semantic_segmentation`` does. ``seg.png`` colours
each class with the ADE20K palette ControlNet's segmentation model was
trained on (mmsegmentation's, the one ControlNet's UniFormer annotator
draws with; two classes, 6 and 48, share a colour there); ``seg_ids.png``
keeps the exact class ids (0..149, single channel).
The classes present, with the fraction of pixels each covers, go into the
sample metadata.

A batch runs in pieces of ``chunk_size`` images, each queued on the device
(upload, forward, arg-max, colours, class counts, asynchronous copy back)
before the host waits for the previous one, so that host and device work
overlap. ``compile=True`` runs the forward pass through ``torch.compile``
(about 1.45x the images/s of eager on an H200 at batch 32 in bf16, after
some 25 s of compilation per piece size).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from annotators.base import Annotation, Annotator, check_chunk_size, check_image
from annotators.registry import register_annotator

#: Short names accepted for ``model``, besides any repo id or local folder.
SEG_MODELS = {
    **{f"upernet-convnext-{s}": f"openmmlab/upernet-convnext-{s}" for s in ("tiny", "small", "base", "large", "xlarge")},
    **{f"upernet-swin-{s}": f"openmmlab/upernet-swin-{s}" for s in ("tiny", "small", "base", "large")},
    **{f"segformer-b{i}": f"nvidia/segformer-b{i}-finetuned-ade-512-512" for i in range(5)},
    "segformer-b5": "nvidia/segformer-b5-finetuned-ade-640-640",
}
DEFAULT_SEG_MODEL = "openmmlab/upernet-convnext-small"
ADE20K_CLASSES = 150

#: Images per forward pass on a GPU: larger batches are split so that the
#: host work of one piece (upload, arg-max maps and colours back, building
#: the results) overlaps the device work of the next. UperNet-ConvNeXt-S
#: runs as fast at 16 images a pass as at 32, so a batch of 32 goes in two
#: overlapped halves (H200, bf16, eager: 385 images/s against 372 whole).
GPU_CHUNK = 16

# The ADE20K colour of class i is bytes [3i, 3i+3) of this hex string
# (mmsegmentation's ADE20KDataset palette, in class-id order).
_ADE20K_PALETTE_HEX = (
    "787878b4787806e6e650323204c8037878508c8c8ccc05ffe6e6e604fa07e005ffebff07"
    "96053d78784608ff33ff06528fff8cccff04ff3307cc46030066c83de6faff06330b66ff"
    "ff0747ff09e00907e6dcdcdcff095c7009ff08ffd607ffe0ffb8060aff47ff290a07ffff"
    "e0ff086608ffff3d06ffc207ff7a0800ff14ff0829ff05990633ffeb0cffa0961400a3ff"
    "8c8c8cfa0a0f14ff001fff00ff1f00ffe00099ff000000ffff470000ebff00adff1f00ff"
    "0bc8c8ff520000fff5003dff00ff7000ff85ff0000ffa300ff6600c2ff00008fff33ff00"
    "0052ff00ff2900ffad0a00ffadff0000ff99ff5c00ff00ffff00f5ff0066ffad00ff0014"
    "ffb8b8001fff00ff3d0047ffff00cc00ffc200ff52000aff0070ff3300ff00c2ff007aff"
    "00ffa3ff990000ff0aff70008fff005200ffa3ff00ffeb0008b8aa8500ff00ff5cb800ff"
    "ff001f00b8ff00d6ffff00705cff0000e0ff70e0ff46b8a0a300ff9900ff47ff00ff00a3"
    "ffcc00ff008f00ffeb85ff00ff00ebf500ffff007afff5000abed4d6ff0000ccff1400ff"
    "ffff000099ff0029ff00ffcc2900ff29ff00ad00ff00f5ff4700ff7a00ff00ffb8005cff"
    "b8ff000085ffffd60019c2c266ff005c00ff"
)


def ade20k_palette() -> np.ndarray:
    """The 150 x 3 uint8 ADE20K palette (row = class id)."""
    return np.frombuffer(bytes.fromhex(_ADE20K_PALETTE_HEX), dtype=np.uint8).reshape(-1, 3).copy()


def colorize(ids: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """Class-id map (HxW) -> RGB uint8 HxWx3 with the ADE20K palette."""
    pal = ade20k_palette() if palette is None else palette
    return pal[ids]


def logits_to_ids(logits: "torch.Tensor", size: tuple[int, int], chunk: int = 8) -> "torch.Tensor":
    """B x C x h x w logits -> B x H x W class ids (int64).

    Bilinear resize (align_corners=False) then arg-max, as transformers'
    ``post_process_semantic_segmentation`` does, in chunks so that a batch
    of 150-class maps at full size never sits in memory at once.
    """
    import torch
    import torch.nn.functional as F

    if tuple(logits.shape[-2:]) == tuple(size):
        return logits.argmax(1)
    parts = [
        F.interpolate(logits[s : s + chunk], size=size, mode="bilinear", align_corners=False).argmax(1)
        for s in range(0, logits.shape[0], chunk)
    ]
    return torch.cat(parts)


def class_counts(ids: "torch.Tensor", classes: int, sync_free: bool | None = None) -> "torch.Tensor":
    """B x H x W class ids (all < ``classes``) -> B x ``classes`` pixel counts (int32).

    One histogram for the whole batch (each image's ids offset into its own
    range of bins). On a GPU it is a scatter-add into a zeroed table rather
    than ``bincount``, which reads the largest id back to the host to size
    its output: that wait would stop the host from queueing the next
    forward pass while this one runs. ``sync_free`` picks the method
    (None: scatter-add off the CPU, ``bincount`` on it); both count exactly.
    """
    import torch

    b = ids.shape[0]
    offset = torch.arange(b, device=ids.device).view(-1, 1) * classes
    flat = (ids.reshape(b, -1) + offset).reshape(-1)
    if sync_free is None:
        sync_free = ids.device.type != "cpu"
    if not sync_free:
        return torch.bincount(flat, minlength=b * classes).view(b, classes).to(torch.int32)
    counts = torch.zeros(b * classes, dtype=torch.int32, device=ids.device)
    counts.index_add_(0, flat, torch.ones((), dtype=torch.int32, device=ids.device).expand(flat.shape))
    return counts.view(b, classes)


class SegModel:
    """A loaded segmentation model on one device (shared per process).

    Reduced precision (``dtype`` bf16/fp16) casts the weights;
    ``channels_last`` (default: on a GPU) stores the whole network NHWC,
    which suits both ConvNeXt (its blocks permute to NHWC for LayerNorm and
    the MLP, a free view instead of a copy when the input is NHWC) and the
    UperNet head's large 3x3 convolutions. The auxiliary (training-only)
    head is dropped: transformers runs it at inference and upsamples its
    150-class output to the full input size, only for it to be discarded.
    ``fast_upsampling`` (default: on a GPU, UperNet models only) upsamples
    the logits to the input size by matrix products (``_torch.bilinear_resize``).
    :meth:`enable_compile` switches the forward pass to ``torch.compile``.
    """

    def __init__(self, model: str, device: Any, dtype: Any, channels_last: bool | None = None,
                 fast_upsampling: bool | None = None) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

        from annotators._torch import prepare_model
        from annotators.hf_models import BatchPreprocessor, load_pretrained

        self.device, self.dtype = device, dtype
        self.processor = load_pretrained(AutoImageProcessor, model, what="segmentation image processor")
        self.preprocess = BatchPreprocessor(self.processor)
        if self.preprocess.plan(512, 768).crop is not None:
            # A crop would leave seg.png misaligned with the image it describes.
            raise ValueError(
                f"segmentation model {model!r}: its image processor crops the input, so the map "
                f"would not cover the whole image; use a model whose processor resizes only"
            )
        net = load_pretrained(AutoModelForSemanticSegmentation, model, what="segmentation model")
        n = int(net.config.num_labels)
        if n != ADE20K_CLASSES:
            raise ValueError(
                f"segmentation model {model!r} has {n} classes; seg needs an ADE20K model "
                f"({ADE20K_CLASSES} classes) so seg.png uses ControlNet's palette"
            )
        if getattr(net, "auxiliary_head", None) is not None:
            net.auxiliary_head = None
        if channels_last is None:
            channels_last = device.type == "cuda"
        self.net = prepare_model(net, device, dtype, channels_last=[net] if channels_last else ())
        id2label = getattr(net.config, "id2label", None) or {}
        self.labels = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(n)]
        self.palette = torch.from_numpy(ade20k_palette()).to(device)
        self.channels_last = bool(channels_last)
        # the logits' upsampling to the input size by matrix products (see
        # _eager_forward); default on a GPU
        self.fast_upsampling = (device.type == "cuda") if fast_upsampling is None else bool(fast_upsampling)
        if type(net).__name__ != "UperNetForSemanticSegmentation":
            # the fast path reproduces UperNet's forward only (SegFormer, for
            # one, has a decode head but no backbone and keeps 1/4-size logits)
            self.fast_upsampling = False
        self.compiled = None

    def enable_compile(self, backend: Any = "inductor") -> None:
        """Run the forward pass through ``torch.compile`` from now on
        (idempotent; falls back to eager with a warning if compiling fails)."""
        from annotators._torch import enable_compile

        enable_compile(self, self._eager_forward, "segmentation model", backend)

    def _eager_forward(self, pixels: "torch.Tensor") -> "torch.Tensor":
        if not self.fast_upsampling:
            return self.net(pixel_values=pixels).logits
        # The model's own forward at inference (UperNet: backbone, decode
        # head, bilinear upsampling of the logits to the input size) with
        # the upsampling done by matrix products: torch's NHWC bilinear
        # kernel took about a quarter of the device time of a batch (H200,
        # 32 images at 512 px: 22.5 of 87 ms), for 150 maps per image.
        from annotators._torch import bilinear_resize

        backbone = self.net.backbone
        run = getattr(backbone, "forward_with_filtered_kwargs", backbone)
        logits = self.net.decode_head(run(pixels).feature_maps)
        return bilinear_resize(logits, tuple(pixels.shape[2:]), align_corners=False)

    #: Most elements of one logits tensor: the model upsamples its logits to
    #: the input size, and torch's NHWC bilinear kernel refuses outputs of
    #: 2**31 elements or more (65 images at 512 px with 150 classes).
    max_logits = 2**31 - 1

    def max_batch(self, height: int, width: int) -> int:
        """Most images of a ``height`` x ``width`` model input per forward pass."""
        return max(1, self.max_logits // (len(self.labels) * height * width))

    def forward(self, pixels: "torch.Tensor", graphs: bool = False) -> "torch.Tensor":
        """B x 3 x h x w model input -> B x classes x h x w logits (larger
        batches than :meth:`max_batch` run in several passes); ``graphs``:
        replay CUDA graphs of the forward pass (on a GPU)."""
        import torch

        from annotators._torch import forward_runner

        if self.channels_last:
            # the layout of the weights: the stem then runs NHWC from the start
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        run = forward_runner(self, self._eager_forward, graphs, "segmentation model")
        step = self.max_batch(int(pixels.shape[2]), int(pixels.shape[3]))
        if self.compiled is not None or graphs:
            # compiled and graphed forwards pad to a power of two: stay within the limit
            step = 1 << (step.bit_length() - 1)
        if pixels.shape[0] <= step:
            return run(pixels)
        return torch.cat([run(pixels[s : s + step]) for s in range(0, pixels.shape[0], step)])


def _seg_model(model: str, device: str | None, precision: str | None, compile: bool = False) -> SegModel:
    from annotators._torch import resolve_device, resolve_precision
    from annotators.hf_models import resolve_model_name, shared

    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    name = resolve_model_name(model, SEG_MODELS)
    m = shared(("seg", name, str(dev), str(dtype)), lambda: SegModel(name, dev, dtype))
    if compile:
        m.enable_compile()
    return m


@register_annotator
class Seg(Annotator):
    """``seg.png`` (ADE20K palette, RGB) and ``seg_ids.png`` (class ids).

    Options:
        model: Hub repo id, alias (``upernet-convnext-small``,
            ``upernet-swin-base``, ``segformer-b5`` ... see ``SEG_MODELS``) or
            local folder of an ADE20K (150-class) model.
        device, precision: as for every neural annotator (None = auto).
        min_fraction: classes covering less than this fraction of the pixels
            are left out of the metadata's class list (not out of the maps).
        chunk_size: images per forward pass (outputs do not depend on it);
            None = ``GPU_CHUNK`` on a GPU, the whole batch on the CPU.
        compile: run the forward pass through ``torch.compile`` (fixed
            shapes; the first batch of each size compiles, which takes a while).
        cuda_graphs: on a GPU, replay the forward pass from CUDA graphs
            captured once per batch shape. No effect on the CPU.

    Per-sample meta: ``class_ids``, ``classes`` (labels) and
    ``class_fractions``, aligned, by decreasing area.
    """

    name = "seg"
    version = "1"
    members = ("seg.png", "seg_ids.png")
    uses_gpu = True
    default_batch_size = 32

    def __init__(
        self,
        model: str = DEFAULT_SEG_MODEL,
        device: str | None = None,
        precision: str | None = None,
        min_fraction: float = 0.0,
        chunk_size: int | None = None,
        compile: bool = False,
        cuda_graphs: bool = True,
    ) -> None:
        if not 0.0 <= float(min_fraction) < 1.0:
            raise ValueError(f"seg min_fraction must be in [0, 1), got {min_fraction!r}")
        super().__init__(
            model=str(model), device=device, precision=precision, min_fraction=float(min_fraction),
            chunk_size=check_chunk_size("seg", chunk_size), compile=bool(compile),
            cuda_graphs=bool(cuda_graphs),
        )

    def preflight(self) -> None:
        from annotators.hf_models import preflight_pretrained, resolve_model_name

        preflight_pretrained(resolve_model_name(self._options["model"], SEG_MODELS), what="segmentation model")

    def import_code(self) -> None:
        import torch  # noqa: F401
        from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation  # noqa: F401

    def setup(self) -> None:
        if getattr(self, "_model", None) is None:
            o = self._options
            self._model = _seg_model(o["model"], o["device"], o["precision"], o["compile"])

    def annotate_batch(self, images, keys=None):
        import torch

        from annotators.hf_models import fetch_async, group_by_size, model_batches, split_chunks
        from annotators.weights import chunk_size, run_pipelined

        self.setup()
        m = self._model
        images = [check_image(im) for im in images]
        out: list[Annotation | None] = [None] * len(images)
        order = [i for idx in group_by_size(images).values() for i in idx]
        chunk = chunk_size(self._options["chunk_size"], len(images), m.device, GPU_CHUNK)

        def launch(ids: list[int]) -> list:
            # queue upload, forward, post-processing and the copy back of one
            # piece; nothing here waits for the device
            pending = []
            with torch.inference_mode():
                for idx, pixels in model_batches([images[i] for i in ids], m.preprocess, m.device, m.dtype):
                    logits = m.forward(pixels, self._options["cuda_graphs"])
                    # images of one model batch may still differ in size
                    by_size: dict[tuple[int, int], list[int]] = {}
                    for j, i in enumerate(idx):
                        by_size.setdefault(images[ids[i]].shape[:2], []).append(j)
                    for size, js in by_size.items():
                        sel = logits if len(js) == len(idx) else logits[js]
                        class_ids = logits_to_ids(sel, size)
                        copy = fetch_async(
                            class_ids.to(torch.uint8),  # 150 classes fit
                            m.palette[class_ids],
                            class_counts(class_ids, len(m.labels)),
                        )
                        pending.append(([ids[idx[j]] for j in js], copy))
            return pending

        def finish(pending: list) -> None:
            for sel, copy in pending:
                ids_np, colour_np, counts_np = copy.arrays()
                for k, i in enumerate(sel):
                    out[i] = Annotation(
                        members={
                            "seg.png": np.ascontiguousarray(colour_np[k]),
                            "seg_ids.png": np.ascontiguousarray(ids_np[k]),
                        },
                        meta=self._class_meta(counts_np[k]),
                    )

        run_pipelined(split_chunks(order, chunk), launch, finish)
        return out

    def _class_meta(self, counts: np.ndarray) -> dict[str, Any]:
        total = float(counts.sum()) or 1.0
        frac = counts / total
        order = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0]
        order = [c for c in order if frac[c] >= self._options["min_fraction"]]
        labels = self._model.labels
        return {
            "class_ids": order,
            "classes": [labels[c] for c in order],
            "class_fractions": [round(float(frac[c]), 6) for c in order],
        }
