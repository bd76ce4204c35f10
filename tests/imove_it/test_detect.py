"""detect stage: box filters and NMS as pure functions; exactness against planted boxes; stable ids; tiny GD."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from schemas._base import from_table
from schemas.instances import SCHEMA, Instance
from schemas.tags import ClipTags
from stages.base import install_expert_override
from stages.imove_it.detect import (CLIP_EXPERT, DETECTOR_EXPERT, PROFILES, STAGE, Candidate, DetectConfig, box_iou,
                                    rounded_box,
                                    candidates_from_detections, crop_box,
                           instance_id, nms_across_tags)
from stages.runner import run_shard
from stages.imove_it.tag import STAGE as TAG_STAGE
from stages.imove_it.tag import TAGGER_EXPERT, TagConfig
from storage.root import OutputRoot
from tests._imove_doubles import ALIAS_TAG, all_clips, oracle, video_of
from tests._stage_tables import write_stage


def test_box_helpers():
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert box_iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0
    img = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    assert crop_box(img, [10.0, 5.0, 20.0, 9.0]).shape == (4, 10, 3)
    assert crop_box(img, [10.2, 5.5, 19.5, 8.1]).shape == (4, 10, 3)  # pixel edges floor / ceil
    assert crop_box(img, [28, 18, 40, 40], padding=0.0).shape == (2, 2, 3)  # clipped to the frame
    assert crop_box(img, [35, 0, 40, 5]) is None
    a = instance_id("clip", "dog", [10.2, 20.4, 30.0, 40.0])
    assert a == instance_id("clip", "dog", [10.4, 19.6, 30.3, 39.8])  # rounded to whole pixels
    assert a != instance_id("clip", "cat", [10.2, 20.4, 30.0, 40.0]) != instance_id("clip2", "dog", [10, 20, 30, 40])


def test_nms_across_tags_names_the_kept_instance():
    def c(label, score, box, reason=None):
        return Candidate(label=label, tag_score=None, box=box, score=score, area_ratio=0.1,
                         instance_id=instance_id("c", label, box), reason=reason)

    dog = c("dog", 0.9, [0, 0, 10, 10])
    animal = c("animal", 0.8, [0, 0, 10, 11])
    far = c("cat", 0.7, [50, 50, 60, 60])
    big = c("dog", 0.95, [0, 0, 10, 10.5], reason="too large")  # already dropped: takes no part
    nms_across_tags([animal, far, dog, big], 0.7)
    assert dog.reason is None and far.reason is None and big.reason == "too large"
    assert animal.duplicate_of == dog.instance_id and animal.duplicate_iou == pytest.approx(100 / 110)
    assert animal.reason.startswith(f"NMS: overlaps instance {dog.instance_id}")


def _tagged_root(tmp_path, o, clips):
    root = OutputRoot(str(tmp_path / "out"))
    write_stage(root, "scenes", 0, clips)
    install_expert_override(TAGGER_EXPERT, o.tagger())
    run_shard(TAG_STAGE, root, TagConfig(), 0)
    return root


def test_detect_is_exact_on_synthetic_videos(tmp_path):
    o = oracle()
    clips = all_clips(o)
    root = _tagged_root(tmp_path, o, clips)
    install_expert_override(DETECTOR_EXPERT, o.detector())
    install_expert_override(CLIP_EXPERT, o.clip())
    cfg = DetectConfig(batch_size=3)
    run_shard(STAGE, root, cfg, 0)
    table = root.read_shard("detect", 0)
    assert table.schema.equals(SCHEMA, check_metadata=False)
    rows = from_table(table, Instance)
    assert len({r.instance_id for r in rows}) == len(rows)
    for c in clips:
        v = video_of(o, c.video_path)
        mine = [r for r in rows if r.clip_id == c.clip_id]
        gt = v.objects_at(c.start_frame)
        real = sorted(tuple(b) for ob, b in gt if not ob.too_large)
        kept = [r for r in mine if r.status == "ok"]
        # Every real object is kept, with its exact box and label; nothing else is.
        assert sorted(tuple(r.box_xyxy_px) for r in kept) == real
        for r in kept:
            ob = next(ob for ob, b in gt if b == r.box_xyxy_px)
            assert r.label == ob.category and r.clip_score == pytest.approx(0.31) and r.area_ratio < 0.6
            assert (r.width, r.height, r.frame_t_s) == (v.truth.width, v.truth.height, pytest.approx(c.start_s))
        skipped = [r for r in mine if r.status == "skipped"]
        # The planted too-large object is dropped by area, before CLIP.
        large = [r for r in skipped if r.error.startswith("too large")]
        assert sorted(tuple(r.box_xyxy_px) for r in large) == sorted(tuple(b) for ob, b in gt if ob.too_large)
        for r in large:
            assert r.area_ratio > 0.6 and r.clip_score is None and f"{r.area_ratio:.2f} > 0.6" in r.error
        # The decoy on empty background is dropped by CLIP.
        first_obj, first_box = o.first_object(v, c.start_frame)
        low = [r for r in skipped if r.error.startswith("CLIP")]
        assert [(r.label, r.box_xyxy_px) for r in low] == [(first_obj.category, o.decoy_box(v, c.start_frame))]
        assert "0.050 < 0.2" in low[0].error
        # The alias tag's copy of the first object is de-duplicated against it across tags.
        dup = [r for r in skipped if r.error.startswith("NMS")]
        original = next(r for r in kept if r.box_xyxy_px == first_box)
        assert [(r.label, r.duplicate_of) for r in dup] == [(ALIAS_TAG, original.instance_id)]
        assert dup[0].duplicate_iou > 0.7 and original.instance_id in dup[0].error
        assert len(mine) == len(kept) + len(large) + len(low) + len(dup)
    # Stable ids: a forced re-run and a fresh root give the same keys.
    run_shard(STAGE, root, cfg, 0, force=True)
    again = from_table(root.read_shard("detect", 0), Instance)
    assert [(r.instance_id, r.status) for r in again] == [(r.instance_id, r.status) for r in rows]
    root2 = _tagged_root(tmp_path / "b", o, clips)
    run_shard(STAGE, root2, cfg, 0)
    assert {r.instance_id for r in from_table(root2.read_shard("detect", 0), Instance)} == {r.instance_id for r in rows}


def test_thresholds_move_the_drops(tmp_path):
    o = oracle()
    clips = all_clips(o)[:1]
    root = _tagged_root(tmp_path, o, clips)
    install_expert_override(DETECTOR_EXPERT, o.detector())
    install_expert_override(CLIP_EXPERT, o.clip())
    run_shard(STAGE, root, DetectConfig(min_clip_score=0.0, nms_iou_threshold=0.95, max_area_ratio=0.9), 0)
    rows = from_table(root.read_shard("detect", 0), Instance)
    assert all(r.status == "ok" for r in rows), [r.error for r in rows if r.error]
    run_shard(STAGE, root, DetectConfig(max_boxes_per_tag=1, min_clip_score=0.0), 0)
    rows = from_table(root.read_shard("detect", 0), Instance)
    labels = [r.label for r in rows if r.status == "ok"]
    assert len(labels) == len(set(labels))  # one box per tag at most; the others are reasoned skips
    over = [r for r in rows if r.error and r.error.startswith("over the per-tag cap")]
    assert over and all("max_boxes_per_tag=1" in r.error for r in over)
    run_shard(STAGE, root, DetectConfig(max_instances_per_clip=2), 0)
    rows = from_table(root.read_shard("detect", 0), Instance)
    ok = [r for r in rows if r.status == "ok"]
    capped = [r for r in rows if r.error and r.error.startswith("over the per-clip cap")]
    assert len(ok) == 2 and len(capped) >= 1
    assert min(r.detection_score for r in ok) >= max(r.detection_score for r in capped)


def test_clip_without_tags_gives_no_rows_and_bad_frame_gives_error(tmp_path):
    o = oracle()
    good = all_clips(o)[0]
    root = OutputRoot(str(tmp_path / "out"))
    base = ClipTags(clip_id=good.clip_id, video_id=good.video_id, video_path=good.video_path,
                    start_frame=good.start_frame, end_frame=good.end_frame, start_s=good.start_s, end_s=good.end_s,
                    duration_s=good.duration_s, fps=good.fps, width=320, height=240, tagger="ram_plus",
                    tags=[], dropped_tags=[{"tag": "sky", "score": 0.9}])
    missing = dataclasses.replace(base, clip_id="missing", video_path=str(tmp_path / "nope.mp4"),
                                  tags=[{"tag": "car", "score": 0.9}])
    resized = dataclasses.replace(base, clip_id="resized", width=640, tags=[{"tag": "car", "score": 0.9}])
    write_stage(root, "tag", 0, [base, missing, resized])
    install_expert_override(DETECTOR_EXPERT, o.detector())
    install_expert_override(CLIP_EXPERT, o.clip())
    out = run_shard(STAGE, root, DetectConfig(), 0)
    rows = {r.clip_id: r for r in from_table(root.read_shard("detect", 0), Instance)}
    assert out.rows == 2 and out.error == 2 and good.clip_id not in rows
    assert "nope.mp4" in rows["missing"].error and rows["missing"].label is None
    assert "re-run tag" in rows["resized"].error


def test_tiny_profile_with_real_tiny_grounding_dino_and_clip(tmp_path):
    o = oracle()
    clips = all_clips(o)[:2]
    root = _tagged_root(tmp_path, o, clips)
    cfg = DetectConfig.model_validate(PROFILES["tiny"])
    out = run_shard(STAGE, root, cfg, 0)
    table = root.read_shard("detect", 0)
    assert table.schema.equals(SCHEMA, check_metadata=False)
    rows = from_table(table, Instance)
    tags = from_table(root.read_shard("tag", 0), ClipTags)
    # At most 2 instances per clip (the tiny cap), every other box a reasoned skip, and some boxes survive.
    assert out.error == 0 and 0 < out.ok <= 2 * len(tags)
    assert all(r.status == "ok" or r.error for r in rows)
    assert all(r.clip_score is not None for r in rows if r.status == "ok")


@dataclasses.dataclass(frozen=True)
class _Det:
    label: str
    score: float
    box_xyxy_px: tuple


def test_box_filters_at_their_edges():
    """Each rule at its exact edge: ``area_ratio > max_area_ratio`` drops (equal keeps); a side
    ``< min_box_side_px`` drops (equal keeps). The numbers are exact in binary floating point (6000 / 10000 is
    the double nearest 0.6, the same as the literal), so no tolerance is involved."""
    cfg = DetectConfig(max_area_ratio=0.6, min_box_side_px=2.0, max_boxes_per_tag=None)
    dets = [
        _Det("a", 0.9, (0.0, 0.0, 60.0, 100.0)),   # area ratio exactly 0.6: kept
        _Det("b", 0.8, (0.0, 0.0, 61.0, 100.0)),   # 0.61: too large
        _Det("c", 0.7, (10.0, 10.0, 11.0, 50.0)),  # 1 px wide: degenerate
        _Det("d", 0.6, (10.0, 10.0, 12.0, 50.0)),  # 2 px wide: exactly the minimum, kept
        _Det("e", 0.5, (10.0, 10.0, 50.0, 11.0)),  # 1 px high: degenerate
    ]
    got = {c.label: c for c in candidates_from_detections("clip", dets, {}, 100, 100, cfg)}
    assert got["a"].area_ratio == 0.6 and got["a"].reason is None
    assert got["b"].reason == "too large: area ratio 0.61 > 0.6"
    assert got["c"].reason.startswith("degenerate box: 1.0 x 40.0 px")
    assert got["d"].reason is None
    assert got["e"].reason.startswith("degenerate box: 40.0 x 1.0 px")
    # and a 1-pixel-wide box still crops to exactly one column of pixels where it is allowed
    img = np.zeros((100, 100, 3), np.uint8)
    assert crop_box(img, got["c"].box).shape == (40, 1, 3)


def _match_rows(a: list[Instance], b: list[Instance]) -> list[tuple[Instance, Instance]]:
    """Pair each row of ``a`` with the row of ``b`` of the same clip and label whose box is nearest (ids hash
    boxes rounded to whole pixels, so they are compared separately, where rounding cannot differ)."""
    pairs, left = [], list(b)
    for r in a:
        same = [x for x in left if x.clip_id == r.clip_id and x.label == r.label and x.status == r.status]
        assert same, f"no counterpart for {r.clip_id} {r.label} {r.status}"
        if r.box_xyxy_px is None:
            best = same[0]
        else:
            best = min(same, key=lambda x: float(np.abs(np.subtract(x.box_xyxy_px, r.box_xyxy_px)).max()))
        left.remove(best)
        pairs.append((r, best))
    assert not left
    return pairs


def _crop_edges(box):
    """The pixel rows / columns crop_box cuts for ``box`` (no padding): floor of the start, ceil of the end."""
    import math

    return math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3])


def test_batched_detect_matches_per_clip_and_isolates_an_unreadable_clip(tmp_path):
    """Tiny Grounding DINO + tiny CLIP, through the production loaders: 3 clips and an unreadable one in the
    middle of the first batch, detected one clip per call with inline decoding, then 3 clips per Grounding DINO call, all their
    crops in one CLIP call, frames prefetched 2 clips ahead. The rows must agree: same clips, labels and
    statuses; boxes within 1e-3 px, detection scores within 1e-4, CLIP scores within 1e-5 where the same pixels
    were cropped. Why a tolerance at all: a batched forward pass may
    use other matmul kernels / summation orders than a single-image one (float32, ~1e-6 relative); the prompts
    of different clips are padded to the longest, and padded text positions are masked, so they add nothing."""
    o = oracle()
    clips = all_clips(o)[:3]
    root = _tagged_root(tmp_path, o, clips)
    tags = from_table(root.read_shard("tag", 0), ClipTags)
    assert len(tags) == 3 and all(t.tags for t in tags)
    bad = dataclasses.replace(tags[1], clip_id="unreadable", video_path=str(tmp_path / "gone.mp4"))
    shard = tags[:1] + [bad] + tags[1:]  # batches of 3: [clip, unreadable, clip], [clip]

    def run(where, **kw):
        r = OutputRoot(str(tmp_path / where))
        write_stage(r, "tag", 0, shard)
        out = run_shard(STAGE, r, DetectConfig.model_validate({**PROFILES["tiny"], **kw}), 0)
        return out, from_table(r.read_shard("detect", 0), Instance)

    out1, single = run("single", batch_size=1, prefetch_depth=0)
    out3, batched = run("batched", batch_size=3, prefetch_depth=2, clip_batch_size=64)
    for out in (out1, out3):
        assert out.error == 1 and out.ok > 0  # the unreadable clip is one error row; the others succeed
    errors = [r for r in batched if r.status == "error"]
    assert [r.clip_id for r in errors] == ["unreadable"] and "gone.mp4" in errors[0].error
    assert [r.clip_id for r in single if r.status == "error"] == ["unreadable"]
    # rows come in the order of the clips, whatever the batching
    order = [t.clip_id for t in shard]
    assert sorted(order.index(r.clip_id) for r in batched) == [order.index(r.clip_id) for r in batched]
    for a, b in _match_rows(single, batched):
        if a.box_xyxy_px is None:
            assert a.instance_id == b.instance_id
            continue
        np.testing.assert_allclose(b.box_xyxy_px, a.box_xyxy_px, atol=1e-3)
        assert b.detection_score == pytest.approx(a.detection_score, abs=1e-4)
        assert (a.clip_score is None) == (b.clip_score is None)
        if a.clip_score is not None and _crop_edges(a.box_xyxy_px) == _crop_edges(b.box_xyxy_px):
            # same pixels cropped: only CLIP's own batching noise (measured ~2e-7 on unit vectors) is left. A box
            # edge within float noise of a whole pixel may crop one more row in one run; then the scores differ
            # legitimately and are not compared.
            assert b.clip_score == pytest.approx(a.clip_score, abs=1e-5)
        if rounded_box(a.box_xyxy_px) == rounded_box(b.box_xyxy_px):
            assert a.instance_id == b.instance_id


def test_prefetch_and_clip_batch_are_not_in_the_config_hash():
    base = DetectConfig()
    assert DetectConfig(prefetch_depth=0, clip_batch_size=7).config_hash() == base.config_hash()
    assert DetectConfig(batch_size=3).config_hash() != base.config_hash()  # as before: batch_size is hashed
    with pytest.raises(ValueError):
        DetectConfig(prefetch_depth=-1)
