"""OpenPose body (and optionally hand and face) keypoints: ``openpose.png``
(the coloured stick figure ControlNet was trained on) and ``openpose.json``
(the people in OpenPose's COCO-18 layout, in sample pixels).

The networks are controlnet-aux's (``bodypose_model``, ``handpose_model``,
``FaceNet``). The whole batch goes through the body network at once, and
everything up to the choice between candidate limbs stays on the device:
every resize in the reference (OpenCV INTER_AREA / LANCZOS4, cropping the
stride padding, scipy's Gaussian) is linear and separable, so each axis
collapses into one precomputed matrix; the peak search runs on the blurred
heatmaps at image resolution, and part-affinity fields are evaluated only
where limb scoring needs them (ten points per candidate limb, every
candidate of the batch at once, in float64). The outputs have fixed sizes,
so nothing waits for the device; batches run as a pipeline of chunks, and
only the small per-chunk results come back to the host, where the greedy
matching and person assembly (a few dozen steps per image) run in plain
Python and drawing runs on a thread pool.

Faithful to controlnet-aux's ``OpenposeDetector`` (detect and image
resolution = the sample size, body at scale 0.5 of boxsize 368, stride 8):
same network input, same peak rule (4-neighbour maximum of the sigma-3
blurred heatmap above 0.1), same limb scoring (10 samples, 0.05, 80%,
distance prior), same greedy matching and person assembly, same drawing.
"""

from __future__ import annotations

import colorsys
import math
import os
from typing import Any

import cv2
import numpy as np

from annotators.base import Annotation, Annotator, check_image
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
#: Initial room per image for peaks and candidate limbs in the device
#: outputs (see ``OpenPose.finish_bodies``): real photos have a few peaks per
#: part; noisy maps (random weights) can have ~100.
PEAK_ROOM = 128
PAIR_ROOM = 256
#: Most threads drawing and writing JSON at once.
DRAW_THREADS = 8

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
#: Limb fill colours: the body colours at 60%, as the reference computes them.
LIMB_FILLS = tuple([int(float(c) * 0.6) for c in color] for color in BODY_COLORS)
HAND_EDGES = (
    (0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10),
    (10, 11), (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20),
)  # fmt: skip
HAND_SCALES = (0.5, 1.0, 1.5, 2.0)
HAND_WINDOW = 128
FACE_WINDOW = 384
DRAW_EPS = 0.01


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
        self._dev: dict[Any, dict[str, Any]] = {}

    def on(self, device) -> dict[str, Any]:
        """The matrices on ``device`` (cached): float32 for the peak search,
        float64 (``*_64``) for peak scores and limb scoring, as the reference
        scores limbs in float64."""
        import torch

        key = str(device)
        if key not in self._dev:
            mats = {}
            for name in ("pre_y", "pre_x", "map_y", "map_x", "blur_y", "blur_x"):
                mats[name] = torch.as_tensor(getattr(self, name), dtype=torch.float32, device=device)
            for name in ("map_y", "map_x"):
                mats[name + "_64"] = torch.as_tensor(getattr(self, name), dtype=torch.float64, device=device)
            self._dev[key] = mats
        return self._dev[key]


# --------------------------------------------------------------------------
# Device side: input preparation, peak search and limb scoring, for a whole
# batch at once and without waiting for the device (fixed-size outputs).


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


#: Float32 elements of the blurred full-resolution heatmaps handled at once in
#: the peak search (two 512 px images): small enough (40 MB) that the
#: comparisons that follow the blur mostly read it from the GPU's L2 cache
#: rather than from device memory, large enough to keep launches few.
PEAK_BLOCK_ELEMENTS = 10 << 20


