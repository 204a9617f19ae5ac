"""Canny edges (OpenCV), with ControlNet's defaults and optional random
thresholds per sample as the ControlNet paper trained its Canny model."""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from annotators.base import Annotation, Annotator, check_image, key_rng
from annotators.registry import register_annotator


def canny_edges(image: np.ndarray, low: int, high: int) -> np.ndarray:
    """HxW uint8 edge map (0 or 255) of an RGB image, as ControlNet computes it
    (``cv2.Canny`` on the 3-channel image: per-pixel max gradient over channels)."""
    return cv2.Canny(image, int(low), int(high))


def draw_thresholds(
    key: str, seed: int, low_range: Sequence[int], high_range: Sequence[int]
) -> tuple[int, int]:
    """Random (low, high) thresholds for one sample, seeded from its key.

    ``low`` is uniform in ``low_range`` and ``high`` uniform in ``high_range``
    but never below ``low``, both inclusive.
    """
    rng = key_rng(key, seed, "canny")
    low = int(rng.integers(low_range[0], low_range[1] + 1))
    high = int(rng.integers(max(low, high_range[0]), max(low, high_range[1]) + 1))
    return low, high


@register_annotator
class Canny(Annotator):
    """``canny.png``: Canny edges, white on black.

    Options:
        low_threshold, high_threshold: fixed thresholds (ControlNet: 100, 200).
        random_thresholds: draw thresholds per sample from ``low_range`` /
            ``high_range``, seeded from the sample key and ``seed``.
    """

    name = "canny"
    version = "1"
    members = ("canny.png",)

    def __init__(
        self,
        low_threshold: int = 100,
        high_threshold: int = 200,
        random_thresholds: bool = False,
        low_range: tuple[int, int] = (50, 150),
        high_range: tuple[int, int] = (150, 250),
        seed: int = 0,
    ) -> None:
        if not 0 <= low_threshold <= high_threshold:
            raise ValueError(
                f"canny needs 0 <= low_threshold <= high_threshold, got {low_threshold}, {high_threshold}"
            )
        for label, rng in (("low_range", low_range), ("high_range", high_range)):
            if len(rng) != 2 or rng[0] > rng[1] or rng[0] < 0:
                raise ValueError(f"canny {label} must be (min, max) with 0 <= min <= max, got {rng}")
        super().__init__(
            low_threshold=int(low_threshold),
            high_threshold=int(high_threshold),
            random_thresholds=bool(random_thresholds),
            low_range=tuple(int(v) for v in low_range),
            high_range=tuple(int(v) for v in high_range),
            seed=int(seed),
        )

    def thresholds_for(self, key: str) -> tuple[int, int]:
        o = self._options
        if o["random_thresholds"]:
            return draw_thresholds(key, o["seed"], o["low_range"], o["high_range"])
        return o["low_threshold"], o["high_threshold"]

    def annotate_batch(self, images, keys=None):
        keys = list(keys) if keys is not None else [""] * len(images)
        out = []
        for image, key in zip(images, keys):
            low, high = self.thresholds_for(key)
            edges = canny_edges(check_image(image), low, high)
            out.append(
                Annotation(
                    members={"canny.png": edges},
                    meta={"low_threshold": low, "high_threshold": high},
                )
            )
        return out
