"""Classic probabilistic Hough lines (OpenCV): a weight-free straight-line
condition beside M-LSD, drawn white on black like ControlNet's line maps."""

from __future__ import annotations

import cv2
import numpy as np

from annotators.base import Annotation, Annotator, check_image
from annotators.registry import register_annotator


def detect_lines(
    image: np.ndarray,
    canny_low: int,
    canny_high: int,
    threshold: int,
    min_line_length: float,
    max_line_gap: float,
) -> np.ndarray:
    """Line segments (N, 4) as x1, y1, x2, y2 in pixels.

    ``min_line_length`` and ``max_line_gap`` are fractions of the image's
    shorter side, so the same options mean the same thing at any resolution.
    OpenCV's HoughLinesP seeds its sampler with a fixed value, so the result
    is deterministic.
    """
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, int(canny_low), int(canny_high))
    side = min(image.shape[:2])
    lines = cv2.HoughLinesP(
        edges,
        rho=1.0,
        theta=np.pi / 180.0,
        threshold=int(threshold),
        minLineLength=max(1.0, min_line_length * side),
        maxLineGap=max(0.0, max_line_gap * side),
    )
    if lines is None:
        return np.zeros((0, 4), dtype=np.int32)
    return lines.reshape(-1, 4).astype(np.int32)


def draw_lines(shape: tuple[int, int], lines: np.ndarray, thickness: int) -> np.ndarray:
    """HxW uint8 map with the segments drawn in white (255) on black."""
    canvas = np.zeros(shape, dtype=np.uint8)
    if len(lines):
        # one call for all segments (each a 2-point open polyline: the same
        # pixels as one cv2.line per segment, without a Python loop holding
        # the GIL for every line)
        segments = np.ascontiguousarray(lines, dtype=np.int32).reshape(-1, 2, 2)
        cv2.polylines(canvas, list(segments), False, 255, int(thickness), lineType=cv2.LINE_8)
    return canvas


@register_annotator
class Hough(Annotator):
    """``hough.png``: straight segments from OpenCV's probabilistic Hough
    transform on Canny edges. The segment count goes into the metadata
    (``lines``) so later filters can gate on it."""

    name = "hough"
    version = "1"
    members = ("hough.png",)

    def __init__(
        self,
        canny_low: int = 100,
        canny_high: int = 200,
        threshold: int = 80,
        min_line_length: float = 0.06,
        max_line_gap: float = 0.01,
        thickness: int = 1,
    ) -> None:
        if threshold < 1 or thickness < 1:
            raise ValueError("hough threshold and thickness must be >= 1")
        if not 0 <= canny_low <= canny_high:
            raise ValueError("hough needs 0 <= canny_low <= canny_high")
        super().__init__(
            canny_low=int(canny_low),
            canny_high=int(canny_high),
            threshold=int(threshold),
            min_line_length=float(min_line_length),
            max_line_gap=float(max_line_gap),
            thickness=int(thickness),
        )

    def annotate_batch(self, images, keys=None):
        o = self._options
        out = []
        for image in images:
            image = check_image(image)
            lines = detect_lines(
                image,
                o["canny_low"],
                o["canny_high"],
                o["threshold"],
                o["min_line_length"],
                o["max_line_gap"],
            )
            out.append(
                Annotation(
                    members={"hough.png": draw_lines(image.shape[:2], lines, o["thickness"])},
                    meta={"lines": int(len(lines))},
                )
            )
        return out
