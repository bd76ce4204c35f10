"""SAMURAI tracker: motion-aware mask choice with injected candidates, and end to end with tiny SAM 2."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sam2")

from experts.base import WeightsNotFoundError  # noqa: E402
from experts.samurai import (  # noqa: E402
    MotionConfig,
    SamuraiSpec,
    SamuraiTracker,
    TrackPoint,
    admit_to_memory,
    load_tracker,
    mask_to_rle,
    resolve_sam2_checkpoint,
    rle_to_mask,
    select_memory,
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import os

    os.environ["MOTIONFORGE_TINY_CACHE"] = str(tmp_path_factory.mktemp("tiny"))
    torch.set_num_threads(1)
    return load_tracker(SamuraiSpec(model_id="tiny://sam2", device="cpu")).model


def make_tracker(model, **kw) -> SamuraiTracker:
    return SamuraiTracker(model, SamuraiSpec(model_id="tiny://sam2", device="cpu", **kw))


@pytest.fixture()
def present_model(tiny_model):
    """Random weights predict 'no object' almost everywhere; push the object-score head so masks exist."""
    bias = tiny_model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias
    old = bias.detach().clone()
    with torch.no_grad():
        bias.add_(20.0)
    yield tiny_model
    with torch.no_grad():
        bias.copy_(old)


# ------------------------------------------------------------------ injected candidates


def square_logits(size: int, x: int, y: int, side: int) -> torch.Tensor:
    m = torch.full((size, size), -10.0)
    m[max(y, 0):max(y + side, 0), max(x, 0):max(x + side, 0)] = 10.0
    return m


def run_injected(tracker, ids, per_frame):
    """Feed ``per_frame(t) -> (logits [N, M, h, w], ious [N, M])`` to the session's chooser."""
    sess = tracker.session([(i, (0, 0, 1, 1)) for i in ids])
    picks = []
    for t in range(40):
        logits, ious = per_frame(t)
        choice, _ = sess.choose_candidates(logits, ious)
        picks.append(choice.tolist())
    return sess, np.array(picks)


LOW = 64  # low-res mask side for the 256 px tiny model


def true_xy(t):
    return 4 + t, 10


def distractor_xy(t):
    return 50 - t, 40


def single_object_frame(t):
    # candidates: 0 = true object (moves right), 1 = distractor (moves left), 2 = a fragment of the object
    tx, ty = true_xy(t)
    dx, dy = distractor_xy(t)
    logits = torch.stack([square_logits(LOW, tx, ty, 8), square_logits(LOW, dx, dy, 8),
                          square_logits(LOW, tx, ty, 3)])[None]
    # after the stable phase the distractor looks slightly better to SAM's IoU head
    ious = torch.tensor([[0.80, 0.60, 0.30]]) if t < 20 else torch.tensor([[0.80, 0.88, 0.30]])
    return logits, ious


def test_samurai_follows_motion_where_plain_sam2_takes_the_distractor(tiny_model):
    sess, picks = run_injected(make_tracker(tiny_model, samurai_mode=True), ["a"], single_object_frame)
    assert (picks[:, 0] == 0).all(), picks[:, 0]
    state = sess.objects[0].motion
    assert state.stable_frames >= 15
    assert state.mean[4] == pytest.approx(4.0, abs=0.6)  # 1 px/frame at 64 px = 4 px/frame at 256 px

    _, plain = run_injected(make_tracker(tiny_model, samurai_mode=False), ["a"], single_object_frame)
    assert (plain[:20, 0] == 0).all() and (plain[20:, 0] == 1).all()


