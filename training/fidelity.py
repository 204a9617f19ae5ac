"""Condition fidelity: does a generated image follow its condition?

The annotator that made the condition is run again on the generated image
and its output is compared with the condition:

* edge and line maps (canny, hough, hed, scribble, mlsd): F1 of edge pixels
  matched within a distance tolerance (as in boundary benchmarks), and the
  symmetric Chamfer distance in pixels;
* label and mask maps (seg, or any binary mask): intersection over union.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: Conditions compared as edge maps; other single-channel conditions as masks.
EDGE_CONDITIONS = ("canny", "hough", "hed", "scribble", "mlsd")


def _binary(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 3:
        a = a.max(axis=2)
    return a > (127 if a.dtype == np.uint8 else 0.5)


def _distance_to(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel to the nearest True pixel of ``mask``
    (infinite everywhere when the mask is empty)."""
    if not mask.any():
        return np.full(mask.shape, np.inf, dtype=np.float32)
    # distanceTransform measures the distance to the nearest zero pixel.
    return cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


@dataclass
class EdgeScores:
    precision: float
    recall: float
    f1: float
    chamfer: float


def edge_scores(pred: np.ndarray, target: np.ndarray, tolerance: float = 2.0) -> EdgeScores:
    """Edge agreement of two HxW (or HxWx3) maps, edges = values > 127 (uint8)
    or > 0.5 (float).

    Precision: fraction of predicted edge pixels within ``tolerance`` pixels
    of a target edge pixel; recall: the same the other way; F1 their harmonic
    mean. Two empty maps agree perfectly (F1 1); one empty map scores 0.
    Chamfer: mean of the two directed mean nearest-edge distances, capped at
    the image diagonal (which is also its value when exactly one map is empty).
    """
    p, t = _binary(pred), _binary(target)
    if p.shape != t.shape:
        raise ValueError(f"edge maps differ in size: {p.shape} vs {t.shape}")
    diag = float(np.hypot(*p.shape))
    if not p.any() and not t.any():
        return EdgeScores(1.0, 1.0, 1.0, 0.0)
    if not p.any() or not t.any():
        return EdgeScores(0.0, 0.0, 0.0, diag)
    d_to_t, d_to_p = _distance_to(t), _distance_to(p)
    precision = float((d_to_t[p] <= tolerance).mean())
    recall = float((d_to_p[t] <= tolerance).mean())
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    chamfer = 0.5 * (float(np.minimum(d_to_t[p], diag).mean()) + float(np.minimum(d_to_p[t], diag).mean()))
    return EdgeScores(precision, recall, f1, chamfer)


def mask_iou(pred: np.ndarray, target: np.ndarray) -> float:
    """Intersection over union of two label or mask maps.

    Binary masks (uint8 0/255 or bool): IoU of the True pixels. Label maps
    (RGB colour-coded segmentation, or integer labels): mean IoU over the
    labels present in either map. Two empty binary masks give 1.
    """
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"maps differ in size: {pred.shape} vs {target.shape}")
    values = np.unique(np.concatenate([pred.reshape(-1, *pred.shape[2:]), target.reshape(-1, *target.shape[2:])]), axis=0)
    if pred.dtype == bool or len(values) <= 2:
        p, t = _binary(pred), _binary(target)
        union = np.logical_or(p, t).sum()
        return 1.0 if union == 0 else float(np.logical_and(p, t).sum() / union)
    ious = []
    for v in values:
        p = np.all(pred == v, axis=-1) if pred.ndim == 3 else pred == v
        t = np.all(target == v, axis=-1) if target.ndim == 3 else target == v
        ious.append(np.logical_and(p, t).sum() / np.logical_or(p, t).sum())
    return float(np.mean(ious))


class FidelityMeter:
    """Runs a condition's annotator on generated images and scores them
    against the conditions they were generated from.

    ``score(images, conditions)`` takes RGB uint8 HxWx3 images and the
    conditions as stored (uint8 HxW or HxWx3) and returns mean scores:
    ``f1``, ``precision``, ``recall``, ``chamfer`` for edge conditions,
    ``iou`` otherwise; ``fidelity`` is the headline number (F1 or IoU).
    """

    def __init__(self, condition: str, annotator_options: dict | None = None, tolerance: float = 2.0) -> None:
        from annotators import create_annotator

        self.condition = condition
        self.member = f"{condition}.png"
        self.annotator = create_annotator(condition, **(annotator_options or {}))
        self.annotator.setup()
        self.tolerance = tolerance
        self.kind = "edges" if condition in EDGE_CONDITIONS else "mask"

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        out = self.annotator.annotate_batch([np.ascontiguousarray(i) for i in images], [""] * len(images))
        return [np.asarray(a.members[self.member]) for a in out]

    def score(self, images: list[np.ndarray], conditions: list[np.ndarray]) -> dict[str, float]:
        maps = self.annotate(images)
        if self.kind == "edges":
            s = [edge_scores(m, c, self.tolerance) for m, c in zip(maps, conditions)]
            res = {k: float(np.mean([getattr(x, k) for x in s])) for k in ("precision", "recall", "f1", "chamfer")}
            res["fidelity"] = res["f1"]
            return res
        iou = float(np.mean([mask_iou(m, c) for m, c in zip(maps, conditions)]))
        return {"iou": iou, "fidelity": iou}
