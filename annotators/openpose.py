"""OpenPose body (and optionally hand and face) keypoints: ``openpose.png``
(the coloured stick figure ControlNet was trained on) and ``openpose.json``
(the people in OpenPose's COCO-18 layout, in sample pixels).

The networks are controlnet-aux's (``bodypose_model``, ``handpose_model``,
``FaceNet``). The whole batch goes through the body network at once; the
heatmaps are brought to image resolution, blurred and searched for peaks on
the device. Every resize in the reference (OpenCV INTER_AREA / LANCZOS4,
cropping the stride padding, scipy's Gaussian) is linear and separable, so
each axis collapses into one precomputed matrix and the whole chain becomes
two batched matrix products. Part-affinity fields stay at network resolution;
the association step evaluates them only where it needs them (ten points per
candidate limb), vectorised over every candidate pair with numpy. Only the
greedy matching — a few dozen steps per image — is a Python loop.

Faithful to controlnet-aux's ``OpenposeDetector`` (detect and image
resolution = the sample size, body at scale 0.5 of boxsize 368, stride 8):
same network input, same peak rule (4-neighbour maximum of the sigma-3
blurred heatmap above 0.1), same limb scoring (10 samples, 0.05, 80%,
distance prior), same greedy matching and person assembly, same drawing.
"""

from __future__ import annotations

import colorsys
import functools
import math
from typing import Any, Sequence

import cv2
import numpy as np

from annotators.base import Annotation, Annotator, check_chunk_size, check_image
from annotators.registry import register_annotator
from annotators import weights as W

BODY_FILE = "body_pose_model.pth"
HAND_FILE = "hand_pose_model.pth"
FACE_FILE = "facenet.pth"

BOXSIZE = 368
BODY_SCALE = 0.5
STRIDE = 8
PAD_VALUE = 128
PEAK_THRESHOLD = 0.1
PAF_THRESHOLD = 0.05
MID_SAMPLES = 10

#: Limbs as (part A, part B), 1-based COCO-18 part numbers, in association order.
LIMBS = (
    (2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11),
    (2, 12), (12, 13), (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18),
    (3, 17), (6, 18),
)  # fmt: skip
#: Heatmap-stack channels (x, y) of each limb's part-affinity field (PAF
#: channel = number - 19).
PAF_CHANNELS = (
    (31, 32), (39, 40), (33, 34), (35, 36), (41, 42), (43, 44), (19, 20), (21, 22),
    (23, 24), (25, 26), (27, 28), (29, 30), (47, 48), (49, 50), (53, 54), (51, 52),
    (55, 56), (37, 38), (45, 46),
)  # fmt: skip
BODY_COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
HAND_EDGES = (
    (0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10),
    (10, 11), (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20),
)  # fmt: skip
HAND_SCALES = (0.5, 1.0, 1.5, 2.0)
HAND_WINDOW = 128
FACE_WINDOW = 384
DRAW_EPS = 0.01
#: Images per body pass on CUDA, at least (see :meth:`OpenPose.forward`).
MIN_GPU_BATCH = 24


def _body_bucket(n: int) -> int:
    """Batch size a graphed body pass runs at: 2 to 23 images padded to
    ``MIN_GPU_BATCH`` (see :meth:`OpenPose.forward`), others as they are."""
    return MIN_GPU_BATCH if 1 < n < MIN_GPU_BATCH else n


#: Default pipeline chunk on CUDA: the default batch of 160 runs as 54 + 54
#: + 52, sizes the body network runs nearly as fast at as at 160 in one pass.
#: Bare bf16 forward by batch (bench/probe_openpose.py, H100, 2026-11-28
#: 01:01): 40: 3515, 54: 4213, 80: 4094, 160: 4252 images/s; the annotator at
#: batch 160 by chunk: 40: 2935, 54: 3351, 80: 3196, 160: 3067 (one chunk
#: leaves nothing to overlap the host work with).
GPU_CHUNK = 54


# --------------------------------------------------------------------------
# OpenCV / scipy resampling as matrices (one axis at a time).


def _lanczos4_taps(fx: float) -> np.ndarray:
    t = fx + 3.0 - np.arange(8)
    w = np.where(np.abs(t) < 1e-6, 1e30, 0.0)
    nz = np.abs(t) >= 1e-6
    y = t[nz] * math.pi / 4.0
    w[nz] = np.sin(4.0 * y) * np.sin(y) / (y * y * 4.0)
    return w / w.sum()


def resize_matrix(src: int, dst: int, interp: str, area_mode: bool = False) -> np.ndarray:
    """(dst, src) matrix doing what ``cv2.resize`` does along one axis.

    ``interp``: ``area`` (shrinking box filter with fractional edge weights),
    ``lanczos4`` (8 taps, replicated border) or ``linear``; ``area_mode``
    gives OpenCV's INTER_AREA behaviour on an enlarged axis.
    """
    m = np.zeros((dst, src), dtype=np.float64)
    scale = src / dst
    if interp == "area" and src >= dst:
        for dx in range(dst):
            f1 = dx * scale
            f2 = f1 + scale
            cell = min(scale, src - f1)
            s1 = math.ceil(f1)
            s2 = min(math.floor(f2), src - 1)
            s1 = min(s1, s2)
            if s1 - f1 > 1e-3:
                m[dx, s1 - 1] += (s1 - f1) / cell
            for sx in range(s1, s2):
                m[dx, sx] += 1.0 / cell
            if f2 - s2 > 1e-3:
                m[dx, s2] += min(min(f2 - s2, 1.0), cell) / cell
        return m
    for dx in range(dst):
        if interp == "area" or area_mode:
            sx = math.floor(dx * scale)
            fx = (dx + 1) - (sx + 1) / scale
            fx = 0.0 if fx <= 0 else fx - math.floor(fx)
            taps, first = np.array([1.0 - fx, fx]), sx
        elif interp == "lanczos4":
            f = float(np.float32((dx + 0.5) * scale - 0.5))
            sx = math.floor(f)
            taps, first = _lanczos4_taps(f - sx), sx - 3
        elif interp == "linear":
            f = (dx + 0.5) * scale - 0.5
            sx = math.floor(f)
            taps, first = np.array([1.0 - (f - sx), f - sx]), sx
        else:
            raise ValueError(f"unknown interpolation {interp!r}")
        for k, wgt in enumerate(taps):
            m[dx, min(max(first + k, 0), src - 1)] += wgt
    return m


