"""Constant-velocity Kalman filter on boxes, as used by SAMURAI (itself the DeepSORT formulation).

State: ``(cx, cy, a, h, vcx, vcy, va, vh)`` with ``a = w / h``. One time step per processed frame.
Process and measurement noise scale with the box height, so the filter behaves the same for small
and large objects (DeepSORT, Wojke et al. 2017; SAMURAI, Yang et al. 2024, Sec. 4.1).
Pure numpy, no torch.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

# DeepSORT's relative noise weights (fractions of the box height).
STD_WEIGHT_POSITION = 1.0 / 20
STD_WEIGHT_VELOCITY = 1.0 / 160


def xyxy_to_xyah(box_xyxy: Sequence[float]) -> np.ndarray:
    """``(x1, y1, x2, y2)`` -> ``(cx, cy, w/h, h)``. A zero-height box (a one-row mask, or the empty mask's
    ``(0, 0, 0, 0)``) is read with height 1, as SAMURAI's release does, so the filter never divides by 0."""
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    w, h = x2 - x1, y2 - y1
    if h == 0:
        h = 1.0
    return np.array([(x1 + x2) / 2.0, (y1 + y2) / 2.0, w / h, h], dtype=np.float64)


def xyah_to_xyxy(xyah: Sequence[float]) -> np.ndarray:
    """``(cx, cy, w/h, h)`` -> ``(x1, y1, x2, y2)``."""
    cx, cy, a, h = (float(v) for v in xyah[:4])
    w = a * h
    return np.array([cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0], dtype=np.float64)


def box_iou(box_xyxy: Sequence[float], boxes_xyxy: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """IoU of one box against ``K`` boxes (``[K, 4]``); empty or degenerate boxes give 0."""
    b = np.asarray(box_xyxy, dtype=np.float64).reshape(4)
    bs = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    ix1 = np.maximum(b[0], bs[:, 0])
    iy1 = np.maximum(b[1], bs[:, 1])
    ix2 = np.minimum(b[2], bs[:, 2])
    iy2 = np.minimum(b[3], bs[:, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_b = max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)
    areas = np.clip(bs[:, 2] - bs[:, 0], 0, None) * np.clip(bs[:, 3] - bs[:, 1], 0, None)
    union = area_b + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def prediction_iou(pred_xyxy: Sequence[float], boxes_xyxy: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """IoU of the Kalman prediction with ``K`` candidate boxes, as SAMURAI's release scores it: a candidate
    ``(0, 0, 0, 0)`` (empty mask) scores 0; areas are ``(x2 - x1) * (y2 - y1)`` without clipping (a
    prediction whose height went negative is scored as the release scores it); a zero union scores 0."""
    p = np.asarray(pred_xyxy, dtype=np.float64).reshape(4)
    bs = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    inter = (np.maximum(0.0, np.minimum(p[2], bs[:, 2]) - np.maximum(p[0], bs[:, 0]))
             * np.maximum(0.0, np.minimum(p[3], bs[:, 3]) - np.maximum(p[1], bs[:, 1])))
    union = (p[2] - p[0]) * (p[3] - p[1]) + (bs[:, 2] - bs[:, 0]) * (bs[:, 3] - bs[:, 1]) - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union != 0)
    return np.where(np.all(bs == 0, axis=1), 0.0, iou)


class KalmanBoxFilter:
    """Stateless filter: the caller owns ``(mean, cov)`` per object, so many objects share one filter."""

    ndim = 4

    def __init__(self, dt: float = 1.0,
                 std_weight_position: float = STD_WEIGHT_POSITION,
                 std_weight_velocity: float = STD_WEIGHT_VELOCITY) -> None:
        self.motion_mat = np.eye(2 * self.ndim)
        self.motion_mat[: self.ndim, self.ndim:] = dt * np.eye(self.ndim)
        self.update_mat = np.eye(self.ndim, 2 * self.ndim)
        self.std_weight_position = std_weight_position
        self.std_weight_velocity = std_weight_velocity

    def initiate(self, xyah: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """New track from one measurement: zero velocity, wide uncertainty (2x position, 10x velocity)."""
        z = np.asarray(xyah, dtype=np.float64).reshape(4)
        mean = np.concatenate([z, np.zeros(4)])
        h = z[3]
        wp, wv = self.std_weight_position, self.std_weight_velocity
        std = np.array([2 * wp * h, 2 * wp * h, 1e-2, 2 * wp * h,
                        10 * wv * h, 10 * wv * h, 1e-5, 10 * wv * h])
        return mean, np.diag(np.square(std))

    def predict(self, mean: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One step ahead: ``x = F x``, ``P = F P F^T + Q(h)``."""
        h = mean[3]
        wp, wv = self.std_weight_position, self.std_weight_velocity
        std = np.array([wp * h, wp * h, 1e-2, wp * h, wv * h, wv * h, 1e-5, wv * h])
        q = np.diag(np.square(std))
        f = self.motion_mat
        return f @ mean, f @ cov @ f.T + q

    def project(self, mean: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """State distribution -> measurement space: ``H x``, ``H P H^T + R(h)``."""
        h = mean[3]
        wp = self.std_weight_position
        r = np.diag(np.square([wp * h, wp * h, 1e-1, wp * h]))
        hm = self.update_mat
        return hm @ mean, hm @ cov @ hm.T + r

    def update(self, mean: np.ndarray, cov: np.ndarray, xyah: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """Correct with a measurement: ``K = P H^T S^-1``, ``x += K (z - H x)``, ``P -= K S K^T``."""
        z = np.asarray(xyah, dtype=np.float64).reshape(4)
        proj_mean, s = self.project(mean, cov)
        # S is symmetric positive definite, so K^T = S^-1 (H P) solves without an explicit inverse.
        gain = np.linalg.solve(s, self.update_mat @ cov).T
        new_mean = mean + gain @ (z - proj_mean)
        new_cov = cov - gain @ s @ gain.T
        return new_mean, new_cov