def two_object_frame(order):
    def frame(t):
        a = square_logits(LOW, 4 + t, 8, 8)      # object a moves right on the upper row
        b = square_logits(LOW, 50 - t, 40, 8)    # object b moves left on the lower row
        junk = square_logits(LOW, 30, 28, 2)
        cands = {"a": torch.stack([a, b, junk]), "b": torch.stack([b, a, junk])}
        # after frame 20 each object's decoder prefers the *other* object (a swap)
        iou = torch.tensor([0.80, 0.60, 0.20]) if t < 20 else torch.tensor([0.80, 0.88, 0.20])
        return torch.stack([cands[i] for i in order]), torch.stack([iou for _ in order])
    return frame


def test_two_objects_keep_independent_filter_states(tiny_model):
    tracker = make_tracker(tiny_model, samurai_mode=True)
    sess_ab, picks_ab = run_injected(tracker, ["a", "b"], two_object_frame(["a", "b"]))
    sess_ba, picks_ba = run_injected(tracker, ["b", "a"], two_object_frame(["b", "a"]))
    assert (picks_ab == 0).all()
    np.testing.assert_array_equal(picks_ab[:, 0], picks_ba[:, 1])
    states = {o.instance_id: o.motion for o in sess_ab.objects}
    assert states["a"].mean[4] > 3.0 and states["b"].mean[4] < -3.0  # opposite horizontal velocities
    other = {o.instance_id: o.motion for o in sess_ba.objects}
    for i in "ab":
        np.testing.assert_allclose(states[i].mean, other[i].mean)
        np.testing.assert_allclose(states[i].cov, other[i].cov)

    _, plain = run_injected(make_tracker(tiny_model, samurai_mode=False), ["a", "b"], two_object_frame(["a", "b"]))
    assert (plain[20:] == 1).all()  # plain SAM 2 swaps identities


def _five_stable_frames(sess):
    for t in range(5):
        sess.choose_candidates(square_logits(LOW, 4 + t, 10, 8)[None, None].repeat(1, 3, 1, 1),
                               torch.tensor([[0.9, 0.5, 0.1]]))
    assert sess.objects[0].motion.stable_frames == 5


def test_stable_count_follows_predicted_mask_iou_as_in_the_release(tiny_model):
    tracker = make_tracker(tiny_model, samurai_mode=True)
    sess = tracker.session([("a", (0, 0, 1, 1))])
    _five_stable_frames(sess)
    # a jump across the frame with a confident mask: the release measures it and keeps counting
    jump = square_logits(LOW, 50, 50, 8)[None, None].repeat(1, 3, 1, 1)
    sess.choose_candidates(jump, torch.tensor([[0.9, 0.5, 0.1]]))
    assert sess.objects[0].motion.stable_frames == 6
    # an unconfident best mask (predicted IoU <= 0.3) restarts the count
    sess.choose_candidates(jump, torch.tensor([[0.3, 0.2, 0.1]]))
    assert sess.objects[0].motion.stable_frames == 0


def test_box_agreement_gate_is_an_option(tiny_model):
    tracker = make_tracker(tiny_model, samurai_mode=True, motion_gate="box_agreement")
    sess = tracker.session([("a", (0, 0, 1, 1))])
    _five_stable_frames(sess)
    # the same confident jump: with the box-agreement gate the filter no longer trusts the motion
    sess.choose_candidates(square_logits(LOW, 50, 50, 8)[None, None].repeat(1, 3, 1, 1),
                           torch.tensor([[0.9, 0.5, 0.1]]))
    assert sess.objects[0].motion.stable_frames == 0
    defaults = SamuraiSpec(model_id="tiny://sam2")
    assert defaults.motion_gate == "predicted_iou" and not defaults.skip_empty_measurements


