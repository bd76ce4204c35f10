"""Synthetic videos: reproducible bytes, decodable, and ground truth that matches the pixels."""
from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from stages.synth.videos import (
    COLORS,
    SynthConfig,
    load_truth,
    render_dataset,
    render_frames,
    render_video,
    video_seed,
)

av = pytest.importorskip("av")

# Smaller frames for the checks that need many videos; the default size is exercised by the encode tests.
SMALL = SynthConfig(width=160, height=120, object_size_px=(16, 24), min_duration_s=2.4, max_duration_s=3.2)


def _decode(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """The same seed rendered twice into different folders, and a second seed."""
    root = tmp_path_factory.mktemp("synth")
    cfg = SynthConfig(min_shots=2, max_shots=3)
    a = root / "a" / "v.mp4"
    b = root / "b" / "v.mp4"
    c = root / "c" / "v.mp4"
    truth_a = render_video(a, 11, cfg)
    truth_b = render_video(b, 11, cfg)
    truth_c = render_video(c, 12, cfg)
    return cfg, (a, truth_a), (b, truth_b), (c, truth_c)


def _why_bytes_differ(cfg, a, b) -> str:
    """Where two encodes of one seed part: the decoded pixels (so the rendered frames or the encoder's choices
    differ) or only the container bytes; and whether rendering the seed again is stable in this process."""
    da, db = _decode(a), _decode(b)
    if da.shape != db.shape:
        decoded = f"decoded shapes differ: {da.shape} vs {db.shape}"
    else:
        bad = np.flatnonzero((da != db).reshape(len(da), -1).any(axis=1))
        decoded = (f"decoded frames differ at {bad[:10].tolist()} of {len(da)}, {int((da != db).sum())} values"
                   if len(bad) else "decoded frames identical: only the container/stream bytes differ")
    _, f1 = render_frames(11, cfg)
    _, f2 = render_frames(11, cfg)
    rendered = "re-rendered frames identical" if np.array_equal(f1, f2) else \
        f"re-rendered frames differ in {int((f1 != f2).sum())} values"
    sizes = f"sizes {a.stat().st_size} vs {b.stat().st_size}"
    return f"{decoded}; {rendered}; {sizes}"


def test_same_seed_gives_identical_bytes(encoded):
    cfg, (a, ta), (b, tb), _ = encoded
    if a.read_bytes() != b.read_bytes():
        pytest.fail("same seed, different bytes: " + _why_bytes_differ(cfg, a, b))
    assert a.with_suffix(".json").read_bytes() == b.with_suffix(".json").read_bytes()
    assert ta == tb


RENDER_SEED_11 = """
import hashlib, sys
from stages.synth.videos import SynthConfig, render_video
render_video(sys.argv[1], 11, SynthConfig(min_shots=2, max_shots=3))
print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())
"""


def test_same_seed_gives_identical_bytes_whatever_the_heap_held(encoded, tmp_path):
    """The encoder must not read memory it never wrote. glibc's MALLOC_PERTURB_ fills every allocation with a
    chosen byte, standing in for whatever an earlier task left in a long-lived worker's heap (libx264's
    macroblock-tree rate control read such memory at 320x240, so the same seed gave other bytes, now and then,
    late in a test process). Off glibc the variable does nothing and the renders simply agree."""
    import hashlib
    import os
    import subprocess
    import sys
    from pathlib import Path

    _, (a, _), _, _ = encoded
    repo = Path(__file__).resolve().parents[2]
    want = hashlib.sha256(a.read_bytes()).hexdigest()
    for byte in ("1", "77", "200"):
        env = dict(os.environ, PYTHONPATH=str(repo), MALLOC_PERTURB_=byte)
        out = tmp_path / f"perturb{byte}" / "v.mp4"
        proc = subprocess.run([sys.executable, "-c", RENDER_SEED_11, str(out)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.split()[-1] == want, f"MALLOC_PERTURB_={byte}: " + _why_bytes_differ(encoded[0], a, out)


def test_different_seeds_differ(encoded):
    _, (a, ta), _, (c, tc) = encoded
    assert a.read_bytes() != c.read_bytes()
    assert ta.to_json_dict()["objects"] != tc.to_json_dict()["objects"]


def test_decoded_video_matches_truth_and_rendered_frames(encoded):
    cfg, (path, truth), _, _ = encoded
    frames = _decode(path)
    assert frames.shape == (truth.num_frames, cfg.height, cfg.width, 3)
    assert cfg.min_duration_s * cfg.fps - 1 <= truth.num_frames <= cfg.max_duration_s * cfg.fps + 1
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert (s.codec_context.name, s.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert s.average_rate == cfg.fps
        keyframes = sorted(round(p.pts * p.time_base * cfg.fps) for p in c.demux(s) if p.size and p.is_keyframe)
    # Fixed GOP: keyframes exactly every gop_frames frames (no scene-cut keyframes at the cuts).
    assert keyframes == list(range(0, truth.num_frames, cfg.gop_frames))
    _, raw = render_frames(truth.seed, cfg)
    mse = np.mean((raw.astype(np.float64) - frames) ** 2)
    assert 10 * np.log10(255**2 / mse) > 30, "decoded video is far from the rendered frames"


def test_json_round_trip(encoded):
    _, (path, truth), _, _ = encoded
    data = json.loads(path.with_suffix(".json").read_text())
    assert data["version"] == 1 and data["video"] == "v.mp4"
    for key in ("seed", "width", "height", "fps", "num_frames", "cuts", "shots", "objects", "events"):
        assert key in data
    assert load_truth(path.with_suffix(".json")) == truth
    data["version"] = 99
    bad = path.parent / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="version"):
        load_truth(bad)


def _colour_match(pixels: np.ndarray, rgb) -> np.ndarray:
    """Pixels whose colour direction is within ~8 degrees of the object's base colour (the texture only
    scales the base colour, so the direction survives shading)."""
    p = pixels.reshape(-1, 3).astype(np.float64) + 1.0
    c = np.asarray(rgb, dtype=np.float64) + 1.0
    cos = p @ c / (np.linalg.norm(p, axis=1) * np.linalg.norm(c))
    return cos > np.cos(np.deg2rad(8))


def test_boxes_cover_the_object_colour_in_decoded_frames(encoded):
    cfg, (path, truth), _, _ = encoded
    frames = _decode(path)
    checked = 0
    for obj in truth.objects:
        vis = dict((int(f), v) for f, v in obj.visibility)
        best = max(vis.values())
        good = [b for b in obj.boxes if vis[b[0]] >= min(0.95, best) and vis[b[0]] >= 0.8]
        assert good, f"object {obj.object_id} is never clearly visible"
        for f, x1, y1, x2, y2 in good[:: max(1, len(good) // 4)]:
            frame = frames[f]
            inside = np.zeros(frame.shape[:2], dtype=bool)
            inside[y1:y2, x1:x2] = True
            frac_in = _colour_match(frame[inside], obj.rgb).mean()
            frac_out = _colour_match(frame[~inside], obj.rgb).mean()
            assert frac_in > 0.35, (obj.object_id, f, frac_in)
            assert frac_in > 4 * frac_out, (obj.object_id, f, frac_in, frac_out)
            # The box is tight: a 3-px band inside each border holds object-coloured pixels (the 1-px dark
            # outline itself loses its chroma to 4:2:0 subsampling).
            bands = (frame[y1 : y1 + 3, x1:x2], frame[y2 - 3 : y2, x1:x2], frame[y1:y2, x1 : x1 + 3], frame[y1:y2, x2 - 3 : x2])
            for edge in bands:
                assert _colour_match(edge, obj.rgb).any(), (obj.object_id, f, "box not tight")
            checked += 1
    assert checked >= 4


def _frame_diffs(frames: np.ndarray) -> np.ndarray:
    f = frames.astype(np.float32)
    return np.abs(f[1:] - f[:-1]).mean(axis=(1, 2, 3))  # diffs[i] = |frame i+1 - frame i|


def test_cuts_are_the_largest_frame_differences(encoded):
    _, (path, truth), _, (path_c, truth_c) = encoded
    for p, t in ((path, truth), (path_c, truth_c)):
        assert t.cuts, "config asks for >= 2 shots"
        assert [s.start_frame for s in t.shots[1:]] == t.cuts
        diffs = _frame_diffs(_decode(p))
        at_cuts = diffs[[c - 1 for c in t.cuts]]
        others = np.delete(diffs, [c - 1 for c in t.cuts])
        assert at_cuts.min() > 2 * others.max(), (at_cuts, others.max())


def test_scenedetect_finds_the_recorded_cuts(encoded):
    scenedetect = pytest.importorskip("scenedetect")
    _, (path, truth), _, _ = encoded
    scenes = scenedetect.detect(str(path), scenedetect.ContentDetector(threshold=27.0, min_scene_len=15))
    found = [s[0].frame_num for s in scenes[1:]]
    assert found == truth.cuts


def test_pan_scrolls_background_by_recorded_speed():
    cfg = SMALL.model_copy(update={"static_camera_probability": 0.0, "too_large_probability": 0.0})
    truth, frames = render_frames(5, cfg)
    h, w = cfg.height, cfg.width
    # Pixels an object or a wall could touch anywhere in the video are left out of the comparison.
    busy = np.zeros((h, w), dtype=bool)
    for o in truth.objects:
        for _, x1, y1, x2, y2 in o.boxes:
            busy[max(0, y1 - 2) : y2 + 2, max(0, x1 - 2) : x2 + 2] = True
        if o.motion.walls_x_px:
            lo, hi = o.motion.walls_x_px
            busy[:, max(0, lo - 8) : lo + 1] = True
            busy[:, hi : hi + 8] = True
    for shot in truth.shots:
        pan = shot.camera_pan
        assert pan.direction != "none" and pan.speed_px_per_frame >= 1
        s = int(pan.speed_px_per_frame)
        t = shot.start_frame
        a, b = frames[t].astype(int), frames[t + 1].astype(int)
        # Camera moves right => content moves left: b[y, x] == a[y, x + s].
        dy, dx = {"left": (0, -s), "right": (0, s), "up": (-s, 0), "down": (s, 0)}[pan.direction]
        ys, xs = np.nonzero(~busy)
        ys2, xs2 = ys + dy, xs + dx
        ok = (ys2 >= 0) & (ys2 < h) & (xs2 >= 0) & (xs2 < w) & ~busy[np.clip(ys2, 0, h - 1), np.clip(xs2, 0, w - 1)]
        same = (b[ys[ok], xs[ok]] == a[ys2[ok], xs2[ok]]).all(axis=1).mean()
        wrong_way = (b[ys[ok], xs[ok]] == a[np.clip(ys - dy, 0, h - 1)[ok], np.clip(xs - dx, 0, w - 1)[ok]]).all(axis=1).mean()
        assert same > 0.99 and wrong_way < 0.9, (shot, same, wrong_way)


def _centres(obj) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    b = np.array(obj.boxes, dtype=float)
    return b[:, 0].astype(int), (b[:, 1] + b[:, 3]) / 2, (b[:, 2] + b[:, 4]) / 2


def _bounces_from_boxes(obj) -> list[int]:
    frames, cx, _ = _centres(obj)
    v = np.diff(cx)
    moving = [(int(frames[i + 1]), np.sign(d)) for i, d in enumerate(v) if d != 0]
    return [f for (f, s), (_, s0) in zip(moving[1:], moving[:-1]) if s != s0]


def _hops_from_boxes(obj) -> int:
    b = np.array(obj.boxes)
    base = b[0, 2]
    up = b[:, 2] < base - 1
    return int(np.sum(up[1:] & ~up[:-1]) + up[0])


def test_repetitions_static_and_linear_motion_match_boxes():
    seen = set()
    for seed in range(8):
        truth, _ = render_frames(seed, SMALL)
        assert len({o.color for o in truth.objects}) == len(truth.objects)
        for o in truth.objects:
            m = o.motion
            assert o.rgb == list(COLORS[o.color])
            assert len(o.boxes) == len(o.visibility)
            seen.add(m.type)
            if m.type == "bounce":
                hits = _bounces_from_boxes(o)
                assert len(hits) == m.repetitions >= 1
                assert m.repetition_frames == [e.start_frame for e in truth.events if e.object_id == o.object_id]
                for got, want in zip(hits, m.repetition_frames):
                    assert want <= got <= want + 1
                x1 = min(b[1] for b in o.boxes)
                x2 = max(b[3] for b in o.boxes)
                assert m.walls_x_px[0] <= x1 and x2 <= m.walls_x_px[1] + 1
            elif m.type == "jump":
                assert _hops_from_boxes(o) == m.repetitions >= 1
                assert len(m.repetition_spans) == m.repetitions
            elif m.type == "static":
                assert o.static and len({tuple(b[1:]) for b in o.boxes}) == 1
            elif m.type == "linear":
                frames, cx, cy = _centres(o)
                dx, dy = cx[-1] - cx[0], cy[-1] - cy[0]
                want = {"right": dx > 10, "left": dx < -10, "down": dy > 10, "up": dy < -10}
                assert want[m.direction] and abs(dx if m.direction in ("up", "down") else dy) < 1
                # Motion only between start_frame and end_frame.
                moving = frames[1:][np.abs(np.diff(cx)) + np.abs(np.diff(cy)) > 0]
                assert moving.min() >= m.start_frame + 1 and moving.max() <= m.end_frame
    assert {"bounce", "jump", "static", "linear", "sequence"} <= seen


def test_sequence_events_in_order_and_distinct():
    for seed in range(4):
        truth, _ = render_frames(seed, SMALL)
        (seq,) = [o for o in truth.objects if o.motion.type == "sequence"]
        events = [e for e in truth.events if e.object_id == seq.object_id]
        assert [e.name for e in events] == seq.motion.actions and len(set(seq.motion.actions)) == 2
        assert events[0].end_frame < events[1].start_frame
        assert seq.category in ("box", "star", "kite", "car")  # rotation visible from the outline
        starts = [e.start_frame for e in truth.events]
        assert starts == sorted(starts)


def test_too_large_object_is_flagged_and_confined_to_one_shot():
    cfg = SMALL.model_copy(update={"too_large_probability": 1.0, "min_shots": 2})
    truth, frames = render_frames(3, cfg)
    (big,) = [o for o in truth.objects if o.too_large]
    assert big.static and big.z_order == 0
    frames_present = [b[0] for b in big.boxes]
    shot = next(s for s in truth.shots if s.start_frame <= frames_present[0] <= s.end_frame)
    assert frames_present == list(range(shot.start_frame, shot.end_frame + 1))
    for _, x1, y1, x2, y2 in big.boxes:
        assert (x2 - x1) * (y2 - y1) > 0.6 * cfg.width * cfg.height
    normal = [o for o in truth.objects if not o.too_large]
    for o in normal:
        assert max((b[3] - b[1]) * (b[4] - b[2]) for b in o.boxes) < 0.1 * cfg.width * cfg.height
    no_big, _ = render_frames(3, SMALL.model_copy(update={"too_large_probability": 0.0}))
    assert not any(o.too_large for o in no_big.objects)


def test_render_dataset_names_and_resume(tmp_path):
    paths = render_dataset(tmp_path, 2, 7, SMALL)
    assert [p.name for p in paths] == ["synth_7_0.mp4", "synth_7_1.mp4"]
    for i, p in enumerate(paths):
        truth = load_truth(p.with_suffix(".json"))
        assert truth.video == p.name and truth.seed == video_seed(7, i)
    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert render_dataset(tmp_path, 2, 7, SMALL) == paths
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_config_errors_say_what_to_change():
    with pytest.raises(ValueError, match="even"):
        SynthConfig(width=321)
    with pytest.raises(ValueError, match="min_shots"):
        SynthConfig(min_duration_s=1.0, max_duration_s=2.0, min_shots=3)
    with pytest.raises(ValueError, match=".mp4"):
        render_video("x.avi", 0, SMALL)
    cfg = SynthConfig()
    with pytest.raises(ValidationError):
        cfg.width = 10  # frozen