def peak_mask(heat: Any, geo: BodyGeometry) -> Any:
    """(N, 18, H, W) bool: the reference's peaks of a batch's part heatmaps.

    A peak is a pixel of the sigma-3 blurred, image-resolution heatmap above
    0.1 and not below any of its four neighbours (outside the image counts as
    0, which a value above 0.1 always beats, so border pixels need no
    padding). ``heat``: (N, >=18, oh, ow) network heatmaps.
    """
    import torch

    m = geo.on(heat.device)
    n = heat.shape[0]
    # blur and upsampling are separable: along x at network height first
    # (small), then along y one block of images at a time
    z = heat[:, :18].float() @ m["blur_x"].T  # (N, 18, oh, W)
    mask = torch.empty((n, 18, geo.height, geo.width), dtype=torch.bool, device=heat.device)
    step = max(1, PEAK_BLOCK_ELEMENTS // (18 * geo.height * geo.width))
    for s in range(0, n, step):
        b = m["blur_y"] @ z[s : s + step]
        out = mask[s : s + step]
        torch.gt(b, PEAK_THRESHOLD, out=out)
        above, below = b[..., :-1, :], b[..., 1:, :]
        left, right = b[..., :-1], b[..., 1:]
        # in place on views (``out[...] &= x`` would also copy the view back)
        view = out[..., 1:, :]
        view &= below >= above
        view = out[..., :-1, :]
        view &= above >= below
        view = out[..., 1:]
        view &= right >= left
        view = out[..., :-1]
        view &= left >= right
    return mask


_LIMB_TABLES: dict[str, tuple[Any, Any, Any]] = {}


def _limb_tables(device) -> tuple[Any, Any, Any]:
    """Part A, part B (0-based) and PAF channels (x, y) of each limb, as
    tensors on ``device``; cached, as a copy from the host would wait for the
    work queued on the device."""
    import torch

    key = str(device)
    if key not in _LIMB_TABLES:
        limbs = torch.tensor(LIMBS, dtype=torch.int64) - 1
        chans = torch.tensor(PAF_CHANNELS, dtype=torch.int64) - 19
        _LIMB_TABLES[key] = (limbs[:, 0].to(device), limbs[:, 1].to(device), chans.to(device))
    return _LIMB_TABLES[key]


def body_candidates(heat: Any, paf: Any, geo: BodyGeometry, peak_capacity: int, pair_capacity: int) -> dict[str, Any]:
    """Peaks and scored candidate limbs of a batch, computed on its device
    with fixed-size outputs, so nothing waits for the device.

    Every pair (peak of part A, peak of part B) of the same image is a
    candidate for limb A-B, as in the reference; each is scored by sampling
    the limb's part-affinity field at 10 points between its ends (the field
    resampled to image pixels by the separable matrices, only at those
    points) in float64, with the reference's 0.05 / 80% / distance-prior
    rule.

    Returns device tensors:

    * ``peaks`` (peak_capacity + 1, 4) int64: image, part, y, x of each peak in
      the reference's order (image, part, row-major); rows past the last peak
      are -1, so a valid last row means more peaks than ``peak_capacity``;
    * ``score`` (peak_capacity + 1,) float64: un-blurred heatmap value there;
    * ``npeaks``, ``npairs``: () int64, the numbers of peaks and candidate
      pairs (when larger than the capacities, call again with larger ones);
    * ``pair_a``, ``pair_b`` (pair_capacity,) int64: rows of the pair's ends
      in ``peaks``; ``group`` (pair_capacity,) int64: image * 19 + limb;
      candidates of one group are in the reference's order (A-major);
    * ``prior`` (pair_capacity,) float64: the score with distance prior;
      ``ok`` (pair_capacity,) bool: a real pair that passes both criteria.
    """
    import torch

    dev = heat.device
    m = geo.on(dev)
    n = heat.shape[0]
    mask = peak_mask(heat, geo)
    npeaks = mask.sum()
    peaks = torch.nonzero_static(mask, size=peak_capacity + 1, fill_value=-1)
    valid = peaks[:, 0] >= 0
    pk = peaks.clamp(min=0)
    # score: map_y[y] . heat . map_x[x], via heat resampled along x only
    rows = m["map_x_64"] @ heat[:, :18].double().mT  # (N, 18, W, oh)
    score = (rows[pk[:, 0], pk[:, 1], pk[:, 3]] * m["map_y_64"][pk[:, 2]]).sum(-1)

    # peaks per (image, part) and where each run starts in ``peaks``
    key = pk[:, 0] * 18 + pk[:, 1]
    cnt = torch.zeros(n * 18, dtype=torch.int64, device=dev).index_add_(0, key, valid.long())
    start = (torch.cumsum(cnt, 0) - cnt).view(n, 18)
    cnt = cnt.view(n, 18)
    part_a, part_b, chans = _limb_tables(dev)
    na, nb = cnt[:, part_a], cnt[:, part_b]  # (N, 19)
    per_group = (na * nb).flatten()
    group_end = torch.cumsum(per_group, 0)
    npairs = group_end[-1]

    # candidate q -> (group, i, j) without a host round trip
    q = torch.arange(pair_capacity, device=dev)
    group = torch.searchsorted(group_end, q, right=True).clamp(max=n * 19 - 1)
    r = q - (group_end - per_group)[group]
    nbg = nb.flatten()[group].clamp(min=1)
    i = torch.div(r, nbg, rounding_mode="floor")
    img, limb = group // 19, group % 19
    top = peak_capacity  # the sentinel row: clamps any index of an unused slot
    pair_a = (start[img, part_a[limb]] + i).clamp(0, top)
    pair_b = (start[img, part_b[limb]] + (r - i * nbg)).clamp(0, top)
    real = q < npairs

    # PAF (x, y) resampled along x only, at network height: (N, 38, W, oh)
    fields = m["map_x_64"] @ paf.double().mT
    prior, passed = [], []
    for lo in range(0, pair_capacity, PAIR_BLOCK):  # bounded memory for huge counts
        cut = slice(lo, lo + PAIR_BLOCK)
        p, ok = _score_pairs(pk[pair_a[cut]], pk[pair_b[cut]], img[cut], chans[limb[cut]], fields, m, geo.height)
        prior.append(p)
        passed.append(ok)
    if len(prior) == 1:
        prior, ok = prior[0], passed[0] & real
    else:
        prior = torch.cat(prior) if prior else torch.zeros(0, dtype=torch.float64, device=dev)
        ok = (torch.cat(passed) & real) if passed else real
    return {
        "peaks": peaks, "score": score, "npeaks": npeaks, "npairs": npairs,
        "pair_a": pair_a, "pair_b": pair_b, "group": group, "prior": prior, "ok": ok,
    }  # fmt: skip


#: Candidate limbs scored at once (bounds the memory of pathological counts).
PAIR_BLOCK = 1 << 15


def _score_pairs(pa: Any, pb: Any, img: Any, ch: Any, fields: Any, m: dict, height: int) -> tuple[Any, Any]:
    """Score with distance prior and the 0.05 / 80% criterion of candidate
    limbs from peak rows ``pa`` to ``pb`` (image, part, y, x), in float64."""
    import torch

    ax, ay = pa[:, 3].double(), pa[:, 2].double()
    bx, by = pb[:, 3].double(), pb[:, 2].double()
    vx, vy = bx - ax, by - ay
    norm = torch.sqrt(vx * vx + vy * vy).clamp(min=0.001)
    # the 10 sample points, with np.linspace's arithmetic, rounded
    # half-to-even like round()
    k = torch.arange(MID_SAMPLES, dtype=torch.float64, device=pa.device)
    last = MID_SAMPLES - 1
    sx = k * (vx / last)[:, None] + ax[:, None]
    sy = k * (vy / last)[:, None] + ay[:, None]
    sx[:, last], sy[:, last] = bx, by
    sx, sy = torch.round(sx).long(), torch.round(sy).long()
    # PAF at image pixel (y, x) = map_y[y] . fields[.., x]: only at the samples
    vals = fields[img[:, None, None], ch[:, None, :], sx[:, :, None]]  # (Q, 10, 2, oh)
    f = (vals * m["map_y_64"][sy][:, :, None, :]).sum(-1)
    mid = f[..., 0] * (vx / norm)[:, None] + f[..., 1] * (vy / norm)[:, None]
    # (the reference sums left to right; another order changes the float64
    # sum in its last bits, far below anything a decision depends on)
    prior = mid.sum(-1) / MID_SAMPLES + torch.clamp(0.5 * height / norm - 1, max=0)
    passed = ((mid > PAF_THRESHOLD).sum(-1) > 0.8 * MID_SAMPLES) & (prior > 0)
    return prior, passed


# --------------------------------------------------------------------------
# Host side: greedy limb matching and person assembly, in plain Python on
# the few candidates that passed (numpy per row costs more than it saves).


def assemble(found: dict[str, np.ndarray], n_images: int) -> list[list[dict[str, Any]]]:
    """People per image from :func:`body_candidates`' outputs on the host
    (which must fit their capacities). Same greedy one-to-one matching per
    limb (by descending score, ties in candidate order) and the same person
    assembly, merging and filtering as the reference."""
    npeaks = int(found["npeaks"])
    peaks = found["peaks"][:npeaks]
    scores = found["score"][:npeaks].tolist()
    img = peaks[:, 0]
    first = np.searchsorted(img, np.arange(n_images + 1)).tolist()
    cnt = np.bincount(img * 18 + peaks[:, 1], minlength=n_images * 18).reshape(n_images, 18).tolist()
    xs, ys = peaks[:, 3].tolist(), peaks[:, 2].tolist()

    # connections[n][limb]: None where a part has no peak (the reference
    # skips those limbs), else (idA, idB, score) rows in image-local ids
    connections = [
        [[] if c[a - 1] and c[b - 1] else None for a, b in LIMBS] for c in cnt
    ]
    npairs = int(found["npairs"])
    sel = np.flatnonzero(found["ok"][:npairs])
    if len(sel):
        group = found["group"][sel]
        prior = found["prior"][sel]
        order = np.lexsort((-prior, group))  # stable: ties keep candidate order
        current = -1
        used_a: set[int] = set()
        used_b: set[int] = set()
        rows: list = []
        limit = 0
        for g, a, b, s in zip(
            group[order].tolist(), found["pair_a"][sel][order].tolist(),
            found["pair_b"][sel][order].tolist(), prior[order].tolist(),
        ):  # fmt: skip
            if g != current:
                current = g
                used_a, used_b = set(), set()
                n, limb = divmod(g, 19)
                rows = connections[n][limb]
                base = first[n]
                la, lb = LIMBS[limb]
                limit = min(cnt[n][la - 1], cnt[n][lb - 1])
            if len(rows) >= limit or a in used_a or b in used_b:
                continue
            used_a.add(a)
            used_b.add(b)
            rows.append((a - base, b - base, s))

    people = []
    for n in range(n_images):
        if first[n] == first[n + 1]:
            people.append([])
            continue
        lo = first[n]
        subset = _subsets(connections[n], scores[lo : first[n + 1]])
        found_people = []
        for row in subset:
            body = [None if c < 0 else (float(xs[lo + c]), float(ys[lo + c]), scores[lo + c]) for c in row[:18]]
            found_people.append({"body": body, "score": float(row[18]), "parts": int(row[19])})
        people.append(found_people)
    return people


def _subsets(connections: list, scores: list[float]) -> list[list]:
    """The reference's person assembly for one image: rows of 18 candidate
    ids (-1 = missing), total score, part count; weak or small people dropped."""
    subset: list[list] = []
    for k, conn in enumerate(connections):
        if not conn:
            continue
        ia, ib = LIMBS[k][0] - 1, LIMBS[k][1] - 1
        for pa, pb, s in conn:
            hits = [j for j, row in enumerate(subset) if row[ia] == pa or row[ib] == pb][:2]
            if len(hits) == 1:
                row = subset[hits[0]]
                if row[ib] != pb:
                    row[ib] = pb
                    row[19] += 1
                    row[18] += scores[pb] + s
            elif len(hits) == 2:
                r1, r2 = subset[hits[0]], subset[hits[1]]
                if not any(u >= 0 and v >= 0 for u, v in zip(r1[:18], r2[:18])):  # disjoint: merge
                    for t in range(18):
                        r1[t] += r2[t] + 1
                    r1[18] += r2[18]
                    r1[19] += r2[19]
                    r1[18] += s
                    del subset[hits[1]]
                else:
                    r1[ib] = pb
                    r1[19] += 1
                    r1[18] += scores[pb] + s
            elif k < 17:
                row = [-1] * 18 + [0.0, 2]
                row[ia], row[ib] = pa, pb
                row[18] = scores[pa] + scores[pb] + s
                subset.append(row)
    return [row for row in subset if not (row[19] < 4 or row[18] / row[19] < 0.4)]


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
        w, h = float(width), float(height)
        for (a, b), fill in zip(LIMBS[:17], LIMB_FILLS):
            k1, k2 = body[a - 1], body[b - 1]
            if k1 is None or k2 is None:
                continue
            # the reference's float64 arithmetic, on Python floats (its numpy
            # two-element arrays cost more than the drawing)
            y1, y2 = k1[0] * w, k2[0] * w
            x1, x2 = k1[1] * h, k2[1] * h
            length = ((x1 - x2) ** 2 + (y1 - y2) ** 2) ** 0.5
            angle = math.degrees(math.atan2(x1 - x2, y1 - y2))
            poly = cv2.ellipse2Poly((int((y1 + y2) / 2), int((x1 + x2) / 2)), (int(length / 2), 4), int(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, poly, fill)
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
            None = a quarter of the batch on a GPU (at least 8), so the host
            assembles and draws one chunk while the device computes the next.
    """

    name = "openpose"
    version = "1"
    members = ("openpose.png", "openpose.json")
    uses_gpu = True
    default_batch_size = 32

    def __init__(
        self,
        weights: str | None = None,
        device: str | None = None,
        precision: str | None = None,
        hands: bool = False,
        face: bool = False,
        detect_resolution: int | None = None,
        chunk_size: int | None = None,
    ) -> None:
        common = W.network_options("openpose", weights, device, precision, detect_resolution)
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError("openpose chunk_size must be >= 1")
        super().__init__(
            **common, hands=bool(hands), face=bool(face),
            chunk_size=None if chunk_size is None else int(chunk_size),
        )  # fmt: skip
        self._body = None
        self._geometry: dict[tuple[int, int], BodyGeometry] = {}
        # Per-image room for peaks and candidate limbs in the fixed-size
        # device outputs; grown (and the chunk recomputed) when a chunk needs
        # more, so outputs never depend on them. ``overflows`` counts those
        # recomputations.
        self._peak_room = PEAK_ROOM
        self._pair_room = PAIR_ROOM
        self.overflows = 0
        self._pool = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_pool"] = None  # threads do not travel; a copy starts its own
        return state

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

    def setup(self) -> None:
        if self._body is not None:
            return
        from controlnet_aux.open_pose.model import bodypose_model, handpose_model

        from annotators._torch import resolve_device, resolve_precision

        paths = W.locate(self.required_files(), self._options["weights"])
        self._device = resolve_device(self._options["device"])
        self._dtype = resolve_precision(self._options["precision"], self._device)

        def build(net, filename, prefixed):
            W.verify(paths[filename], filename)
            state = W.load_state_dict(paths[filename])
            if prefixed:
                # The body/hand files name parameters without the block prefix
                # ("conv1_1.weight" for "model0.conv1_1.weight").
                state = {k: state[k.split(".", 1)[1]] for k in net.state_dict()}
            net.load_state_dict(state)
            return W.prepare_model(net, self._device, self._dtype)

        self._hand = build(handpose_model(), HAND_FILE, True) if self._options["hands"] else None
        if self._options["face"]:
            from controlnet_aux.open_pose.face import FaceNet

            self._face = build(FaceNet(), FACE_FILE, False)
        else:
            self._face = None
        self._body = build(bodypose_model(), BODY_FILE, True)

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
        """(PAFs, heatmaps) of the body network for a prepared input batch."""
        import torch

        with torch.inference_mode():
            paf, heat = self._body(W.to_input(x, self._device, self._dtype))
            return paf, heat

    def launch_bodies(self, batch_u8: Any, geo: BodyGeometry, dsize: tuple[int, int]) -> tuple:
        """Queue the body pass of an (N, 3, H, W) uint8 RGB batch: network,
        peak search and limb scoring on the device, and the copy of the
        (small) results to the host. Nothing here waits for the device."""
        import torch

        n = batch_u8.shape[0]
        with torch.inference_mode():
            x = W.resize_batch(batch_u8.float(), dsize)
            paf, heat = self.forward(body_input(x, geo))
            caps = (self._peak_room * n, self._pair_room * n)
            found = body_candidates(heat, paf, geo, *caps)
        # the network maps stay on the device (small) in case the chunk must
        # be scored again with more room
        return W.HostCopy(found, self._device), (heat, paf), caps

    def finish_bodies(self, pending: tuple, geo: BodyGeometry) -> list[list[dict]]:
        """People per image (detection pixels) of a launched body pass."""
        import torch

        copy, (heat, paf), (peak_cap, pair_cap) = pending
        found = copy.arrays()
        n = heat.shape[0]
        npeaks, npairs = int(found["npeaks"]), int(found["npairs"])
        if npeaks > peak_cap or npairs > pair_cap:
            # rare (e.g. noisy maps with hundreds of peaks): redo this chunk
            # with exact room (twice at most: candidate limbs are counted
            # right only once all peaks fit), and keep more room for the
            # following chunks
            self.overflows += 1
            while npeaks > peak_cap or npairs > pair_cap:
                peak_cap, pair_cap = max(npeaks, peak_cap), max(npairs, pair_cap)
                with torch.inference_mode():
                    out = body_candidates(heat, paf, geo, peak_cap, pair_cap)
                    found = {k: v.cpu().numpy() for k, v in out.items()}
                npeaks, npairs = int(found["npeaks"]), int(found["npairs"])
            self._peak_room = max(self._peak_room, 2 * -(-npeaks // n))
            self._pair_room = max(self._pair_room, 2 * -(-npairs // n))
        return assemble(found, n)

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

        def flat(points):  # hand and face points: confidence 1
            out = []
            for p in points:
                if p is None:
                    out += [0.0, 0.0, 0.0]
                else:
                    out += [round(float(p[0]) * sx, 2), round(float(p[1]) * sy, 2), 1.0]
            return out

        def norm_points(arr, n):
            pts = []
            for i in range(n):
                if arr is None or i >= len(arr) or arr[i][0] < 0 or arr[i][1] < 0:
                    pts.append(None)
                else:
                    pts.append((arr[i][0] * dsize[1], arr[i][1] * dsize[0]))
            return pts

        # body keypoints are whole detection pixels: at the sample's own size
        # rounding them changes nothing (and costs most of this function)
        whole = sx == 1.0 and sy == 1.0

        def flat_body(body):
            out = []
            for k in body:
                if k is None:
                    out += [0.0, 0.0, 0.0]
                elif whole and float(k[0]).is_integer() and float(k[1]).is_integer():
                    out += [float(k[0]), float(k[1]), round(float(k[2]), 4)]
                else:
                    out += [round(float(k[0]) * sx, 2), round(float(k[1]) * sy, 2), round(float(k[2]), 4)]
            return out

        result = []
        for person in people:
            entry = {"pose_keypoints_2d": flat_body(person["body"])}
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
        # JSON and drawing (OpenCV, which releases the GIL) run on a thread
        # pool while the main thread queues the next chunks on the device
        pool = self._drawing_pool()
        pending: list[tuple[int, Any]] = []
        for (h, w), idx in W.group_by_shape(images).items():
            dsize = self.detect_size(h, w)
            geo = self.geometry(*dsize)

            def launch(a: int, b: int, idx=idx, geo=geo, dsize=dsize):
                ids = idx[a:b]
                batch = W.images_to_device([images[i] for i in ids], self._device)
                return ids, self.launch_bodies(batch, geo, dsize)

            def finish(handle, geo=geo, dsize=dsize, size=(h, w)) -> None:
                ids, bodies = handle
                for i, people in zip(ids, self.finish_bodies(bodies, geo)):
                    if self._options["hands"] or self._options["face"]:
                        # networks again: on this thread, batched per image
                        image = images[i] if dsize == size else _resize_like_reference(images[i], dsize)
                        self.add_hands_and_face(image, people)
                    if pool is None:
                        results[i] = self._annotation(people, dsize, size)
                    else:
                        pending.append((i, pool.submit(self._annotation, people, dsize, size)))

            chunk = W.chunk_size(self._options["chunk_size"], len(idx), self._device)
            W.pipelined(len(idx), chunk, launch, finish)
        for i, future in pending:
            results[i] = future.result()
        return results  # type: ignore[return-value]

    def _drawing_pool(self):
        """Threads for JSON and drawing (None with a single CPU)."""
        if self._pool is None:
            try:
                cpus = len(os.sched_getaffinity(0))
            except AttributeError:  # pragma: no cover - not on Linux
                cpus = os.cpu_count() or 1
            if cpus > 1:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(min(DRAW_THREADS, cpus), thread_name_prefix="openpose-draw")
            else:
                self._pool = False
        return self._pool or None

    def _annotation(self, people: list[dict], dsize: tuple[int, int], size: tuple[int, int]) -> Annotation:
        """Members and metadata of one image from its people."""
        doc = self.to_json(people, dsize, size)
        meta = {
            "people": len(people),
            "keypoints": int(sum(k is not None for p in people for k in p["body"])),
        }
        if self._options["hands"]:
            meta["hand_keypoints"] = int(
                sum(sum(v != 0.0 for v in e[key][2::3]) for e in doc["people"]
                    for key in ("hand_left_keypoints_2d", "hand_right_keypoints_2d"))
            )  # fmt: skip
        if self._options["face"]:
            meta["face_keypoints"] = int(
                sum(sum(v != 0.0 for v in e["face_keypoints_2d"][2::3]) for e in doc["people"])
            )
        canvas = self.render(people, dsize, size)
        return Annotation(members={"openpose.png": canvas, "openpose.json": doc}, meta=meta)


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
