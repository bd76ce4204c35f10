"""track stage: trajectories on synthetic videos with a ground-truth tracker, frame mapping, errors, tiny SAMURAI."""
from __future__ import annotations

import dataclasses
import types

import pytest

from experts.samurai import TrackPoint
from schemas._base import from_table
from schemas.instances import Instance
from schemas.tracks import SCHEMA, Track
from stages.base import install_expert_override
from stages.imove_it.detect import CLIP_EXPERT, DETECTOR_EXPERT, DetectConfig
from stages.imove_it.detect import STAGE as DETECT_STAGE
from stages.runner import run_shard
from stages.imove_it.tag import STAGE as TAG_STAGE
from stages.imove_it.tag import TAGGER_EXPERT, TagConfig
from stages.imove_it.track import PROFILES, STAGE, TRACKER_EXPERT, TrackConfig, _Recorder, track_rows
from storage.root import OutputRoot
from tests._imove_doubles import all_clips, oracle, video_of
from tests._stage_tables import write_stage


def detected_root(tmp_path, o, clips) -> OutputRoot:
    root = OutputRoot(str(tmp_path / "out"))
    write_stage(root, "scenes", 0, clips)
    install_expert_override(TAGGER_EXPERT, o.tagger())
    install_expert_override(DETECTOR_EXPERT, o.detector())
    install_expert_override(CLIP_EXPERT, o.clip())
    run_shard(TAG_STAGE, root, TagConfig(), 0)
    run_shard(DETECT_STAGE, root, DetectConfig(), 0)
    return root


def test_track_follows_ground_truth_at_the_configured_fps(tmp_path):
    o = oracle()
    clips = all_clips(o)
    root = detected_root(tmp_path, o, clips)
    install_expert_override(TRACKER_EXPERT, o.tracker())
    cfg = TrackConfig(fps=12.5)  # every other frame of the 25 fps videos
    out = run_shard(STAGE, root, cfg, 0)
    table = root.read_shard("track", 0)
    assert table.schema.equals(SCHEMA, check_metadata=False)
    instances = [i for i in from_table(root.read_shard("detect", 0), Instance) if i.status == "ok"]
    tracks = {t.instance_id: t for t in from_table(table, Track)}
    assert out.error == 0 and set(tracks) == {i.instance_id for i in instances}
    n_clips_with_instances = len({i.clip_id for i in instances})
    assert o.calls["track"] == n_clips_with_instances  # all instances of a clip in one tracker call
    for inst in instances:
        t = tracks[inst.instance_id]
        v = video_of(o, inst.video_path)
        clip = next(c for c in clips if c.clip_id == inst.clip_id)
        expected_frames = list(range(clip.start_frame, clip.end_frame, 2))
        assert [p["frame_index"] for p in t.points] == expected_frames
        assert [p["t_s"] for p in t.points] == pytest.approx([f / v.truth.fps for f in expected_frames])
        obj = next(ob for ob, b in v.objects_at(clip.start_frame) if b == inst.box_xyxy_px)
        for p in t.points:
            assert p["box_xyxy_px"] == v.box(obj, p["frame_index"])
            assert p["visible"] == (p["box_xyxy_px"] is not None)
        assert t.points[0]["box_xyxy_px"] == inst.box_xyxy_px == t.first_box_xyxy_px
        assert (t.label, t.start_s, t.end_s, t.track_fps) == (inst.label, inst.start_s, inst.end_s, 12.5)
        assert t.num_frames == len(expected_frames) and t.num_visible == sum(p["visible"] for p in t.points)
    assert run_shard(STAGE, root, cfg, 0).action == "skipped-complete"


def test_track_rows_map_positions_to_source_frames_and_scale_boxes():
    inst = Instance(instance_id="i1", clip_id="c", video_id="v", video_path="/v.mp4", start_frame=10, end_frame=20,
                    start_s=1.0, end_s=2.0, duration_s=1.0, width=640, height=480, label="dog",
                    box_xyxy_px=[10.0, 10.0, 50.0, 50.0])
    rec = _Recorder([types.SimpleNamespace(index=10 + 3 * k, t_s=1.0 + 0.3 * k, image=None) for k in range(3)], None)
    rec.size = (320, 240)
    list(iter(rec))
    pts = [TrackPoint("i1", 2, None, (1.0, 2.0, 3.0, 4.0), 4, 1.0, 0.5, True),
           TrackPoint("i1", 0, None, (5.0, 5.0, 25.0, 25.0), 300, 2.0, None, True),
           TrackPoint("i1", 1, None, None, 0, -3.0, 0.1, False)]
    (row,) = track_rows([inst], pts, rec, 2.0, 3.3)
    assert [p["frame_index"] for p in row.points] == [10, 13, 16]
    assert row.points[0]["box_xyxy_px"] == [10.0, 10.0, 50.0, 50.0] and row.points[0]["mask_area_px"] == 1200
    assert row.points[1]["box_xyxy_px"] is None and row.num_visible == 2
    with pytest.raises(RuntimeError, match="not prompted"):
        track_rows([inst], [dataclasses.replace(pts[0], instance_id="other")], rec, 1.0, None)


