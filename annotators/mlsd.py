"""M-LSD straight lines (``mlsd.png``) with controlnet-aux's ``MobileV2_MLSD_Large``.

The whole batch goes through the network at once; centre-map NMS, top-k
selection, displacement decoding and the score/length thresholds run on the
device for all images together, and one small (N, 200, 4) array of segments
comes back to the host for drawing. Batches run as a pipeline of chunks: the
host draws one chunk's lines while the device computes the next ones, and
nothing waits for the device except the copy of a finished chunk.

Faithful to controlnet-aux's ``MLSDdetector`` (detect and image resolution =
the sample size; ControlNet's defaults ``thr_v=0.1``, ``thr_d=0.1``): the
network input is the RGB image plus a constant channel scaled to -1..1, lines
are the top 200 local maxima (3x3) of the sigmoid centre map, kept when
their score exceeds ``thr_v`` and their length (in half-resolution pixels)
exceeds ``thr_d``, and are drawn 1 px wide in white after truncating the
end points to whole pixels.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from annotators.base import Annotation, Annotator, check_chunk_size, check_image
from annotators.registry import register_annotator
from annotators import weights as W

MLSD_FILE = "mlsd_large_512_fp32.pth"
TOPK = 200


def decode_lines(tp_map: Any, thr_v: float, thr_d: float, topk: int = TOPK) -> tuple[Any, Any]:
    """Segments from an (N, >=5, h, w) M-LSD output, batched on its device.

    Returns ``lines`` (N, K, 4) float32 as x1, y1, x2, y2 in pixels of the
    network input (twice the map's resolution) and ``keep`` (N, K) bool,
    K = min(topk, h*w), in descending score order.
    """
    import torch
    import torch.nn.functional as F

    tp_map = tp_map.float()
    n, _, h, w = tp_map.shape
    heat = torch.sigmoid(tp_map[:, 0:1])
    hmax = F.max_pool2d(heat, 3, stride=1, padding=1)
    heat = (heat * (hmax == heat)).reshape(n, -1)
    scores, idx = torch.topk(heat, min(topk, h * w), dim=-1)
    yy = torch.div(idx, w, rounding_mode="floor").float()
    xx = (idx % w).float()
    disp = tp_map[:, 1:5].reshape(n, 4, -1)
    d = torch.gather(disp, 2, idx.unsqueeze(1).expand(n, 4, idx.shape[1]))  # (N, 4, K)
    length = torch.sqrt((d[:, 0] - d[:, 2]) ** 2 + (d[:, 1] - d[:, 3]) ** 2)
    keep = (scores > thr_v) & (length > thr_d)
    lines = torch.stack([xx + d[:, 0], yy + d[:, 1], xx + d[:, 2], yy + d[:, 3]], dim=-1) * 2.0
    return lines, keep


def draw_segments(shape: tuple[int, int], lines: np.ndarray) -> np.ndarray:
    """HxW uint8 map with 1 px white segments; end points truncated toward
    zero like ``int()`` on the reference's floats."""
    canvas = np.zeros(shape, dtype=np.uint8)
    if len(lines):
        # one call for all segments (an (K, 2, 2) array is K two-point
        # polylines); the same pixels as cv2.line per segment
        pts = np.trunc(lines).astype(np.int32).reshape(-1, 2, 2)
        cv2.polylines(canvas, pts, False, 255, 1)
    return canvas


@register_annotator
class MLSD(Annotator):
    """``mlsd.png``: M-LSD straight line segments, single-channel, white on
    black. The number of segments goes into the metadata (``lines``).

    Options:
        weights: folder holding ``mlsd_large_512_fp32.pth``; None = HF cache.
        device, precision: as for every neural annotator.
        thr_v: minimum centre score (ControlNet: 0.1).
        thr_d: minimum segment length in half-resolution pixels (ControlNet: 0.1).
        detect_resolution: shorter side the network sees (rounded to multiples
            of 64 like controlnet-aux); None = the sample's own size (rounded to
            multiples of 64 when it is not one already).
        chunk_size: images per pipeline chunk (outputs do not depend on it);
            None = a quarter of the batch on a GPU (at least 8).
        cuda_graphs: on a GPU, replay the network from CUDA graphs captured
            once per batch shape (default on; no effect on the CPU).
    """

    name = "mlsd"
    version = "1"
    members = ("mlsd.png",)
    uses_gpu = True
    default_batch_size = 64

    def __init__(
        self,
        weights: str | None = None,
        device: str | None = None,
        precision: str | None = None,
        thr_v: float = 0.1,
        thr_d: float = 0.1,
        detect_resolution: int | None = None,
        chunk_size: int | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        common = W.network_options("mlsd", weights, device, precision, detect_resolution, cuda_graphs)
        if thr_v < 0 or thr_d < 0:
            raise ValueError("mlsd thr_v and thr_d must be >= 0")
        super().__init__(
            **common, thr_v=float(thr_v), thr_d=float(thr_d),
            chunk_size=check_chunk_size("mlsd", chunk_size),
        )  # fmt: skip
        self._net = None

    def preflight(self) -> None:
        W.locate([MLSD_FILE], self._options["weights"])

    def import_code(self) -> None:
        import torch  # noqa: F401

        from annotators._aux import aux_module

        aux_module("mlsd.models.mbv2_mlsd_large")

    def setup(self) -> None:
        if self._net is not None:
            return
        from annotators._aux import aux_module

        MobileV2_MLSD_Large = aux_module("mlsd.models.mbv2_mlsd_large").MobileV2_MLSD_Large

        self._net, self._device, self._dtype = W.load_network(MobileV2_MLSD_Large, MLSD_FILE, self._options)

    def detect_size(self, height: int, width: int) -> tuple[int, int]:
        res = self._options["detect_resolution"]
        if res is None:
            if height % 64 == 0 and width % 64 == 0:
                return height, width
            # The network's skip connections need sides in multiples of its
            # stride; like controlnet-aux, round to multiples of 64.
            res = min(height, width)
        return W.reference_size(height, width, res)

    def forward(self, batch: Any) -> Any:
        """Raw network output for an (N, 3, H, W) float 0..255 RGB batch."""
        import torch

        with torch.inference_mode():
            n, _, h, w = batch.shape
            x = torch.cat([batch, torch.ones((n, 1, h, w), device=batch.device)], dim=1)
            x = x / 127.5 - 1.0
            return W.run_network(self, self._net, W.to_input(x, self._device, self._dtype), "M-LSD network")

    def segments(self, batch_u8: Any) -> tuple[Any, Any, tuple[int, int]]:
        """(lines (N, K, 4), keep (N, K)) as device tensors in detection
        pixels, and the detection size; queued, nothing waits for the device."""
        import torch

        h, w = batch_u8.shape[-2:]
        dsize = self.detect_size(h, w)
        with torch.inference_mode():
            x = W.resize_batch(batch_u8.float(), dsize)
            lines, keep = decode_lines(self.forward(x), self._options["thr_v"], self._options["thr_d"])
            return lines, keep, dsize

    def annotate_batch(self, images, keys=None):
        self.setup()
        images = [check_image(im) for im in images]
        results: list[Annotation | None] = [None] * len(images)
        for (h, w), idx in W.group_by_shape(images).items():

            def launch(a: int, b: int, idx=idx):
                ids = idx[a:b]
                lines, keep, dsize = self.segments(W.images_to_device([images[i] for i in ids], self._device))
                return ids, W.HostCopy({"lines": lines, "keep": keep}, self._device), dsize

            def finish(handle, h=h, w=w) -> None:
                ids, copy, dsize = handle
                found = copy.arrays()
                for j, i in enumerate(ids):
                    seg = found["lines"][j][found["keep"][j]]
                    canvas = draw_segments(dsize, seg)
                    if dsize != (h, w):
                        canvas = cv2.resize(canvas, (w, h), interpolation=cv2.INTER_LINEAR)
                    results[i] = Annotation(members={"mlsd.png": canvas}, meta={"lines": int(len(seg))})

            W.pipelined(len(idx), W.chunk_size(self._options["chunk_size"], len(idx), self._device), launch, finish)
        return results  # type: ignore[return-value]
