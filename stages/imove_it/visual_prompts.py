"""Visual prompts for VLM stages: boxes drawn on frames, crops, the box of a track at a given time."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def draw_box(image: np.ndarray, box_xyxy_px: Sequence[float] | None, color=(255, 0, 0), width: int | None = None) -> np.ndarray:
    """A copy of ``image`` with the box outlined (scaled line width, at least 2 px)."""
    if box_xyxy_px is None:
        return image
    im = Image.fromarray(image)
    w = width or max(2, round(min(im.size) / 160))
    ImageDraw.Draw(im).rectangle([float(v) for v in box_xyxy_px], outline=color, width=w)
    return np.asarray(im)


def crop(image: np.ndarray, box_xyxy_px: Sequence[float], margin: float = 0.1, min_side: int = 8) -> np.ndarray:
    """The box plus ``margin`` of its size on each side, clipped to the frame; never empty."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in box_xyxy_px)
    mx, my = (x2 - x1) * margin, (y2 - y1) * margin
    x1, y1 = int(max(0, np.floor(x1 - mx))), int(max(0, np.floor(y1 - my)))
    x2, y2 = int(min(w, np.ceil(x2 + mx))), int(min(h, np.ceil(y2 + my)))
    if x2 - x1 < min_side:
        cx = (x1 + x2) // 2
        x1, x2 = max(0, cx - min_side // 2), min(w, cx + min_side // 2)
    if y2 - y1 < min_side:
        cy = (y1 + y2) // 2
        y1, y2 = max(0, cy - min_side // 2), min(h, cy + min_side // 2)
    return np.ascontiguousarray(image[y1:y2, x1:x2])


def box_at(points: Sequence[dict], t_s: float) -> list[float] | None:
    """The visible track box nearest in time to ``t_s`` (tracks are sampled, frames may fall between)."""
    vis = [p for p in points if p.get("visible") and p.get("box_xyxy_px") is not None]
    if not vis:
        return None
    best = min(vis, key=lambda p: abs(p["t_s"] - t_s))
    return list(best["box_xyxy_px"])


def scale_box(box: Sequence[float], sx: float, sy: float) -> list[float]:
    x1, y1, x2, y2 = box
    return [x1 * sx, y1 * sy, x2 * sx, y2 * sy]


def boxed_frames(frames, points: Sequence[dict] | None, width: int, height: int) -> tuple[np.ndarray, ...]:
    """Each decoded frame with the track's box at that time drawn on it (frames may be resized: boxes are
    scaled from the ``width`` x ``height`` pixel frame the track lives in)."""
    out = []
    for fr in frames:
        h, w = fr.image.shape[:2]
        b = box_at(points, fr.t_s) if points else None
        out.append(draw_box(fr.image, scale_box(b, w / width, h / height) if b else None))
    return tuple(out)