def test_unreadable_video_gives_error_rows_per_instance(tmp_path):
    o = oracle()
    root = detected_root(tmp_path, o, all_clips(o)[:1])
    ok = [i for i in from_table(root.read_shard("detect", 0), Instance) if i.status == "ok"]
    moved = [dataclasses.replace(i, video_path=str(tmp_path / "moved.mp4"), stage="", expert="", config_hash="",
                                 created_at=None) for i in ok]
    root2 = OutputRoot(str(tmp_path / "out2"))
    write_stage(root2, "detect", 0, moved)
    install_expert_override(TRACKER_EXPERT, o.tracker())
    out = run_shard(STAGE, root2, TrackConfig(), 0)
    rows = from_table(root2.read_shard("track", 0), Track)
    assert out.error == len(ok) == len(rows) and all("moved.mp4" in r.error for r in rows)


def test_tiny_profile_with_real_tiny_samurai(tmp_path):
    o = oracle()
    root = detected_root(tmp_path, o, all_clips(o)[:1])
    cfg = TrackConfig.model_validate({**PROFILES["tiny"], "max_frames": 3})
    out = run_shard(STAGE, root, cfg, 0)
    table = root.read_shard("track", 0)
    assert table.schema.equals(SCHEMA, check_metadata=False)
    n_inst = sum(1 for i in from_table(root.read_shard("detect", 0), Instance) if i.status == "ok")
    rows = from_table(table, Track)
    assert out.error == 0 and len(rows) == n_inst > 0
    for r in rows:
        assert r.num_frames == 3 and [p["frame_index"] for p in r.points] == sorted(p["frame_index"] for p in r.points)
        assert r.points[0]["t_s"] == pytest.approx(r.start_s, abs=1e-3)


class _EchoTracker:
    """Reports each prompt box unchanged on every frame; records what it was given."""

    def __init__(self):
        self.prompts, self.shapes = [], []

    def track(self, frames, prompts, timestamps_s=None, return_masks=False):
        self.prompts.append(list(prompts))
        out = []
        for pos, f in enumerate(frames):
            self.shapes.append(f.image.shape)
            for iid, b in prompts:
                out.append(TrackPoint(iid, pos, None, tuple(b), int((b[2] - b[0]) * (b[3] - b[1])), 1.0, None, True))
        return out


def test_short_side_decoding_maps_boxes_back_to_full_size_pixels(tmp_path):
    o = oracle()
    root = detected_root(tmp_path, o, all_clips(o)[:1])
    echo = _EchoTracker()
    install_expert_override(TRACKER_EXPERT, echo)
    run_shard(STAGE, root, TrackConfig(fps=5.0, short_side=120, max_frames=2), 0)
    inst = {i.instance_id: i for i in from_table(root.read_shard("detect", 0), Instance) if i.status == "ok"}
    assert set(s[:2] for s in echo.shapes) == {(120, 160)}
    assert {iid: list(b) for iid, b in echo.prompts[0]} == {k: [v / 2 for v in i.box_xyxy_px] for k, i in inst.items()}
    for t in from_table(root.read_shard("track", 0), Track):
        assert t.num_frames == 2
        for p in t.points:
            b = inst[t.instance_id].box_xyxy_px
            assert p["box_xyxy_px"] == b
            assert p["mask_area_px"] == pytest.approx((b[2] - b[0]) * (b[3] - b[1]), abs=4)


def test_prefetched_frames_give_the_same_tracks_and_isolate_an_unreadable_clip(tmp_path):
    """The ground-truth tracker (it identifies every frame it is given by its pixels, so a frame from the wrong
    clip or position would show) over 2 clips and, between them, a clip whose video is gone: frames decoded
    inline versus 4 frames ahead on the prefetch thread, across clip boundaries. The tracker sees the same
    frames in the same order either way, so the rows are equal exactly. (The real tiny SAMURAI runs with the
    default prefetch in test_tiny_profile_with_real_tiny_samurai; at ~1 s per frame on CPU it is too slow to
    run twice here.)"""
    o = oracle()
    root = detected_root(tmp_path, o, all_clips(o)[:2])
    inst = [i for i in from_table(root.read_shard("detect", 0), Instance) if i.status == "ok"]
    clip_ids = sorted({i.clip_id for i in inst})
    assert len(clip_ids) == 2
    gone = [dataclasses.replace(i, clip_id=clip_ids[0] + "~gone", instance_id=i.instance_id + "-gone",
                                video_path=str(tmp_path / "gone.mp4"), stage="", expert="", config_hash="",
                                created_at=None) for i in inst if i.clip_id == clip_ids[0]]  # sorts second

    def run(where, depth):
        r = OutputRoot(str(tmp_path / where))
        write_stage(r, "detect", 0, inst + gone)
        install_expert_override(TRACKER_EXPERT, o.tracker())
        out = run_shard(STAGE, r, TrackConfig(fps=5.0, max_frames=3, prefetch_frames=depth), 0)
        return out, from_table(r.read_shard("track", 0), Track)

    out0, inline = run("inline", 0)
    out4, ahead = run("ahead", 4)
    for out in (out0, out4):
        assert out.error == len(gone) and out.ok == len(inst)
    strip = lambda rows: [(r.instance_id, r.status, r.error, r.num_frames, r.points) for r in rows]  # noqa: E731
    assert strip(ahead) == strip(inline)
    assert all(r.num_frames == 3 for r in ahead if r.status == "ok")
    assert all("gone.mp4" in r.error for r in ahead if r.status == "error")
    assert TrackConfig(prefetch_frames=0).config_hash() == TrackConfig().config_hash()