def smart_interp(src_hw: tuple[float, float], dst_hw: tuple[float, float]) -> str:
    """The interpolation controlnet-aux's ``smart_resize`` picks."""
    k = (dst_hw[0] + dst_hw[1]) / (src_hw[0] + src_hw[1])
    return "area" if k < 1 else "lanczos4"


def gaussian_matrix(n: int, sigma: float = 3.0, truncate: float = 4.0) -> np.ndarray:
    """(n, n) matrix of ``scipy.ndimage.gaussian_filter1d`` (mode ``reflect``)."""
    r = int(truncate * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    taps = np.exp(-0.5 * x * x / (sigma * sigma))
    taps /= taps.sum()
    m = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        for t, wgt in zip(range(-r, r + 1), taps):
            j = i + t
            # reflect about the edge (d c b a | a b c d), repeatedly if needed
            while j < 0 or j >= n:
                j = -j - 1 if j < 0 else 2 * n - j - 1
            m[i, j] += wgt
    return m


class BodyGeometry:
    """Sizes and resampling matrices of the body pass for one detection size."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        scale = BODY_SCALE * BOXSIZE / height  # same float expression as the reference
        ht, wt = height * scale, width * scale
        self.sh, self.sw = int(ht), int(wt)
        self.ph = self.sh + (-self.sh) % STRIDE
        self.pw = self.sw + (-self.sw) % STRIDE
        self.oh, self.ow = self.ph // STRIDE, self.pw // STRIDE
        pre = smart_interp((height, width), (ht, wt))
        self.pre_y = resize_matrix(height, self.sh, pre)
        self.pre_x = resize_matrix(width, self.sw, pre)
        # OpenCV enlarges uint8 images with 11-bit fixed-point taps and rounds
        # half up; shrinking (INTER_AREA) works in float and rounds to even.
        self.fixed_point = pre == "lanczos4"
        if self.fixed_point:
            self.pre_y = np.round(self.pre_y * 2048) / 2048
            self.pre_x = np.round(self.pre_x * 2048) / 2048
        post = smart_interp((self.sh, self.sw), (height, width))
        up_y = resize_matrix(self.oh, self.ph, "lanczos4")[: self.sh]
        up_x = resize_matrix(self.ow, self.pw, "lanczos4")[: self.sw]
        # network map -> image pixels, per axis
        self.map_y = resize_matrix(self.sh, height, post) @ up_y
        self.map_x = resize_matrix(self.sw, width, post) @ up_x
        # ... followed by the sigma-3 blur of the peak search
        self.blur_y = gaussian_matrix(height) @ self.map_y
        self.blur_x = gaussian_matrix(width) @ self.map_x
        # |blur_y @ z| <= (largest absolute row sum of blur_y) * max|z|; the
        # small margin covers float32 rounding in the device's products
        self.blur_y_gain = float(np.abs(self.blur_y).sum(1).max()) * (1 + 1e-4)
        self._dev: dict[Any, dict[str, Any]] = {}

    def on(self, device) -> dict[str, Any]:
        """The matrices as float32 tensors on ``device`` (cached)."""
        import torch

        key = str(device)
        if key not in self._dev:
            self._dev[key] = {
                name: torch.as_tensor(getattr(self, name), dtype=torch.float32, device=device)
                for name in ("pre_y", "pre_x", "map_y", "map_x", "blur_y", "blur_x")
            }
        return self._dev[key]


# --------------------------------------------------------------------------
# Device side: input preparation and peak search.


def body_input(batch_rgb: Any, geo: BodyGeometry) -> Any:
    """(N, 3, ph, pw) network input from an (N, 3, H, W) float RGB 0..255 batch:
    BGR, resized like OpenCV (rounded to whole values), padded right/bottom
    with 128, scaled to -0.5..0.5."""
    import torch
    import torch.nn.functional as F

    m = geo.on(batch_rgb.device)
    x = batch_rgb.flip(1)
    x = m["pre_y"] @ x @ m["pre_x"].T
    x = (torch.floor(x + 0.5) if geo.fixed_point else x.round()).clamp(0, 255)
    x = F.pad(x, (0, geo.pw - geo.sw, 0, geo.ph - geo.sh), value=float(PAD_VALUE))
    return x / 256.0 - 0.5


def peak_bounds(heat: Any, geo: BodyGeometry) -> tuple[Any, Any, Any]:
    """First half of the peak search, queued without waiting for the device.

    Returns ``(x, z, bound)``: the 18 part heatmaps ``x`` (N, 18, oh, ow) in
    float32, ``z = x @ blur_x.T`` (the blur along the rows, still at network
    height) and ``bound`` (N, 18), an upper bound of the fully blurred map of
    each part: ``|blur_y @ z| <= blur_y_gain * max|z|``. A part whose bound is
    not above the peak threshold cannot have a peak, so its full-resolution
    map (the expensive part) is never computed: on an image without people
    none is.
    """
    m = geo.on(heat.device)
    x = heat[:, :18].float()
    z = x @ m["blur_x"].T
    bound = z.abs().amax(dim=(-2, -1)) * geo.blur_y_gain
    return x, z, bound


def _at_least_neighbours(b: Any, ch: Any, y: Any, x: Any) -> Any:
    """True where ``b[ch, y, x]`` is >= its four neighbours, zero outside
    the map (the reference's shifted copies are zero-filled)."""
    import torch

    h, w = b.shape[-2:]
    v = b[ch, y, x]
    keep = torch.ones_like(v, dtype=torch.bool)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        yy, xq = y + dy, x + dx
        inside = (yy >= 0) & (yy < h) & (xq >= 0) & (xq < w)
        near = b[ch, yy.clamp(0, h - 1), xq.clamp(0, w - 1)]
        keep &= v >= torch.where(inside, near, torch.zeros_like(near))
    return keep


def peaks_of_parts(x: Any, z: Any, parts: np.ndarray, geo: BodyGeometry, chunk: int = 288) -> np.ndarray:
    """Peaks of the selected part maps (second half of the search).

    ``parts``: (C, 2) host array of (image, part) rows in image-major, part
    order. Returns a float64 host array (P, 5) of (image, part, y, x,
    score) in the reference's order (image, part, row-major), score
    being the un-blurred heatmap value at the peak.
    """
    import torch

    m = geo.on(x.device)
    found = []
    for start in range(0, len(parts), chunk):
        rows = torch.as_tensor(parts[start : start + chunk], device=x.device)
        n, part = rows[:, 0], rows[:, 1]
        b = m["blur_y"] @ z[n, part]  # (C, H, W): the blurred map at image resolution
        # Pixels above the threshold first (row-major, as the reference), then
        # the four-neighbour test at those pixels only: one pass over the maps
        # instead of a padded copy and nine full-size comparisons.
        ch, y, xx = (b > PEAK_THRESHOLD).nonzero().unbind(1)
        if ch.shape[0]:
            keep = _at_least_neighbours(b, ch, y, xx)
            ch, y, xx = ch[keep], y[keep], xx[keep]
        if ch.shape[0]:
            pn, pp = n[ch], part[ch]
            score = torch.einsum("pi,pij,pj->p", m["map_y"][y], x[pn, pp], m["map_x"][xx])
            found.append(torch.stack([pn.double(), pp.double(), y.double(), xx.double(), score.double()], 1))
    if not found:
        return np.zeros((0, 5), dtype=np.float64)
    return torch.cat(found).cpu().numpy()


def find_peaks(heat: Any, geo: BodyGeometry) -> np.ndarray:
    """Peaks of the 18 part heatmaps for a batch, on the device.

    ``heat``: (N, >=18, oh, ow) network heatmaps. Returns a float64 host array
    (P, 5) of (image, part, y, x, score) in image-major, part, row-major order
    (the reference's order), score being the un-blurred heatmap value.
    """
    x, z, bound = peak_bounds(heat, geo)
    parts = np.argwhere(bound.cpu().numpy() > PEAK_THRESHOLD)
    return peaks_of_parts(x, z, parts, geo)


# --------------------------------------------------------------------------
# Host side: limb association and person assembly.


def _sample(paf: np.ndarray, map_y: np.ndarray, map_x: np.ndarray, sy: np.ndarray, sx: np.ndarray) -> np.ndarray:
    """Values of a network-resolution map resampled to image pixels (sy, sx)."""
    rows = map_y[sy.ravel()] @ paf  # (P, ow)
    return np.einsum("pw,pw->p", rows, map_x[sx.ravel()]).reshape(sy.shape)


def _limb_connections(
    cand_a: np.ndarray, cand_b: np.ndarray, paf_x: np.ndarray, paf_y: np.ndarray,
    map_y: np.ndarray, map_x: np.ndarray, height: int,
) -> np.ndarray:
    """Greedy one-to-one connections (idA, idB, score, i, j) for one limb."""
    na, nb = len(cand_a), len(cand_b)
    ax, ay = cand_a[:, 0][:, None], cand_a[:, 1][:, None]
    bx, by = cand_b[:, 0][None, :], cand_b[:, 1][None, :]
    vx, vy = np.broadcast_arrays(bx - ax, by - ay)
    norm = np.maximum(np.sqrt(vx * vx + vy * vy), 0.001)
    ux, uy = vx / norm, vy / norm
    # the 10 sample points of every pair, rounded half-to-even like round()
    sx = np.rint(np.linspace(np.broadcast_to(ax, (na, nb)), np.broadcast_to(bx, (na, nb)), MID_SAMPLES, axis=-1)).astype(np.int64)
    sy = np.rint(np.linspace(np.broadcast_to(ay, (na, nb)), np.broadcast_to(by, (na, nb)), MID_SAMPLES, axis=-1)).astype(np.int64)
    # PAF value at image pixel (y, x) = map_y[y] . paf . map_x[x]: evaluated
    # only at the sample points, never at full resolution
    fx = _sample(paf_x, map_y, map_x, sy, sx)
    fy = _sample(paf_y, map_y, map_x, sy, sx)
    mid = fx * ux[..., None] + fy * uy[..., None]
    prior = mid.sum(-1) / MID_SAMPLES + np.minimum(0.5 * height / norm - 1, 0)
    ok = ((mid > PAF_THRESHOLD).sum(-1) > 0.8 * MID_SAMPLES) & (prior > 0)
    ii, jj = np.nonzero(ok)
    order = np.argsort(-prior[ii, jj], kind="stable")
    used_a: set[int] = set()
    used_b: set[int] = set()
    rows_out = []
    for o in order:
        i, j = int(ii[o]), int(jj[o])
        if i in used_a or j in used_b:
            continue
        used_a.add(i)
        used_b.add(j)
        rows_out.append((cand_a[i, 3], cand_b[j, 3], prior[i, j], i, j))
        if len(rows_out) >= min(na, nb):
            break
    return np.array(rows_out, dtype=np.float64).reshape(-1, 5)


def associate(
    peaks: np.ndarray, paf: np.ndarray, geo: BodyGeometry
) -> tuple[np.ndarray, np.ndarray]:
    """People from one image's peaks and its network-resolution PAFs.

    ``peaks``: (P, 4) part, y, x, score in the reference's order; ``paf``:
    (38, oh, ow) at network resolution. Returns the reference's ``candidate`` (P, 4: x, y, score, id)
    and ``subset`` (people, 20: candidate index per part or -1, total score,
    part count).
    """
    candidate = np.zeros((len(peaks), 4), dtype=np.float64)
    candidate[:, 0] = peaks[:, 2]
    candidate[:, 1] = peaks[:, 1]
    candidate[:, 2] = peaks[:, 3]
    candidate[:, 3] = np.arange(len(peaks))
    parts = peaks[:, 0].astype(np.int64)
    by_part = [candidate[parts == p] for p in range(18)]
    paf = paf.astype(np.float64)
    connections: list[np.ndarray | None] = []
    for (a, b), (cx, cy) in zip(LIMBS, PAF_CHANNELS):
        ca, cb = by_part[a - 1], by_part[b - 1]
        if len(ca) and len(cb):
            connections.append(
                _limb_connections(ca, cb, paf[cx - 19], paf[cy - 19], geo.map_y, geo.map_x, geo.height)
            )
        else:
            connections.append(None)

    subset = np.zeros((0, 20), dtype=np.float64)
    for k, conn in enumerate(connections):
        if conn is None:
            continue
        ia, ib = LIMBS[k][0] - 1, LIMBS[k][1] - 1
        for row in conn:
            pa, pb, s = row[0], row[1], row[2]
            hits = [j for j in range(len(subset)) if subset[j, ia] == pa or subset[j, ib] == pb][:2]
            if len(hits) == 1:
                j = hits[0]
                if subset[j, ib] != pb:
                    subset[j, ib] = pb
                    subset[j, -1] += 1
                    subset[j, -2] += candidate[int(pb), 2] + s
            elif len(hits) == 2:
                j1, j2 = hits
                both = ((subset[j1] >= 0).astype(int) + (subset[j2] >= 0).astype(int))[:-2]
                if not np.any(both == 2):  # disjoint: merge
                    subset[j1, :-2] += subset[j2, :-2] + 1
                    subset[j1, -2:] += subset[j2, -2:]
                    subset[j1, -2] += s
                    subset = np.delete(subset, j2, 0)
                else:
                    subset[j1, ib] = pb
                    subset[j1, -1] += 1
                    subset[j1, -2] += candidate[int(pb), 2] + s
            elif k < 17:
                new = -np.ones(20)
                new[ia], new[ib] = pa, pb
                new[-1] = 2
                new[-2] = candidate[int(pa), 2] + candidate[int(pb), 2] + s
                subset = np.vstack([subset, new])
    keep = ~((subset[:, -1] < 4) | (subset[:, -2] / np.maximum(subset[:, -1], 1e-12) < 0.4))
    return candidate, subset[keep]


def people_from(candidate: np.ndarray, subset: np.ndarray) -> list[dict[str, Any]]:
    """Each person: 18 body keypoints (x, y, score) in detection pixels or None."""
    people = []
    for row in subset:
        kps = []
        for ci in row[:18].astype(int):
            kps.append(None if ci == -1 else (candidate[ci, 0], candidate[ci, 1], candidate[ci, 2]))
        people.append({"body": kps, "score": float(row[18]), "parts": int(row[19])})
    return people


# --------------------------------------------------------------------------
# Hands and face: boxes from the body, as the reference derives them.


def hand_boxes(body: list, height: int, width: int) -> list[tuple[int, int, int, bool]]:
    """(x, y, side, is_left) of each hand box of one person (pixel keypoints)."""
    out = []
    for shoulder, elbow, wrist, is_left in ((5, 6, 7, True), (2, 3, 4, False)):
        k1, k2, k3 = body[shoulder], body[elbow], body[wrist]
        if k1 is None or k2 is None or k3 is None:
            continue
        x = k3[0] + 0.33 * (k3[0] - k2[0])
        y = k3[1] + 0.33 * (k3[1] - k2[1])
        d_we = math.sqrt((k3[0] - k2[0]) ** 2 + (k3[1] - k2[1]) ** 2)
        d_es = math.sqrt((k2[0] - k1[0]) ** 2 + (k2[1] - k1[1]) ** 2)
        side = 1.5 * max(d_we, 0.9 * d_es)
        x -= side / 2
        y -= side / 2
        x, y = max(x, 0), max(y, 0)
        w1 = width - x if x + side > width else side
        w2 = height - y if y + side > height else side
        side = min(w1, w2)
        if side >= 20:
            out.append((int(x), int(y), int(side), is_left))
    return out


def face_box(body: list, height: int, width: int) -> tuple[int, int, int] | None:
    """(x, y, side) of the face box of one person, or None."""
    head = body[0]
    others = [(body[14], 3.0), (body[15], 3.0), (body[16], 1.5), (body[17], 1.5)]
    if head is None or all(k is None for k, _ in others):
        return None
    side = 0.0
    for k, f in others:
        if k is not None:
            side = max(side, max(abs(head[0] - k[0]), abs(head[1] - k[1])) * f)
    x, y = max(head[0] - side, 0), max(head[1] - side, 0)
    w1 = width - x if x + side > width else side * 2
    w2 = height - y if y + side > height else side * 2
    side = min(w1, w2)
    return (int(x), int(y), int(side)) if side >= 20 else None


def _cv2_smart_resize(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    interp = cv2.INTER_AREA if smart_interp((h, w), (size, size)) == "area" else cv2.INTER_LANCZOS4
    return cv2.resize(img, (size, size), interpolation=interp)


def _crop_peaks(peaks: np.ndarray, x0: int, y0: int, height: int, width: int) -> np.ndarray:
    """Crop-pixel peaks -> normalised image coordinates in float32 (-1 = none),
    with the reference's arithmetic."""
    p = peaks.astype(np.float32)
    p[:, 0] = np.where(p[:, 0] < 1e-6, -1, p[:, 0] + x0) / float(width)
    p[:, 1] = np.where(p[:, 1] < 1e-6, -1, p[:, 1] + y0) / float(height)
    return p


# --------------------------------------------------------------------------
# Drawing (the reference's canvas, stroke for stroke).


def draw_pose(canvas: np.ndarray, person: dict[str, Any], height: int, width: int) -> None:
    """Draw one person (body, then hands, then face) onto an RGB canvas."""
    body = person.get("body_norm")
    if body is not None:
        for (a, b), color in zip(LIMBS[:17], BODY_COLORS):
            k1, k2 = body[a - 1], body[b - 1]
            if k1 is None or k2 is None:
                continue
            ys = np.array([k1[0], k2[0]]) * float(width)
            xs = np.array([k1[1], k2[1]]) * float(height)
            mx, my = np.mean(xs), np.mean(ys)
            length = ((xs[0] - xs[1]) ** 2 + (ys[0] - ys[1]) ** 2) ** 0.5
            angle = math.degrees(math.atan2(xs[0] - xs[1], ys[0] - ys[1]))
            poly = cv2.ellipse2Poly((int(my), int(mx)), (int(length / 2), 4), int(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, poly, [int(float(c) * 0.6) for c in color])
        for k, color in zip(body, BODY_COLORS):
            if k is not None:
                cv2.circle(canvas, (int(int(k[0] * width)), int(int(k[1] * height))), 4, color, thickness=-1)
    for hand in (person.get("left_hand_norm"), person.get("right_hand_norm")):
        if hand is None or len(hand) == 0:
            continue
        for ie, (e1, e2) in enumerate(HAND_EDGES):
            x1, y1 = int(hand[e1, 0] * width), int(hand[e1, 1] * height)
            x2, y2 = int(hand[e2, 0] * width), int(hand[e2, 1] * height)
            if x1 > DRAW_EPS and y1 > DRAW_EPS and x2 > DRAW_EPS and y2 > DRAW_EPS:
                rgb = np.array(colorsys.hsv_to_rgb(ie / float(len(HAND_EDGES)), 1.0, 1.0)) * 255
                cv2.line(canvas, (x1, y1), (x2, y2), rgb, thickness=2)
        for px, py in hand:
            x, y = int(px * width), int(py * height)
            if x > DRAW_EPS and y > DRAW_EPS:
                cv2.circle(canvas, (x, y), 4, (0, 0, 255), thickness=-1)
    face = person.get("face_norm")
    if face is not None and len(face):
        for px, py in face:
            x, y = int(px * width), int(py * height)
            if x > DRAW_EPS and y > DRAW_EPS:
                cv2.circle(canvas, (x, y), 3, (255, 255, 255), thickness=-1)


@register_annotator
class OpenPose(Annotator):
    """``openpose.png`` + ``openpose.json``: OpenPose skeletons (COCO-18 body,
    optionally 21-point hands and 70-point faces).

    ``openpose.json`` holds ``{"canvas_width", "canvas_height", "people": [
    {"pose_keypoints_2d": [x, y, c] * 18, "hand_left_keypoints_2d",
    "hand_right_keypoints_2d" ([x, y, c] * 21, with hands), "face_keypoints_2d"
    ([x, y, c] * 70, with face)}]}`` in sample pixels; a missing point is
    ``0, 0, 0`` as in OpenPose. Metadata: ``people``, ``keypoints`` (body
    keypoints found), and ``hand_keypoints`` / ``face_keypoints`` when enabled.

    Options:
        weights: folder holding ``body_pose_model.pth`` (+ ``hand_pose_model.pth``,
            ``facenet.pth`` when enabled); None = Hugging Face cache.
        device, precision: as for every neural annotator.
        hands, face: also detect and draw hands / face (ControlNet "openpose_full").
        detect_resolution: shorter side the detector sees (rounded to multiples
            of 64 like controlnet-aux); None = the sample's own size.
        chunk_size: images per pipeline chunk (outputs do not depend on it);
            None = ``GPU_CHUNK`` (54) on CUDA, the whole batch on the CPU.
        cuda_graphs: on a GPU, replay the network from CUDA graphs captured
            once per batch shape (default on; no effect on the CPU).
    """

    name = "openpose"
    version = "1"
    members = ("openpose.png", "openpose.json")
    uses_gpu = True
    #: Three chunks of ``GPU_CHUNK``: the host work before a batch's first
    #: chunk and after its last one (staging, peak search, drawing) is not
    #: hidden behind device work, so larger batches amortise it.
    default_batch_size = 160

    def __init__(
        self,
        weights: str | None = None,
        device: str | None = None,
        precision: str | None = None,
        hands: bool = False,
        face: bool = False,
        detect_resolution: int | None = None,
        chunk_size: int | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        common = W.network_options("openpose", weights, device, precision, detect_resolution, cuda_graphs)
        super().__init__(**common, hands=bool(hands), face=bool(face),
                         chunk_size=check_chunk_size("openpose", chunk_size))
        self._body = None
        self._geometry: dict[tuple[int, int], BodyGeometry] = {}

    # -- setup ---------------------------------------------------------------

    def preflight(self) -> None:
        W.locate(self.required_files(), self._options["weights"])

    def required_files(self) -> list[str]:
        files = [BODY_FILE]
        if self._options["hands"]:
            files.append(HAND_FILE)
        if self._options["face"]:
            files.append(FACE_FILE)
        return files

    def import_code(self) -> None:
        import torch  # noqa: F401

        from annotators._aux import aux_module

        aux_module("open_pose.model")
        if self._options["face"]:
            aux_module("open_pose.face")

    def setup(self) -> None:
        if self._body is not None:
            return
        from annotators._aux import aux_module
        from annotators._torch import resolve_device, resolve_precision

        model = aux_module("open_pose.model")
        bodypose_model, handpose_model = model.bodypose_model, model.handpose_model

        paths = W.locate(self.required_files(), self._options["weights"])
        self._device = resolve_device(self._options["device"])
        self._dtype = resolve_precision(self._options["precision"], self._device)

        def build(factory, filename, prefixed):
            import torch

            W.verify(paths[filename], filename)
            state = W.load_state_dict(paths[filename])
            if prefixed:
                # The body/hand files name parameters without the block prefix
                # ("conv1_1.weight" for "model0.conv1_1.weight").
                with torch.device("meta"):  # the names only
                    names = list(factory().state_dict())
                state = {k: state[k.split(".", 1)[1]] for k in names}
            return W.prepare_model(W.build_loaded(factory, state), self._device, self._dtype)

        self._hand = build(handpose_model, HAND_FILE, True) if self._options["hands"] else None
        if self._options["face"]:
            FaceNet = aux_module("open_pose.face").FaceNet

            self._face = build(FaceNet, FACE_FILE, False)
        else:
            self._face = None
        self._body = build(bodypose_model, BODY_FILE, True)

    def detect_size(self, height: int, width: int) -> tuple[int, int]:
        res = self._options["detect_resolution"]
        if res is None:
            return height, width
        return W.reference_size(height, width, res)

    def geometry(self, height: int, width: int) -> BodyGeometry:
        if (height, width) not in self._geometry:
            self._geometry[(height, width)] = BodyGeometry(height, width)
        return self._geometry[(height, width)]

    # -- body ----------------------------------------------------------------

    def forward(self, x: Any) -> tuple[Any, Any]:
        """(PAFs, heatmaps) of the body network for a prepared input batch.

        On CUDA a batch of 2 to ``MIN_GPU_BATCH - 1`` images is padded (with
        copies of its last image) to ``MIN_GPU_BATCH``: for 8 and 16 images
        cuDNN picks an implicit-GEMM kernel that makes them take longer than
        24 (H200, bf16, images/s: 176 at 8, 286 at 16, 3578 at 24, 3121 at
        32, 4045 at 48, 3864 at 64). CUDA graphs are captured per batch size
        met (no padding to powers of two, which would turn 48 into 64).
        """
        import torch

        with torch.inference_mode():
            n = int(x.shape[0])
            if self._device.type == "cuda":
                from annotators._torch import pad_batch

                x = pad_batch(x, _body_bucket(n))
            paf, heat = W.run_network(self, self._body, W.to_input(x, self._device, self._dtype),
                                      "OpenPose body network", exact_shapes=True)
            return paf[:n], heat[:n]

    #: Detection sizes whose body stage is graphed; each keeps its graphs
    #: (and their memory) for the life of the annotator, so a run with many
    #: sizes (``crop="none"``) graphs the first few and runs the rest eagerly.
    MAX_GRAPHED_SIZES = 4

    def _body_stage(self, dsize: tuple[int, int]) -> Any:
        """uint8 (N, 3, H, W) device batch -> (PAFs, part maps, row-blurred
        part maps, bounds): the device work of a chunk from pre-processing to
        the peak bounds as one function, captured as one CUDA graph per batch
        shape. Its dozens of small kernels around the network then cost the
        host one replay instead of a launch each. One function per detection
        size (kept, so that its graphs are found again), for at most
        ``MAX_GRAPHED_SIZES`` sizes; None past that."""
        stages = self.__dict__.setdefault("_body_stages", {})
        if dsize not in stages:
            if len(stages) >= self.MAX_GRAPHED_SIZES:
                return None

            def stage(batch: Any) -> tuple[Any, Any, Any, Any]:
                # the bare network: the graph itself pads small batches
                return self._body_pass(batch, dsize, lambda x: self._body(W.to_input(x, self._device, self._dtype)))

            stages[dsize] = stage
        return stages[dsize]

    def _body_pass(self, batch: Any, dsize: tuple[int, int], net: Any) -> tuple[Any, Any, Any, Any]:
        """uint8 (N, 3, H, W) device batch -> (PAFs, part maps, row-blurred
        part maps, bounds) through ``net`` (input batch -> PAFs, heatmaps)."""
        geo = self.geometry(*dsize)
        paf, heat = net(body_input(W.resize_batch(batch.float(), dsize), geo))
        return (paf, *peak_bounds(heat, geo))

    def launch_bodies(self, images: Sequence[np.ndarray], dsize: tuple[int, int]) -> dict[str, Any]:
        """Queue the body pass of one chunk of same-size RGB images on the
        device and return a handle for :meth:`finish_bodies`; nothing here
        waits for the device."""
        import torch

        geo = self.geometry(*dsize)
        with torch.inference_mode():
            batch = W.images_to_device(images, self._device)
            stage = self._body_stage(dsize) if self._options["cuda_graphs"] and batch.device.type == "cuda" \
                else None
            if stage is not None:
                from annotators._torch import graphed

                paf, heat, z, bound = graphed(self, stage, "OpenPose body stage", bucket=_body_bucket)(batch)
            else:
                paf, heat, z, bound = self._body_pass(batch, dsize, self.forward)
            ready = None
            if self._device.type == "cuda":
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(self._device))
            return {"geo": geo, "paf": paf, "heat": heat, "z": z, "ready": ready,
                    "bound": W.HostCopy({"bound": bound}, self._device)}

    def finish_bodies(self, pending: dict[str, Any]) -> list[list[dict]]:
        """People per image (detection pixels) of a launched chunk.

        Only the part maps whose bound allows a peak are searched at full
        resolution, and only images with peaks bring their PAFs to the host.
        On CUDA that work runs on a side stream, so waiting for it does not
        wait for chunks queued after this one.
        """
        import contextlib

        import torch

        bound = pending["bound"].arrays()["bound"]
        people: list[list[dict]] = [[] for _ in range(len(bound))]
        parts = np.argwhere(bound > PEAK_THRESHOLD)
        if not len(parts):
            return people
        geo = pending["geo"]
        side = None
        if pending["ready"] is not None:
            side = W.cuda_stream("openpose-peaks", self._device)
            side.wait_event(pending["ready"])
        with torch.inference_mode(), (torch.cuda.stream(side) if side is not None else contextlib.nullcontext()):
            peaks = peaks_of_parts(pending["heat"], pending["z"], parts, geo)
            with_peaks = np.unique(peaks[:, 0]).astype(np.int64)
            paf = pending["paf"][torch.as_tensor(with_peaks, device=self._device)].float().cpu().numpy()
            if side is not None:
                side.synchronize()  # the chunk's tensors are released after this
        for j, n in enumerate(with_peaks):
            mine = peaks[peaks[:, 0] == n][:, 1:]
            candidate, subset = associate(mine, paf[j], geo)
            people[n] = people_from(candidate, subset)
        return people

    # -- hands and face --------------------------------------------------------

    def _hand_peaks(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        """(21, 2) crop-pixel peaks ([0, 0] = none) for BGR hand crops, batched."""
        import torch
        from scipy import ndimage

        if not crops:
            return []
        blurred = [cv2.GaussianBlur(c, (0, 0), 0.8) for c in crops]
        acc = None
        with torch.inference_mode():
            for s in HAND_SCALES:
                size = int(s * BOXSIZE)
                x = np.stack([_cv2_smart_resize(c, size) for c in blurred])  # multiple of 8: no pad
                x = torch.from_numpy(x).to(self._device).permute(0, 3, 1, 2).float() / 256.0 - 0.5
                out = self._hand(W.to_input(x, self._device, self._dtype)).float()
                up = resize_matrix(size // STRIDE, size, "lanczos4")
                m = torch.as_tensor(
                    resize_matrix(size, HAND_WINDOW, smart_interp((size, size), (HAND_WINDOW,) * 2)) @ up,
                    dtype=torch.float32, device=self._device,
                )
                part = (m @ out @ m.T) / len(HAND_SCALES)
                acc = part if acc is None else acc + part
            g = torch.as_tensor(gaussian_matrix(HAND_WINDOW), dtype=torch.float32, device=self._device)
            heat = acc[:, :21]
            smooth = (g @ heat @ g.T).cpu().numpy()
            heat = heat.cpu().numpy()
        result = []
        structure = np.ones((3, 3), dtype=bool)
        for k, crop in enumerate(crops):
            hr, wr = crop.shape[:2]
            peaks = np.zeros((21, 2), dtype=np.int64)
            for part in range(21):
                binary = smooth[k, part] > 0.05
                if not binary.any():
                    continue
                labels, count = ndimage.label(binary, structure=structure)
                sums = ndimage.sum_labels(heat[k, part], labels, index=np.arange(1, count + 1))
                best = int(np.argmax(sums)) + 1
                masked = np.where(labels == best, heat[k, part], 0.0)
                y, x = np.unravel_index(int(np.argmax(masked)), masked.shape)
                peaks[part] = (int(float(x) * float(wr) / HAND_WINDOW), int(float(y) * float(hr) / HAND_WINDOW))
            result.append(peaks)
        return result

    def _face_peaks(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        """(71, 2) crop-pixel peaks per BGR face crop (rows of -1 = below
        threshold), batched through the face network."""
        import torch

        if not crops:
            return []
        with torch.inference_mode():
            x = np.stack([_cv2_smart_resize(c, FACE_WINDOW) for c in crops])
            x = torch.from_numpy(x).to(self._device).permute(0, 3, 1, 2).float() / 256.0 - 0.5
            maps = self._face(W.to_input(x, self._device, self._dtype))[-1].float()  # (K, 71, 48, 48)
            sides = [c.shape[0] for c in crops]
            big = max(sides)
            mats = np.zeros((len(crops), big, maps.shape[-1]), dtype=np.float64)
            for k, side in enumerate(sides):
                mats[k, :side] = _align_corners_matrix(maps.shape[-1], side)
            a = torch.as_tensor(mats, dtype=torch.float32, device=self._device)[:, None]
            up = a @ maps @ a.transpose(-1, -2)  # (K, 71, big, big)
            valid = torch.zeros((len(crops), 1, big, big), dtype=torch.bool, device=self._device)
            for k, side in enumerate(sides):
                valid[k, :, :side, :side] = True
            score = torch.where(valid & (up > 0.05), up, torch.tensor(float("-inf"), device=self._device))
            flat = score.flatten(2)
            best = flat.argmax(-1)
            has = torch.isfinite(flat.max(-1).values)
            best, has = best.cpu().numpy(), has.cpu().numpy()
        out = []
        for k in range(len(crops)):
            ys, xs = np.divmod(best[k], big)
            p = np.stack([xs, ys], axis=1).astype(np.int64)
            p[~has[k]] = -1
            out.append(p)
        return out

    def add_hands_and_face(self, image_rgb: np.ndarray, people: list[dict]) -> None:
        """Hand and face keypoints for the people of one detection-size image."""
        bgr = np.ascontiguousarray(image_rgb[:, :, ::-1])
        h, w = bgr.shape[:2]
        if self._options["hands"]:
            jobs = []
            for pi, person in enumerate(people):
                for x, y, side, is_left in hand_boxes(person["body"], h, w):
                    jobs.append((pi, x, y, is_left, bgr[y : y + side, x : x + side]))
            for (pi, x, y, is_left, _), peaks in zip(jobs, self._hand_peaks([j[4] for j in jobs])):
                people[pi]["left_hand_norm" if is_left else "right_hand_norm"] = _crop_peaks(peaks, x, y, h, w)
        if self._options["face"]:
            jobs = []
            for pi, person in enumerate(people):
                box = face_box(person["body"], h, w)
                if box is not None:
                    x, y, side = box
                    jobs.append((pi, x, y, bgr[y : y + side, x : x + side]))
            for (pi, x, y, _), peaks in zip(jobs, self._face_peaks([j[3] for j in jobs])):
                people[pi]["face_channels"] = peaks
                people[pi]["face_box"] = (x, y)
                found = peaks[(peaks[:, 0] >= 0)]
                people[pi]["face_norm"] = _crop_peaks(found, x, y, h, w)

    # -- outputs ---------------------------------------------------------------

    def render(self, people: list[dict], dsize: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
        """The pose drawing at the sample's size. Without people it is one
        shared read-only black canvas per size: most images have nobody in
        them, and a fresh 0.75 MB canvas each costs an allocation and page
        faults on the annotation's critical path."""
        if not people:
            return _black_canvas(int(size[0]), int(size[1]))
        dh, dw = dsize
        canvas = np.zeros((dh, dw, 3), dtype=np.uint8)
        for person in people:
            person["body_norm"] = [
                None if k is None else (k[0] / float(dw), k[1] / float(dh)) for k in person["body"]
            ]
            draw_pose(canvas, person, dh, dw)
        if (dh, dw) != tuple(size):
            canvas = cv2.resize(canvas, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        return canvas

    def to_json(self, people: list[dict], dsize: tuple[int, int], size: tuple[int, int]) -> dict:
        """OpenPose-style JSON in sample pixels."""
        sy, sx = size[0] / dsize[0], size[1] / dsize[1]

        def flat(points, scores=None):
            out = []
            for i, p in enumerate(points):
                if p is None:
                    out += [0.0, 0.0, 0.0]
                else:
                    c = 1.0 if scores is None else float(scores[i])
                    out += [round(float(p[0]) * sx, 2), round(float(p[1]) * sy, 2), round(c, 4)]
            return out

        def norm_points(arr, n):
            pts = []
            for i in range(n):
                if arr is None or i >= len(arr) or arr[i][0] < 0 or arr[i][1] < 0:
                    pts.append(None)
                else:
                    pts.append((arr[i][0] * dsize[1], arr[i][1] * dsize[0]))
            return pts

        result = []
        for person in people:
            body = person["body"]
            entry = {
                "pose_keypoints_2d": flat(
                    [None if k is None else (k[0], k[1]) for k in body],
                    [0.0 if k is None else k[2] for k in body],
                )
            }
            if self._options["hands"]:
                entry["hand_left_keypoints_2d"] = flat(norm_points(person.get("left_hand_norm"), 21))
                entry["hand_right_keypoints_2d"] = flat(norm_points(person.get("right_hand_norm"), 21))
            if self._options["face"]:
                ch = person.get("face_channels")
                pts = [None] * 70
                if ch is not None:
                    pts = [None if ch[i, 0] < 0 else (ch[i, 0], ch[i, 1]) for i in range(70)]
                    bx, by = person["face_box"]
                    pts = [None if p is None else (p[0] + bx, p[1] + by) for p in pts]
                entry["face_keypoints_2d"] = flat(pts)
            result.append(entry)
        return {"canvas_width": int(size[1]), "canvas_height": int(size[0]), "people": result}

    def annotate_batch(self, images, keys=None):
        self.setup()
        images = [check_image(im) for im in images]
        results: list[Annotation | None] = [None] * len(images)
        for (h, w), idx in W.group_by_shape(images).items():
            dsize = self.detect_size(h, w)

            def launch(a: int, b: int, idx=idx, dsize=dsize):
                ids = idx[a:b]
                return ids, self.launch_bodies([images[i] for i in ids], dsize)

            def finish(handle, h=h, w=w, dsize=dsize) -> None:
                ids, pending = handle
                for i, people in zip(ids, self.finish_bodies(pending)):
                    results[i] = self._annotation(images[i], people, dsize, (h, w))

            chunk = W.chunk_size(self._options["chunk_size"], len(idx), self._device, GPU_CHUNK)
            W.pipelined(len(idx), chunk, launch, finish)
        return results  # type: ignore[return-value]

    def _annotation(self, image: np.ndarray, people: list[dict], dsize: tuple[int, int],
                    size: tuple[int, int]) -> Annotation:
        """Hands/face (when enabled), drawing, JSON and metadata of one image."""
        if self._options["hands"] or self._options["face"]:
            img = image if dsize == tuple(size) else _resize_like_reference(image, dsize)
            self.add_hands_and_face(img, people)
        doc = self.to_json(people, dsize, size)
        meta = {
            "people": len(people),
            "keypoints": int(sum(k is not None for p in people for k in p["body"])),
        }
        if self._options["hands"]:
            meta["hand_keypoints"] = int(
                sum(sum(v != 0.0 for v in e[key][2::3]) for e in doc["people"]
                    for key in ("hand_left_keypoints_2d", "hand_right_keypoints_2d"))
            )
        if self._options["face"]:
            meta["face_keypoints"] = int(
                sum(sum(v != 0.0 for v in e["face_keypoints_2d"][2::3]) for e in doc["people"])
            )
        canvas = self.render(people, dsize, size)
        return Annotation(members={"openpose.png": canvas, "openpose.json": doc}, meta=meta)


@functools.lru_cache(maxsize=8)
def _black_canvas(height: int, width: int) -> np.ndarray:
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    canvas.flags.writeable = False  # shared between annotations
    return canvas


def _align_corners_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) matrix of bilinear resampling with ``align_corners=True``."""
    m = np.zeros((dst, src), dtype=np.float64)
    if dst == 1 or src == 1:
        m[:, 0] = 1.0
        return m
    pos = np.arange(dst) * (src - 1) / (dst - 1)
    lo = np.minimum(np.floor(pos).astype(int), src - 2)
    frac = pos - lo
    m[np.arange(dst), lo] = 1.0 - frac
    m[np.arange(dst), lo + 1] += frac
    return m


def _resize_like_reference(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = image.shape[:2]
    interp = cv2.INTER_LANCZOS4 if size[0] > h else cv2.INTER_AREA
    return cv2.resize(image, (size[1], size[0]), interpolation=interp)
