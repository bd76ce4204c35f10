"""Box geometry in pixel xyxy, shared by every stage that handles boxes (detection, track filtering, views)."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def box_area(box: Sequence[float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def clip_box(box: Sequence[float], width: int, height: int) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height)]


def crop_box(image: np.ndarray, box: Sequence[float], padding: float = 0.0) -> np.ndarray | None:
    """The pixels under ``box`` (grown by ``padding`` x its size per side), or None if nothing is left.

    Pixel edges: columns floor(x1) .. ceil(x2) - 1, so a box [10.0, 5.0, 20.0, 9.0] is 10 x 4 pixels.
    """
    h, w = image.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in box)
    px, py = (x2 - x1) * padding, (y2 - y1) * padding
    c1, r1 = max(0, math.floor(x1 - px)), max(0, math.floor(y1 - py))
    c2, r2 = min(w, math.ceil(x2 + px)), min(h, math.ceil(y2 + py))
    if c2 <= c1 or r2 <= r1:
        return None
    return np.ascontiguousarray(image[r1:r2, c1:c2])


def rounded_box(box: Sequence[float]) -> tuple[int, int, int, int]:
    return tuple(int(round(v)) for v in box)  # type: ignore[return-value]