def test_memory_gate_and_selection():
    cfg = MotionConfig()
    assert admit_to_memory(0.6, 0.1, 0.2, cfg)
    assert admit_to_memory(0.6, 0.1, None, cfg)
    # the release scans memory candidates from frame 2: the first tracked frame never is one
    assert not admit_to_memory(0.9, 5.0, None, cfg, frames_after_prompt=1)
    assert admit_to_memory(0.9, 5.0, None, cfg, frames_after_prompt=2)
    assert admit_to_memory(0.0, -5.0, 0.0, MotionConfig(samurai_mode=False), frames_after_prompt=1)
    assert not admit_to_memory(0.5, 0.1, 0.2, cfg)
    assert not admit_to_memory(0.6, -0.1, 0.2, cfg)
    assert not admit_to_memory(0.6, 0.1, 0.0, cfg)
    assert admit_to_memory(0.0, -5.0, 0.0, MotionConfig(samurai_mode=False))
    assert select_memory([1, 2, 5], 9, 6) == [1, 2, 5, 9]
    assert select_memory([1, 2, 3, 4, 5, 6, 7], 7, 6) == [2, 3, 4, 5, 6, 7]
    assert select_memory([1, 2, 3, 4, 5, 6, 7], 9, 6) == [3, 4, 5, 6, 7, 9]


def test_rle_roundtrip():
    m = np.zeros((5, 7), bool)
    m[0, 0] = True
    m[1:4, 2:6] = True
    rle = mask_to_rle(m)
    assert rle["size"] == [5, 7] and rle["counts"][0] == 0 and sum(rle["counts"]) == 35
    np.testing.assert_array_equal(rle_to_mask(rle), m)


# ------------------------------------------------------------------ end to end, tiny SAM 2


def moving_squares(n, h=96, w=128):
    for t in range(n):
        f = np.full((h, w, 3), 40, np.uint8)
        f[20:44, 8 + 2 * t: 32 + 2 * t] = (230, 60, 60)
        f[56:80, 96 - 2 * t: 120 - 2 * t] = (60, 230, 60)
        yield f


PROMPTS = [("red", (8.0, 20.0, 32.0, 44.0)), ("green", (96.0, 56.0, 120.0, 80.0))]


def test_end_to_end_shapes_and_rows(present_model):
    tracker = make_tracker(present_model, samurai_mode=True)
    frames = moving_squares(6)
    points = tracker.track(frames, PROMPTS, timestamps_s=[i / 10 for i in range(6)], return_masks=True)
    assert len(points) == 12 and all(isinstance(p, TrackPoint) for p in points)
    assert [(p.frame_index, p.instance_id) for p in points] == [(t, i) for t in range(6) for i in ("red", "green")]
    for p in points:
        assert p.t_s == pytest.approx(p.frame_index / 10)
        mask = rle_to_mask(p.mask_rle)
        assert mask.shape == (96, 128) and int(mask.sum()) == p.mask_area_px
        if p.box_xyxy_px is not None:
            x1, y1, x2, y2 = p.box_xyxy_px
            assert 0 <= x1 < x2 <= 128 and 0 <= y1 < y2 <= 96
            ys, xs = np.nonzero(mask)
            assert (x1, y1, x2, y2) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert p.visible == (p.mask_area_px > 0 and p.object_score > -1)
        assert p.kf_score is None  # the motion-aware phase starts after 15 stable frames


def test_fps_subsampling_uses_timestamps(tiny_model):
    tracker = make_tracker(tiny_model, fps=5.0)
    points = tracker.track(moving_squares(10), PROMPTS[:1], timestamps_s=[i / 10 for i in range(10)])
    assert [p.frame_index for p in points] == [0, 2, 4, 6, 8]


@pytest.mark.parametrize("samurai_mode", [False, True])
def test_state_stays_flat_on_a_longer_clip(present_model, samurai_mode):
    tracker = make_tracker(present_model, samurai_mode=samurai_mode,
                           memory_bank_iou_threshold=-1.0)  # admit everything: the bank fills up
    sess = tracker.session(PROMPTS[:1])
    sizes, counts = [], []
    for f in moving_squares(20, h=64, w=64):
        sess.step(f)
        sizes.append(sess.state_nbytes())
        counts.append(len(sess.state_tensors()))
    m = present_model
    # bounded: prompt frame + (num_maskmem - 1) memories + (max_obj_ptrs - 1) pointers (+ shared pos enc)
    assert len(sess.objects[0].admitted) == m.num_maskmem - 1
    assert len(sess.objects[0].ptrs) == m.max_obj_ptrs_in_encoder - 1
    assert sizes[16] == sizes[-1] and counts[16] == counts[-1]
    assert sizes[3] < sizes[16]


