"""SAMURAI's mask choice against an independent replay of the release's rules.

``ReleaseReplay`` below is written from reading the release (yangchris11/samurai at 76ba195):
``sam2/sam2/modeling/sam2_base.py`` (``SAM2Base._forward_sam_heads``, the ``multimask_output and
samurai_mode`` branch) and ``sam2/sam2/utils/kalman_filter.py`` (``KalmanFilter``). It keeps the release's
shapes and types: predicted IoUs as a ``[1, M]`` float32 torch tensor, Kalman IoUs turned into a float32
tensor from a Python list, thresholds compared against tensors, boxes as Python lists of ints, the filter
in numpy with a Cholesky solve. It does not call project code. ``select_candidate`` must make the same
choice on every frame of every sequence.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
scipy_linalg = pytest.importorskip("scipy.linalg")

from experts.samurai import KalmanBoxFilter, MotionConfig, MotionState, select_candidate  # noqa: E402

IMAGE = 1024  # SAM 2's input side: boxes live in these pixels


class ReleaseKalman:
    """The release's constant-velocity box filter (DeepSORT): state (x, y, a, h, vx, vy, va, vh)."""

    def __init__(self):
        self.F = np.eye(8)
        for i in range(4):
            self.F[i, 4 + i] = 1.0
        self.H = np.eye(4, 8)
        self.wp, self.wv = 1.0 / 20, 1.0 / 160

    def initiate(self, z):
        z = np.asarray(z, dtype=float)
        h = z[3]
        std = [2 * self.wp * h, 2 * self.wp * h, 1e-2, 2 * self.wp * h,
               10 * self.wv * h, 10 * self.wv * h, 1e-5, 10 * self.wv * h]
        return np.r_[z, np.zeros(4)], np.diag(np.square(std))

    def predict(self, mean, cov):
        h = mean[3]
        q = np.diag(np.square([self.wp * h, self.wp * h, 1e-2, self.wp * h,
                               self.wv * h, self.wv * h, 1e-5, self.wv * h]))
        return mean @ self.F.T, self.F @ cov @ self.F.T + q

    def update(self, mean, cov, z):
        h = mean[3]
        s = self.H @ cov @ self.H.T + np.diag(np.square([self.wp * h, self.wp * h, 1e-1, self.wp * h]))
        c = scipy_linalg.cho_factor(s, lower=True, check_finite=False)
        gain = scipy_linalg.cho_solve(c, (cov @ self.H.T).T, check_finite=False).T
        return mean + (np.asarray(z, dtype=float) - self.H @ mean) @ gain.T, cov - gain @ s @ gain.T

    @staticmethod
    def to_xyah(b):
        x1, y1, x2, y2 = b
        h = y2 - y1
        if h == 0:
            h = 1
        return [(x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / h, h]

    @staticmethod
    def to_xyxy(m):
        xc, yc, a, h = m
        return [xc - a * h / 2, yc - h / 2, xc + a * h / 2, yc + h / 2]

    def ious(self, pred_xyah, boxes):
        p = self.to_xyxy(pred_xyah)
        out = []
        for b in boxes:
            if b == [0, 0, 0, 0]:
                out.append(0)
                continue
            inter = max(0, min(p[2], b[2]) - max(p[0], b[0])) * max(0, min(p[3], b[3]) - max(p[1], b[1]))
            union = (p[2] - p[0]) * (p[3] - p[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            out.append(inter / union if union != 0 else 0)
        return out


class ReleaseReplay:
    """The per-object state the release keeps on the model, and its choice for one tracked frame."""

    def __init__(self, stable_frames_threshold=15, stable_ious_threshold=0.3, kf_score_weight=0.15):
        self.kf = ReleaseKalman()
        self.mean = self.cov = None
        self.stable = 0
        self.thr_frames = stable_frames_threshold
        self.thr_iou = stable_ious_threshold
        self.w = kf_score_weight

    def step(self, boxes: list[list[int]], ious: torch.Tensor):
        """``boxes``: per candidate [x_min, y_min, x_max, y_max] (inclusive) or [0, 0, 0, 0];
        ``ious``: ``[1, M]`` float32. Returns (chosen index, kf score or None)."""
        kf_score = None
        if self.mean is None and self.cov is None or self.stable == 0:
            best = int(torch.argmax(ious, dim=-1)[0])
            self.mean, self.cov = self.kf.initiate(self.kf.to_xyah(boxes[best]))
            self.stable += 1
        elif self.stable < self.thr_frames:
            self.mean, self.cov = self.kf.predict(self.mean, self.cov)
            best = int(torch.argmax(ious, dim=-1)[0])
            if ious[0][best] > self.thr_iou:
                self.mean, self.cov = self.kf.update(self.mean, self.cov, self.kf.to_xyah(boxes[best]))
                self.stable += 1
            else:
                self.stable = 0
        else:
            self.mean, self.cov = self.kf.predict(self.mean, self.cov)
            kf_ious = torch.tensor(self.kf.ious(self.mean[:4], boxes))
            weighted = self.w * kf_ious + (1 - self.w) * ious
            best = int(torch.argmax(weighted, dim=-1)[0])
            kf_score = float(kf_ious[best])
            if ious[0][best] < self.thr_iou:
                self.stable = 0
            else:
                self.mean, self.cov = self.kf.update(self.mean, self.cov, self.kf.to_xyah(boxes[best]))
        return best, kf_score


# ------------------------------------------------------------------ random sequences


def _clip_box(x1, y1, x2, y2):
    x1, x2 = sorted((int(np.clip(x1, 0, IMAGE - 1)), int(np.clip(x2, 0, IMAGE - 1))))
    y1, y2 = sorted((int(np.clip(y1, 0, IMAGE - 1)), int(np.clip(y2, 0, IMAGE - 1))))
    return [x1, y1, x2, y2]


def random_sequence(seed: int):
    """Frames of (candidate boxes, predicted IoUs [1, M] float32) for one object with a distractor.

    Per frame, one of: confident (the object's mask clearly best), uncertain (all IoUs mid-range), low
    confidence (all IoUs at or below the 0.3 gate, sometimes exactly 0.3), distractor preferred (a second
    moving object's mask gets the highest IoU), object absent (all masks empty, as after SAM 2's
    object-score gating), and degenerate masks (one row or one pixel).
    """
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 70))
    pos = rng.uniform(150, 850, 2)
    vel = rng.uniform(-12, 12, 2)
    size = rng.uniform(40, 220, 2)
    dpos = rng.uniform(150, 850, 2)
    dvel = rng.uniform(-12, 12, 2)
    regime_p = rng.dirichlet([6, 2, 1.5, 1.5, 0.6, 0.4])
    frames = []
    for _ in range(n):
        pos = pos + vel + rng.normal(0, 2, 2)
        dpos = dpos + dvel + rng.normal(0, 2, 2)
        size = np.clip(size * rng.uniform(0.95, 1.05, 2), 10, 400)
        obj = _clip_box(*(pos - size / 2), *(pos + size / 2))
        jitter = rng.normal(0, 3, 4)
        whole = _clip_box(*(np.asarray(obj) + jitter))
        frag_w = size * rng.uniform(0.2, 0.6, 2)
        fpos = pos + rng.uniform(-0.3, 0.3, 2) * size
        fragment = _clip_box(*(fpos - frag_w / 2), *(fpos + frag_w / 2))
        distractor = _clip_box(*(dpos - size / 2), *(dpos + size / 2))
        regime = rng.choice(6, p=regime_p)
        if regime == 0:    # confident
            boxes, ious = [whole, fragment, distractor], [rng.uniform(0.7, 1.0), rng.uniform(0.3, 0.7),
                                                          rng.uniform(0.1, 0.6)]
        elif regime == 1:  # uncertain
            boxes, ious = [whole, fragment, distractor], list(rng.uniform(0.3, 0.6, 3))
        elif regime == 2:  # low confidence, sometimes exactly at the gate
            low = list(rng.uniform(0.0, 0.3, 3))
            if rng.random() < 0.3:
                low[int(rng.integers(3))] = 0.3
            boxes, ious = [whole, fragment, distractor], low
        elif regime == 3:  # the distractor looks best to SAM
            boxes, ious = [whole, fragment, distractor], [rng.uniform(0.5, 0.8), rng.uniform(0.2, 0.5),
                                                          rng.uniform(0.75, 1.0)]
        elif regime == 4:  # object absent: every candidate mask empty
            boxes, ious = [[0, 0, 0, 0]] * 3, list(rng.uniform(0.0, 1.0, 3))
        else:              # degenerate masks: one row, one pixel, and the object
            y = int(np.clip(pos[1], 0, IMAGE - 1))
            x = int(np.clip(pos[0], 0, IMAGE - 1))
            boxes, ious = [[max(x - 20, 0), y, x, y], [x, y, x, y], whole], list(rng.uniform(0.2, 1.0, 3))
        order = rng.permutation(3)
        boxes = [boxes[i] for i in order]
        ious = torch.tensor([[float(ious[i]) for i in order]], dtype=torch.float32)
        frames.append((boxes, ious))
    return frames


N_SEQUENCES = 320


def test_select_candidate_reproduces_the_release_on_random_sequences():
    kf = KalmanBoxFilter()
    cfg = MotionConfig()
    frames_total = differing_from_argmax = motion_frames = resets = 0
    mismatches = []
    for seed in range(N_SEQUENCES):
        ref = ReleaseReplay()
        state = MotionState()
        for t, (boxes, ious) in enumerate(random_sequence(seed)):
            want, want_kf = ref.step(boxes, ious)
            before = state.stable_frames
            got = select_candidate(state, kf, np.asarray(boxes, dtype=np.float32), ious[0].numpy(), cfg)
            frames_total += 1
            if (got.index, got.kf_score is None, state.stable_frames) != (want, want_kf is None, ref.stable):
                mismatches.append((seed, t, got.index, want, state.stable_frames, ref.stable))
            elif want_kf is not None:
                # float32 IoUs on both sides; the Kalman means agree to ~1e-12 relative
                assert got.kf_score == pytest.approx(want_kf, abs=1e-6)
            differing_from_argmax += want != int(torch.argmax(ious))
            motion_frames += want_kf is not None
            resets += before > 0 and ref.stable == 0
        # empty and one-row masks are read with height 1: the filter never turns NaN
        assert np.isfinite(state.mean).all() and np.isfinite(state.cov).all()
    assert mismatches == [], f"{len(mismatches)} of {frames_total} frames differ; first: {mismatches[:5]}"
    # the sequences exercise every rule: motion-aware picks that overrule SAM, and stable-count resets
    assert frames_total > 10_000
    # (seeds 0..319 give 14,508 frames, 2,931 motion-aware, 137 overruling SAM's argmax, 1,408 resets)
    assert motion_frames > 2_000 and differing_from_argmax > 100 and resets > 1_000


def _stable_run(n_frames: int, x0: float = 100.0, speed: float = 8.0):
    """n frames of one object moving right, SAM confident in it; candidates: object, fragment, far square."""
    frames = []
    for t in range(n_frames):
        x = int(x0 + speed * t)
        frames.append(([[x, 200, x + 60, 260], [x + 10, 210, x + 30, 230], [700, 700, 760, 760]],
                       torch.tensor([[0.9, 0.4, 0.2]])))
    return frames


def _run(cfg: MotionConfig, frames):
    kf, state = KalmanBoxFilter(), MotionState()
    choices = [select_candidate(state, kf, np.asarray(b, dtype=np.float32), i[0].numpy(), cfg) for b, i in frames]
    return choices, state


def _replay(frames, **kw):
    ref = ReleaseReplay(**kw)
    return [ref.step(b, i) for b, i in frames]


def test_kf_score_weight_decides_between_motion_and_sam_confidence():
    """On the motion-aware frame, candidate 0 is where the filter predicts (IoU ~1) but SAM rates it 0.5;
    candidate 1 is off the track with SAM's 0.7. 0.15 weighting keeps SAM's pick, 0.85 follows motion."""
    frames = _stable_run(20)
    x = int(100 + 8 * 20)
    frames.append(([[x, 200, x + 60, 260], [600, 600, 660, 660], [0, 0, 0, 0]], torch.tensor([[0.5, 0.7, 0.1]])))
    picks = {}
    for w in (0.15, 0.85):
        choices, _ = _run(MotionConfig(kf_score_weight=w), frames)
        assert [c.index for c in choices] == [b for b, _ in _replay(frames, kf_score_weight=w)]
        picks[w] = choices[-1]
    assert picks[0.15].index == 1 and picks[0.15].kf_score == 0.0
    assert picks[0.85].index == 0 and picks[0.85].kf_score > 0.8


@pytest.mark.parametrize("threshold", [14, 15, 16])
@pytest.mark.parametrize("distractor_frame", [14, 15])
def test_stable_frames_threshold_starts_the_motion_aware_phase(threshold, distractor_frame):
    """After ``distractor_frame`` stable frames, a far-away mask gets SAM's best IoU. Only a filter already in
    its motion-aware phase (stable count >= threshold) keeps the object."""
    frames = _stable_run(distractor_frame)
    x = int(100 + 8 * distractor_frame)
    frames.append(([[x, 200, x + 60, 260], [700, 700, 760, 760], [x + 10, 210, x + 30, 230]],
                   torch.tensor([[0.8, 0.85, 0.3]])))
    choices, state = _run(MotionConfig(stable_frames_threshold=threshold), frames)
    assert [c.index for c in choices] == [b for b, _ in _replay(frames, stable_frames_threshold=threshold)]
    motion_aware = distractor_frame >= threshold
    assert choices[-1].index == (0 if motion_aware else 1)
    assert (choices[-1].kf_score is not None) == motion_aware
    assert all(c.kf_score is None for c in choices[:threshold])
    # the count stops at the threshold; in warm-up it counts every confident frame
    assert state.stable_frames == min(distractor_frame + 1, threshold)


def test_inclusive_mask_boxes_match_the_release_rule():
    """Candidate boxes: min/max row and column indices of the mask's pixels (the release's argwhere)."""
    from experts.samurai.tracker import masks_to_boxes

    rng = np.random.default_rng(0)
    masks = np.zeros((40, 3, 32, 48), dtype=bool)
    for k in range(40):
        for m in range(3):
            if rng.random() < 0.2:
                continue  # empty mask
            y1, x1 = rng.integers(0, 32), rng.integers(0, 48)
            masks[k, m, y1:y1 + rng.integers(1, 10), x1:x1 + rng.integers(1, 10)] = True
    got = masks_to_boxes(torch.from_numpy(masks), inclusive=True).numpy()
    for k in range(40):
        for m in range(3):
            nz = torch.argwhere(torch.from_numpy(masks[k, m]))
            if len(nz) == 0:
                want = [0, 0, 0, 0]
            else:
                (y_min, x_min), (y_max, x_max) = nz.min(dim=0).values.tolist(), nz.max(dim=0).values.tolist()
                want = [x_min, y_min, x_max, y_max]
            assert got[k, m].tolist() == want
