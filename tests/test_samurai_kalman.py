"""KalmanBoxFilter against the DeepSORT equations, written out per coordinate in this file.

The filter's matrices are block-diagonal per coordinate (position i only couples with velocity i), so
each of cx, cy, a, h is an independent 2-state filter whose noise is scaled by the current height
estimate. The reference below is that scalar recursion, not another implementation's output.
"""
from __future__ import annotations

import numpy as np
import pytest

from experts.samurai.kalman import KalmanBoxFilter, box_iou, xyah_to_xyxy, xyxy_to_xyah

WP, WV = 1 / 20, 1 / 160


class ScalarReference:
    """Four (position, velocity) pairs with 2x2 covariances, DeepSORT's noise written explicitly."""

    def __init__(self, z):
        h = z[3]
        self.p = list(map(float, z))
        self.v = [0.0] * 4
        pos_var = [(2 * WP * h) ** 2, (2 * WP * h) ** 2, 1e-2 ** 2, (2 * WP * h) ** 2]
        vel_var = [(10 * WV * h) ** 2, (10 * WV * h) ** 2, 1e-5 ** 2, (10 * WV * h) ** 2]
        self.P = [[pv, 0.0, vv] for pv, vv in zip(pos_var, vel_var)]  # [Ppp, Ppv, Pvv]

    def predict(self):
        h = self.p[3]
        qp = [(WP * h) ** 2, (WP * h) ** 2, 1e-2 ** 2, (WP * h) ** 2]
        qv = [(WV * h) ** 2, (WV * h) ** 2, 1e-5 ** 2, (WV * h) ** 2]
        for i in range(4):
            ppp, ppv, pvv = self.P[i]
            self.p[i] = self.p[i] + self.v[i]
            self.P[i] = [ppp + 2 * ppv + pvv + qp[i], ppv + pvv, pvv + qv[i]]

    def update(self, z):
        h = self.p[3]
        r = [(WP * h) ** 2, (WP * h) ** 2, 1e-1 ** 2, (WP * h) ** 2]
        for i in range(4):
            ppp, ppv, pvv = self.P[i]
            s = ppp + r[i]
            kp, kv = ppp / s, ppv / s
            innov = z[i] - self.p[i]
            self.p[i] += kp * innov
            self.v[i] += kv * innov
            self.P[i] = [ppp - ppp * ppp / s, ppv - ppp * ppv / s, pvv - ppv * ppv / s]

    def mean(self):
        return np.array(self.p + self.v)

    def cov(self):
        c = np.zeros((8, 8))
        for i, (ppp, ppv, pvv) in enumerate(self.P):
            c[i, i], c[i, i + 4], c[i + 4, i], c[i + 4, i + 4] = ppp, ppv, ppv, pvv
        return c


def test_initiate_and_first_predict_hand_numbers():
    kf = KalmanBoxFilter()
    mean, cov = kf.initiate([50.0, 60.0, 0.5, 100.0])
    np.testing.assert_allclose(mean, [50, 60, 0.5, 100, 0, 0, 0, 0])
    # (2 * 100 / 20)^2 = 100, (10 * 100 / 160)^2 = 39.0625
    np.testing.assert_allclose(np.diag(cov), [100, 100, 1e-4, 100, 39.0625, 39.0625, 1e-10, 39.0625])
    mean, cov = kf.predict(mean, cov)
    # Ppp = 100 + 39.0625 + (100/20)^2; Ppv = 39.0625; Pvv = 39.0625 + (100/160)^2
    assert cov[0, 0] == pytest.approx(164.0625)
    assert cov[0, 4] == pytest.approx(39.0625)
    assert cov[4, 4] == pytest.approx(39.453125)
    assert cov[0, 1] == 0.0 and cov[0, 5] == 0.0


def test_constant_velocity_sequence_with_missed_updates_matches_equations():
    kf = KalmanBoxFilter()
    vel = np.array([3.0, -2.0, 0.0, 1.0])
    z0 = np.array([100.0, 200.0, 0.5, 80.0])
    mean, cov = kf.initiate(z0)
    ref = ScalarReference(z0)
    missed = {4, 5, 9}
    for t in range(1, 16):
        mean, cov = kf.predict(mean, cov)
        ref.predict()
        if t not in missed:
            z = z0 + t * vel
            mean, cov = kf.update(mean, cov, z)
            ref.update(z)
        np.testing.assert_allclose(mean, ref.mean(), rtol=1e-9, atol=1e-9, err_msg=f"mean at step {t}")
        np.testing.assert_allclose(cov, ref.cov(), rtol=1e-9, atol=1e-12, err_msg=f"cov at step {t}")
    # a constant-velocity target is learnt: velocity estimates approach the true motion
    np.testing.assert_allclose(mean[4:], vel, atol=0.35)
    # missed updates grow the uncertainty; the next update shrinks it again
    _, c_pred = kf.predict(mean, cov)
    assert c_pred[0, 0] > cov[0, 0]


def test_update_pulls_mean_towards_measurement_and_shrinks_cov():
    kf = KalmanBoxFilter()
    mean, cov = kf.predict(*kf.initiate([0.0, 0.0, 1.0, 40.0]))
    new_mean, new_cov = kf.update(mean, cov, [10.0, 0.0, 1.0, 40.0])
    assert 0 < new_mean[0] < 10
    assert new_mean[4] > 0  # velocity learns from the innovation
    assert np.all(np.diag(new_cov) <= np.diag(cov) + 1e-12)


def test_box_conversions_roundtrip_and_iou():
    box = np.array([10.0, 20.0, 50.0, 100.0])
    xyah = xyxy_to_xyah(box)
    np.testing.assert_allclose(xyah, [30, 60, 0.5, 80])
    np.testing.assert_allclose(xyah_to_xyxy(xyah), box)
    ious = box_iou([0, 0, 10, 10], [[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 0, 0]])
    np.testing.assert_allclose(ious, [1.0, 50 / 150, 0.0, 0.0])