def test_plain_mode_matches_official_video_predictor(present_model, tmp_path):
    """samurai_mode=False reproduces SAM2VideoPredictor's propagation on the same frames."""
    from sam2.sam2_video_predictor import SAM2VideoPredictor

    assert isinstance(present_model, SAM2VideoPredictor)
    frames = list(moving_squares(8, h=64, w=64))
    tracker = make_tracker(present_model, samurai_mode=False)
    sess = tracker.session(PROMPTS[:1], return_masks=True, num_frames=len(frames))
    ours = [sess.step(f)[0] for f in frames]

    # the official predictor, fed our preprocessed frames so that only tracking logic is compared
    from PIL import Image

    for i, f in enumerate(frames):
        Image.fromarray(f).save(tmp_path / f"{i:05d}.jpg")
    state = present_model.init_state(str(tmp_path))
    state["images"] = torch.cat([sess._preprocess(f) for f in frames])
    present_model.add_new_points_or_box(state, frame_idx=0, obj_id=1, box=np.array([8.0, 20.0, 32.0, 44.0]))
    theirs = {}
    for fi, _, masks in present_model.propagate_in_video(state):
        theirs[fi] = (masks[0, 0] > 0).numpy()
    agree = [float(np.mean(rle_to_mask(p.mask_rle) == theirs[i])) for i, p in enumerate(ours)]
    # Tracked frames use memory, pointers and heads exactly as SAM 2 does. The prompt frame's output
    # goes through the predictor's interactive consolidation, so a few border pixels may differ.
    assert min(agree[1:]) > 0.999 and agree[0] > 0.97, agree


def test_weight_resolution_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="sam2.1-hiera-large.*not found locally"):
        resolve_sam2_checkpoint(SamuraiSpec(model_id="facebook/sam2.1-hiera-large"))
    ckpt = tmp_path / "my_model.pt"
    ckpt.write_bytes(b"")
    with pytest.raises(ValueError, match="set SamuraiSpec.config"):
        resolve_sam2_checkpoint(SamuraiSpec(model_id=str(ckpt)))
    named = tmp_path / "sam2.1_hiera_small.pt"
    named.write_bytes(b"")
    assert resolve_sam2_checkpoint(SamuraiSpec(model_id=str(named)))[0] == "configs/sam2.1/sam2.1_hiera_s.yaml"


def test_frame_objects_and_fps_without_timestamps(tiny_model):
    from dataclasses import dataclass as dc

    @dc
    class Frame:  # the shape of experts.video.Frame
        index: int
        t_s: float
        image: np.ndarray

    tracker = make_tracker(tiny_model, fps=4.0)
    frames = [Frame(i, i / 8, f) for i, f in enumerate(moving_squares(5))]
    pts = tracker.track(frames, PROMPTS[:1])
    assert [(p.frame_index, p.t_s) for p in pts] == [(0, 0.0), (2, 0.25), (4, 0.5)]
    # plain arrays and no timestamps: taken as already sampled at spec.fps
    pts = tracker.track(moving_squares(3), PROMPTS[:1])
    assert [p.t_s for p in pts] == [0.0, 0.25, 0.5]
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        tracker.track([np.zeros((8, 8), np.uint8)], PROMPTS[:1])
    with pytest.raises(ValueError, match="x2 > x1"):
        tracker.track(moving_squares(1), [("bad", (10.0, 10.0, 5.0, 20.0))])
    with pytest.raises(ValueError, match="unique"):
        tracker.track(moving_squares(1), [PROMPTS[0], PROMPTS[0]])


