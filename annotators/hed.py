"""HED soft edges (``hed.png``) and the fake scribbles derived from them
(``scribble.png``), with controlnet-aux's ``ControlNetHED_Apache2`` network.

A batch of images goes through the network at once; the side outputs are
upsampled, fused (mean, sigmoid), quantised and optionally turned into
scribbles on the device, so only the final uint8 maps come back to the host.

Faithful to controlnet-aux's ``HEDdetector`` with detect and image
resolution equal to the sample size: same upsampling (bilinear, half-pixel
centres as ``cv2.resize``), same fusion, same ``safe`` quantisation and the
same scribble derivation (NMS at 127 after a sigma-3 blur, sigma-3 blur,
threshold at 4).

Scribbles are an *extra member* rather than a mode: with ``scribble=True``
the annotator writes both ``hed.png`` and ``scribble.png`` from one forward
pass (ControlNet's scribble model was trained on exactly this derivation).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from annotators.base import Annotation, Annotator, check_chunk_size, check_image
from annotators.registry import register_annotator
from annotators import weights as W

HED_FILE = "ControlNetHED.pth"


def gaussian_kernel(sigma: float, ksize: int) -> np.ndarray:
    """1-D Gaussian taps as ``cv2.getGaussianKernel(ksize, sigma)`` computes them."""
    x = np.arange(ksize, dtype=np.float64) - (ksize - 1) * 0.5
    k = np.exp(-0.5 * x * x / (sigma * sigma))
    return k / k.sum()


def cv2_gaussian_ksize(sigma: float, uint8: bool) -> int:
    """The kernel size ``cv2.GaussianBlur(img, (0, 0), sigma)`` picks
    (3 sigma each side for uint8 images, 4 sigma for float ones)."""
    return int(np.round(sigma * (3 if uint8 else 4) * 2 + 1)) | 1


def blur(x: Any, sigma: float, uint8: bool) -> Any:
    """Separable Gaussian blur of an (N, 1, H, W) float tensor with OpenCV's
    default border (reflect-101, torch's ``reflect``)."""
    import torch
    import torch.nn.functional as F

    ksize = cv2_gaussian_ksize(sigma, uint8)
    taps = torch.as_tensor(gaussian_kernel(sigma, ksize), dtype=x.dtype, device=x.device)
    r = ksize // 2
    x = F.pad(x, (r, r, 0, 0), mode="reflect")
    x = F.conv2d(x, taps.view(1, 1, 1, ksize))
    x = F.pad(x, (0, 0, r, r), mode="reflect")
    return F.conv2d(x, taps.view(1, 1, ksize, 1))


def scribble_from_edges(edges: Any) -> Any:
    """ControlNet's fake scribbles from a uint8-valued (N, 1, H, W) float edge map:
    blur, keep directional maxima above 127 (NMS), blur again, threshold at 4."""
    import torch
    import torch.nn.functional as F

    x = blur(edges, 3.0, uint8=False)
    # x survives if it is the maximum of its 3-neighbourhood along any of the
    # four directions (horizontal, vertical, two diagonals); outside is -inf,
    # as in cv2.dilate's default border.
    p = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    c = p[..., 1:-1, 1:-1]
    keep = torch.zeros_like(c, dtype=torch.bool)
    for (dy1, dx1), (dy2, dx2) in (((0, -1), (0, 1)), ((-1, 0), (1, 0)), ((-1, -1), (1, 1)), ((-1, 1), (1, -1))):
        a = p[..., 1 + dy1 : p.shape[-2] - 1 + dy1, 1 + dx1 : p.shape[-1] - 1 + dx1]
        b = p[..., 1 + dy2 : p.shape[-2] - 1 + dy2, 1 + dx2 : p.shape[-1] - 1 + dx2]
        keep |= torch.maximum(torch.maximum(a, b), c) == c
    z = torch.where(keep & (c > 127), 255.0, 0.0)
    z = blur(z, 3.0, uint8=True).round()
    return torch.where(z > 4, 255.0, 0.0)


def fuse_side_outputs(projections: Sequence[Any], size: tuple[int, int], safe: bool) -> Any:
    """HED map from the five side outputs: upsample each to ``size``
    (bilinear, half-pixel centres), average, sigmoid, optional safe step,
    then 0..255 truncated to whole values. Returns (N, 1, H, W) float32."""
    import torch
    import torch.nn.functional as F

    acc = None
    for p in projections:
        p = p.float()
        if tuple(p.shape[-2:]) != tuple(size):
            p = F.interpolate(p, size=size, mode="bilinear", align_corners=False)
        acc = p if acc is None else acc + p
    edge = torch.sigmoid(acc / len(projections))
    if safe:
        # controlnet-aux's safe_step: floor(x * 3) / 2, i.e. levels 0, .5, 1, 1.5.
        edge = torch.floor(edge * 3.0) / 2.0
    return torch.floor((edge * 255.0).clamp(0, 255))


@register_annotator
class HED(Annotator):
    """``hed.png`` (and ``scribble.png`` with ``scribble=True``): soft HED edges,
    single-channel, white edges on black.

    Options:
        weights: folder holding ``ControlNetHED.pth``; None = Hugging Face cache.
        device: ``cpu``, ``cuda[:N]`` or None (auto).
        precision: ``fp32``, ``bf16``, ``fp16`` or None (auto: bf16 on GPU).
        safe: quantise the map to three levels (ControlNet's "safe" HED).
        scribble: also write ``scribble.png`` (NMS + blur + threshold of the map).
        detect_resolution: shorter side the network sees, rounded like
            controlnet-aux (sides multiples of 64); None = the sample's own size.
        chunk_size: images per pipeline chunk (outputs do not depend on it);
            None = a quarter of the batch on CUDA, the whole batch on the CPU.
        cuda_graphs: on a GPU, replay the network from CUDA graphs captured
            once per batch shape (default on; no effect on the CPU).
    """

    name = "hed"
    version = "1"
    members = ("hed.png",)
    uses_gpu = True
    default_batch_size = 64

    def __init__(
        self,
        weights: str | None = None,
        device: str | None = None,
        precision: str | None = None,
        safe: bool = False,
        scribble: bool = False,
        detect_resolution: int | None = None,
        chunk_size: int | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        common = W.network_options("hed", weights, device, precision, detect_resolution, cuda_graphs)
        super().__init__(
            **common,
            safe=bool(safe),
            scribble=bool(scribble),
            chunk_size=check_chunk_size("hed", chunk_size),
        )
        if scribble:
            self.members = ("hed.png", "scribble.png")
        self._net = None

    def preflight(self) -> None:
        W.locate([HED_FILE], self._options["weights"])

    def import_code(self) -> None:
        import torch  # noqa: F401

        from annotators._aux import aux_module

        aux_module("hed")

    def setup(self) -> None:
        if self._net is not None:
            return
        from annotators._aux import aux_module

        ControlNetHED_Apache2 = aux_module("hed").ControlNetHED_Apache2

        self._net, self._device, self._dtype = W.load_network(ControlNetHED_Apache2, HED_FILE, self._options)

    def detect_size(self, height: int, width: int) -> tuple[int, int]:
        """Size the network sees for an image of ``height`` x ``width``."""
        res = self._options["detect_resolution"]
        if res is None:
            return height, width
        return W.reference_size(height, width, res)

    def forward(self, batch: Any) -> list[Any]:
        """The five side outputs for an (N, 3, H, W) float 0..255 RGB batch."""
        import torch

        with torch.inference_mode():
            return list(W.run_network(self, self._net, W.to_input(batch, self._device, self._dtype), "HED network"))

    def maps(self, batch_u8: Any) -> dict[str, Any]:
        """Member name -> (N, H, W) uint8 tensor on the device, for an
        (N, 3, H, W) uint8 RGB batch."""
        import torch
        import torch.nn.functional as F

        h, w = batch_u8.shape[-2:]
        dsize = self.detect_size(h, w)
        with torch.inference_mode():
            x = W.resize_batch(batch_u8.float(), dsize)
            edges = fuse_side_outputs(self.forward(x), dsize, self._options["safe"])
            if dsize != (h, w):
                edges = F.interpolate(edges, size=(h, w), mode="bilinear", align_corners=False).round()
            out = {"hed.png": edges}
            if self._options["scribble"]:
                out["scribble.png"] = scribble_from_edges(edges)
            return {k: v[:, 0].to(torch.uint8) for k, v in out.items()}

    def annotate_batch(self, images, keys=None):
        self.setup()
        images = [check_image(im) for im in images]
        results: list[Annotation | None] = [None] * len(images)
        for (h, w), idx in W.group_by_shape(images).items():

            def launch(a: int, b: int, idx=idx, h=h, w=w):
                # queue upload, forward and post-processing; nothing waits here
                ids = idx[a:b]
                maps = self.maps(W.images_to_device([images[i] for i in ids], self._device))
                # edge pixels counted on the device: the fraction is formed
                # on the host in float64, as numpy's mean of the map would be
                maps["edges"] = (maps["hed.png"] > 127).flatten(1).sum(1)
                return ids, W.HostCopy(maps, self._device), h * w

            def finish(handle) -> None:
                ids, copy, area = handle
                arrays = copy.arrays()
                edges = arrays.pop("edges")
                for j, i in enumerate(ids):
                    members = {k: v[j] for k, v in arrays.items()}
                    meta = {"edge_fraction": round(float(edges[j]) / area, 6)}
                    results[i] = Annotation(members=members, meta=meta)

            W.pipelined(len(idx), W.chunk_size(self._options["chunk_size"], len(idx), self._device), launch, finish)
        return results  # type: ignore[return-value]
