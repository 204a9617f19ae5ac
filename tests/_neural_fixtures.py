"""Shared fixtures for the neural annotator tests and benchmark: seeded random
weights of the real architectures saved under their real file names, and
synthetic OpenPose network outputs rendered from known skeletons."""

from __future__ import annotations

import math
import os
from typing import Callable

import numpy as np
import torch

# COCO-18 parts: 0 nose, 1 neck, 2-4 right arm, 5-7 left arm, 8-10 right leg,
# 11-13 left leg, 14/15 eyes, 16/17 ears. A standing person with arms out,
# in units of its own height, origin at the neck.
_TEMPLATE = np.array(
    [
        [0.00, -0.13], [0.00, 0.00], [-0.11, 0.01], [-0.20, 0.13], [-0.26, 0.26],
        [0.11, 0.01], [0.20, 0.13], [0.26, 0.26], [-0.07, 0.33], [-0.09, 0.58],
        [-0.10, 0.82], [0.07, 0.33], [0.09, 0.58], [0.10, 0.82], [-0.035, -0.16],
        [0.035, -0.16], [-0.07, -0.14], [0.07, -0.14],
    ]
)  # fmt: skip

# Limbs / PAF channel pairs as the OpenPose body model lays them out.
_LIMBS = (
    (2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11),
    (2, 12), (12, 13), (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18),
    (3, 17), (6, 18),
)  # fmt: skip
_PAF = (
    (31, 32), (39, 40), (33, 34), (35, 36), (41, 42), (43, 44), (19, 20), (21, 22),
    (23, 24), (25, 26), (27, 28), (29, 30), (47, 48), (49, 50), (53, 54), (51, 52),
    (55, 56), (37, 38), (45, 46),
)  # fmt: skip


def person(cx: float, neck_y: float, height: float, hide: tuple[int, ...] = ()) -> np.ndarray:
    """(18, 2) keypoints in normalised image coordinates (x / W, y / H); hidden
    parts are NaN. ``height`` is relative to the image height; the image is
    assumed 4:3 landscape so x offsets are scaled by 3/4."""
    pts = _TEMPLATE.copy() * height
    pts[:, 0] = pts[:, 0] * 0.75 + cx
    pts[:, 1] = pts[:, 1] + neck_y
    for i in hide:
        pts[i] = np.nan
    return pts


#: Scene id (grey level of the marker patch) -> people.
SCENES: dict[int, list[np.ndarray]] = {
    40: [person(0.5, 0.2, 0.85)],
    120: [person(0.2, 0.25, 0.6), person(0.52, 0.3, 0.55), person(0.82, 0.22, 0.65)],
    200: [
        person(0.3, 0.2, 0.7, hide=(6, 7, 12, 13)),  # left arm and leg hidden
        person(0.72, 0.25, 0.6, hide=(0, 14, 15, 16, 17, 9, 10)),  # head, right leg hidden
    ],
}
MARKER = 24  # side of the marker patch in pixels


def mark(image: np.ndarray, scene: int) -> np.ndarray:
    """Copy of ``image`` with the scene's marker patch in its top-left corner."""
    out = image.copy()
    out[:MARKER, :MARKER] = scene
    return out


def _render(people: list[np.ndarray], oh: int, ow: int, sh: int, sw: int) -> tuple[np.ndarray, np.ndarray]:
    """(38, oh, ow) PAFs and (19, oh, ow) heatmaps at network resolution for
    people in normalised coordinates; ``sh, sw`` is the unpadded input size."""
    yy, xx = np.mgrid[0:oh, 0:ow].astype(np.float64)
    heat = np.zeros((19, oh, ow))
    paf = np.zeros((38, oh, ow))
    count = np.zeros((19, oh, ow))

    def cell(p):  # normalised -> network-map coordinates (half-pixel centres)
        return (p[0] * sw + 0.5) / 8 - 0.5, (p[1] * sh + 0.5) / 8 - 0.5

    for pts in people:
        for part in range(18):
            if np.isnan(pts[part]).any():
                continue
            x, y = cell(pts[part])
            heat[part] = np.maximum(heat[part], np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 0.9**2)))
        for k, ((a, b), (cx, cy)) in enumerate(zip(_LIMBS, _PAF)):
            pa, pb = pts[a - 1], pts[b - 1]
            if np.isnan(pa).any() or np.isnan(pb).any():
                continue
            (xa, ya), (xb, yb) = cell(pa), cell(pb)
            length = math.hypot(xb - xa, yb - ya)
            if length < 1e-6:
                continue
            ux, uy = (xb - xa) / length, (yb - ya) / length
            t = (xx - xa) * ux + (yy - ya) * uy
            d = np.abs((xx - xa) * uy - (yy - ya) * ux)
            on = (t >= -0.5) & (t <= length + 0.5) & (d <= 1.0)
            paf[cx - 19][on] += ux
            paf[cy - 19][on] += uy
            count[k][on] += 1
    for k, (cx, cy) in enumerate(_PAF):
        n = np.maximum(count[k], 1)
        paf[cx - 19] /= n
        paf[cy - 19] /= n
    heat[18] = 1.0 - heat[:18].max(axis=0)
    return paf, heat