def test_motion_choice_that_disagrees_with_sam_is_what_gets_output(present_model):
    """When the motion-aware pick differs from SAM's argmax, the frame is redone with that pick."""
    frames = list(moving_squares(3, h=64, w=64))
    runs = {}
    for forced in (None, "argmin"):
        tracker = make_tracker(present_model, samurai_mode=True)
        sess = tracker.session(PROMPTS[:1], return_masks=True)
        if forced:
            def choose(boxes, ious):
                return [int(np.argmin(i)) for i in ious], [0.75] * len(ious)
            sess.choose_from_boxes = choose
        runs[forced] = [sess.step(f)[0] for f in frames]
    base, other = runs[None], runs["argmin"]
    assert base[0].mask_rle == other[0].mask_rle  # the prompt frame has a single candidate
    assert other[1].kf_score == 0.75 and base[1].kf_score is None
    assert any(b.mask_rle != o.mask_rle for b, o in zip(base[1:], other[1:]))


# ------------------------------------------------------------------ release rules in the tracker


def test_candidate_boxes_use_the_inclusive_max_pixel(tiny_model):
    sess = make_tracker(tiny_model).session([("a", (0, 0, 1, 1))])
    logits = torch.stack([square_logits(LOW, 5, 9, 8), square_logits(LOW, 0, 0, 1),
                          torch.full((LOW, LOW), -10.0)])[None]
    boxes = sess.candidate_boxes(logits)[0].tolist()
    # 4x bilinear upsampling (256 px model input): low-res pixels [5, 13) cover model pixels 20..51
    assert boxes == [[20.0, 36.0, 51.0, 67.0], [0.0, 0.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("samurai_mode", [True, False])
def test_filter_starts_after_the_prompt_frame_and_first_tracked_frame_is_no_memory(present_model, samurai_mode):
    tracker = make_tracker(present_model, samurai_mode=samurai_mode,
                           memory_bank_iou_threshold=-1.0)  # the gate passes everything it is asked about
    sess = tracker.session(PROMPTS[:1])
    frames = moving_squares(4, h=64, w=64)
    obj = sess.objects[0]
    sess.step(next(frames))  # the prompt frame: one mask from the box, nothing to choose
    assert obj.motion.mean is None and obj.motion.stable_frames == 0 and obj.motion.history == []
    sess.step(next(frames))
    if samurai_mode:
        assert obj.motion.mean is not None and obj.motion.stable_frames == 1 and len(obj.motion.history) == 1
        assert list(obj.admitted) == []  # the release scans memory candidates from frame 2 on
    else:
        assert obj.motion.mean is None and [i for i, _ in obj.admitted] == [1]
    assert obj.last[0] == 1
    sess.step(next(frames))
    sess.step(next(frames))
    assert [i for i, _ in obj.admitted] == ([2, 3] if samurai_mode else [1, 2, 3])


def test_object_counts_as_present_above_logit_minus_one_in_samurai_mode(present_model):
    frame = next(moving_squares(1, h=64, w=64))
    confident = make_tracker(present_model, samurai_mode=True).session(PROMPTS[:1]).step(frame)[0]
    assert confident.mask_area_px > 0
    bias = present_model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias
    with torch.no_grad():
        bias.add_(-0.5 - confident.object_score)  # this frame's object logit becomes -0.5
    samurai = make_tracker(present_model, samurai_mode=True).session(PROMPTS[:1]).step(frame)[0]
    plain = make_tracker(present_model, samurai_mode=False).session(PROMPTS[:1]).step(frame)[0]
    assert samurai.object_score == pytest.approx(-0.5, abs=1e-3) and plain.object_score == pytest.approx(-0.5, abs=1e-3)
    assert samurai.mask_area_px == confident.mask_area_px and samurai.visible
    assert plain.mask_area_px == 0 and not plain.visible