def synthetic_body_forward(image_height: int, image_width: int) -> Callable:
    """A replacement for ``bodypose_model.forward`` that ignores the weights and
    returns PAFs and heatmaps of the scene whose marker it sees in the input
    (BGR, -0.5..0.5, pixel (0, 0)). ``image_*`` is the detection size."""

    def forward(self, x: torch.Tensor):
        n, _, ph, pw = x.shape
        oh, ow = ph // 8, pw // 8
        scale = 0.5 * 368 / image_height
        sh, sw = int(image_height * scale), int(image_width * scale)
        pafs, heats = [], []
        for i in range(n):
            scene = int(round((float(x[i, 0, 0, 0]) + 0.5) * 256))
            paf, heat = _render(SCENES.get(scene, []), oh, ow, sh, sw)
            pafs.append(paf)
            heats.append(heat)
        ref = x.dtype
        return (
            torch.as_tensor(np.stack(pafs), dtype=torch.float32).to(x.device, ref),
            torch.as_tensor(np.stack(heats), dtype=torch.float32).to(x.device, ref),
        )

    return forward


# --------------------------------------------------------------------------
# Random weights under the real file names.


def _seeded(seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed)


def hed_net(seed: int = 0):
    from controlnet_aux.hed import ControlNetHED_Apache2

    _seeded(seed)
    net = ControlNetHED_Apache2()
    with torch.no_grad():
        # a plausible input offset and side outputs with contrast, so the
        # fused map spans the whole 0..255 range instead of sitting near 128
        net.norm.copy_(torch.tensor([122.0, 116.0, 104.0]).view(1, 3, 1, 1))
        for block in (net.block1, net.block2, net.block3, net.block4, net.block5):
            block.projection.weight.mul_(20.0)
    return net.float().eval()


def mlsd_net(seed: int = 0, head_scale: float = 60.0):
    """M-LSD with its last convolution scaled so random weights give
    confident centres and multi-pixel displacements (real line decoding)."""
    from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large

    _seeded(seed)
    net = MobileV2_MLSD_Large()
    with torch.no_grad():
        net.block23.conv3.weight.mul_(head_scale)
        net.block23.conv3.bias.mul_(head_scale)
    return net.eval()


def body_net(seed: int = 0):
    from controlnet_aux.open_pose.model import bodypose_model

    _seeded(seed)
    return bodypose_model().eval()


def hand_net(seed: int = 0):
    from controlnet_aux.open_pose.model import handpose_model

    _seeded(seed)
    return handpose_model().eval()


def face_net(seed: int = 0):
    from controlnet_aux.open_pose.face import FaceNet

    _seeded(seed)
    return FaceNet().eval()


def _unprefixed(net) -> dict:
    """State dict as body/hand files store it: without the block prefix."""
    return {k.split(".", 1)[1]: v for k, v in net.state_dict().items()}


def save_weights(folder: str, names: tuple[str, ...] = ("hed", "mlsd", "openpose")) -> dict:
    """Write seeded random weights into ``folder`` under the real file names.
    Returns {file name: network} for building the reference detectors."""
    os.makedirs(folder, exist_ok=True)
    nets = {}
    if "hed" in names:
        nets["ControlNetHED.pth"] = hed_net()
        torch.save(nets["ControlNetHED.pth"].state_dict(), os.path.join(folder, "ControlNetHED.pth"))
    if "mlsd" in names:
        nets["mlsd_large_512_fp32.pth"] = mlsd_net()
        torch.save(nets["mlsd_large_512_fp32.pth"].state_dict(), os.path.join(folder, "mlsd_large_512_fp32.pth"))
    if "openpose" in names:
        for fname, build in (("body_pose_model.pth", body_net), ("hand_pose_model.pth", hand_net)):
            nets[fname] = build()
            torch.save(_unprefixed(nets[fname]), os.path.join(folder, fname))
        nets["facenet.pth"] = face_net()
        torch.save(nets["facenet.pth"].state_dict(), os.path.join(folder, "facenet.pth"))
    return nets


def synthetic_hand_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Replacement for ``handpose_model.forward``: 21 blobs on a ring (one per
    part, a weaker second blob for some parts so the connected-component
    choice matters) and a background channel."""
    n, _, h, w = x.shape
    oh, ow = h // 8, w // 8
    yy, xx = np.mgrid[0:oh, 0:ow].astype(np.float64)
    maps = np.zeros((22, oh, ow))
    for part in range(21):
        a = 2 * math.pi * part / 21
        cx, cy = ow / 2 + 0.3 * ow * math.cos(a), oh / 2 + 0.3 * oh * math.sin(a)
        maps[part] = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (0.06 * ow) ** 2))
        if part % 3 == 0:
            maps[part] += 0.6 * np.exp(-((xx - ow / 2) ** 2 + (yy - oh / 2) ** 2) / (2 * (0.04 * ow) ** 2))
    maps[21] = 1 - maps[:21].max(0)
    out = torch.as_tensor(maps, dtype=torch.float32)[None].repeat(n, 1, 1, 1)
    return out.to(x.device, x.dtype)


def synthetic_face_forward(self, x: torch.Tensor) -> list:
    """Replacement for ``FaceNet.forward``: 70 landmark blobs on an ellipse and
    no background response; the last list item is what detectors read."""
    n, _, h, w = x.shape
    oh, ow = h // 8, w // 8
    yy, xx = np.mgrid[0:oh, 0:ow].astype(np.float64)
    maps = np.zeros((71, oh, ow))
    for part in range(70):
        a = 2 * math.pi * part / 70
        cx, cy = ow / 2 + 0.35 * ow * math.cos(a), oh / 2 + 0.42 * oh * math.sin(a)
        maps[part] = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 1.2**2))
    out = torch.as_tensor(maps, dtype=torch.float32)[None].repeat(n, 1, 1, 1)
    return [out.to(x.device, x.dtype)]
