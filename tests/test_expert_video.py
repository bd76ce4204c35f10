"""experts.video: probing, bad-file reasons, rotation, VFR timestamps, sampling, streaming memory."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from experts.video import Frame, VideoProbeError, first_frame, iter_frames, probe, read_frames
from tests._video_fixtures import (bikes_path, decode_with_ffmpeg, ffmpeg, make_rotated, make_testsrc, make_vfr,
                                   require_ffmpeg)

VFR_TIMES = [0.0, 0.04, 0.08, 0.12, 0.16, 0.2, 0.4, 0.6, 0.8, 1.0, 1.5, 2.0]


@pytest.fixture(scope="module")
def vids(tmp_path_factory) -> dict[str, Path]:
    require_ffmpeg()
    d = tmp_path_factory.mktemp("videos")
    plain = make_testsrc(d / "plain.mp4", width=64, height=32, rate=10, duration_s=1.0)
    out = {
        "plain": plain,
        "rot90": make_rotated(d / "rot90.mp4", plain, 90),
        "vfr": make_vfr(d / "vfr.mp4", VFR_TIMES),
        "faststart": make_testsrc(d / "fs.mp4", width=96, height=64, rate=25, duration_s=4.0, gop=25, faststart=True),
        "with_audio": make_testsrc(d / "av.mp4", width=64, height=48, duration_s=1.0, audio=True),
    }
    ffmpeg("-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac", str(d / "audio_only.m4a"))
    out["audio_only"] = d / "audio_only.m4a"
    return out


def test_probe_real_footage():
    p = probe(bikes_path())
    assert (p.width, p.height, p.fps, p.frame_count, p.codec) == (640, 272, 25.0, 250, "h264")
    assert p.duration_s == pytest.approx(10.0, abs=0.05)
    assert p.rotation_deg == 0 and p.has_video_stream and not p.has_audio_stream
    assert p.size_bytes == os.path.getsize(bikes_path())


def test_probe_audio_flag(vids):
    assert probe(vids["with_audio"]).has_audio_stream


def test_rotated_video_comes_out_upright(vids):
    p = probe(vids["rot90"])
    assert p.rotation_deg == 90
    assert (p.width, p.height) == (32, 64)  # coded 64x32, displayed portrait
    img = first_frame(vids["rot90"])
    assert img.shape == (64, 32, 3) and img.dtype == np.uint8
    # The ffmpeg CLI applies the display matrix itself: our upright frame must match its output.
    ref = np.frombuffer(decode_with_ffmpeg(vids["rot90"], 32, 64), np.uint8).reshape(64, 32, 3)
    assert np.abs(img.astype(int) - ref).mean() < 2.0
    unrotated = first_frame(vids["plain"])
    assert np.abs(img.astype(int) - ref).mean() < np.abs(np.rot90(unrotated, -1).astype(int) - ref).mean()
    # A requested size is in display orientation.
    assert first_frame(vids["rot90"], size=(16, 40)).shape == (40, 16, 3)


def test_variable_frame_rate_timestamps(vids):
    frames = read_frames(vids["vfr"])
    assert [f.index for f in frames] == list(range(len(VFR_TIMES)))
    np.testing.assert_allclose([f.t_s for f in frames], VFR_TIMES, atol=1e-3)
    # 5 fps targets 0, 0.2, 0.4, ...: nearest real frame, each source frame at most once.
    sampled = read_frames(vids["vfr"], fps=5)
    # 1.2 s -> 1.0 (already given), 1.4 and 1.6 -> 1.5, 1.8 and 2.0 -> 2.0.
    np.testing.assert_allclose([f.t_s for f in sampled], [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.5, 2.0], atol=1e-3)
    # Seeking into a VFR stream still reports the true source index (counted, not pts * fps).
    later = read_frames(vids["vfr"], start_s=0.5)
    assert [f.index for f in later] == [7, 8, 9, 10, 11]
    np.testing.assert_allclose([f.t_s for f in later], VFR_TIMES[7:], atol=1e-3)


def test_span_every_frame_matches_decoding_from_start():
    path = bikes_path()
    span = read_frames(path, start_s=2.0, end_s=4.0, short_side=64)
    assert [f.index for f in span] == list(range(50, 100))
    np.testing.assert_allclose([f.t_s for f in span], np.arange(50, 100) / 25.0, atol=1e-6)
    # Seek-then-decode-forward gives the same pixels as decoding from the start.
    from_start = {f.index: f.image for f in iter_frames(path, end_s=2.2, short_side=64)}
    for f in span[:5]:
        np.testing.assert_array_equal(f.image, from_start[f.index])
    assert all(isinstance(f, Frame) and f.image.shape == (64, 151, 3) for f in span)


def test_fps_and_num_frames_sampling():
    path = bikes_path()
    at5 = read_frames(path, start_s=2.0, end_s=4.0, fps=5, size=(80, 34))
    assert [f.index for f in at5] == list(range(50, 100, 5))
    assert all(f.image.shape == (34, 80, 3) for f in at5)
    n = read_frames(path, start_s=1.0, end_s=9.0, num_frames=8, size=(32, 16))
    assert len(n) == 8
    # Segment centres of [1, 9): 1.5, 2.5, ... 8.5 s.
    np.testing.assert_allclose([f.t_s for f in n], np.arange(8) + 1.5, atol=0.021)
    # The whole video, no end given.
    assert len(read_frames(path, num_frames=16, size=(32, 16))) == 16
    assert len(read_frames(path, fps=1, size=(32, 16))) == 10
    # A span shorter than num_frames frames still yields exactly num_frames (repeats).
    short = read_frames(path, start_s=5.0, end_s=5.1, num_frames=4, size=(32, 16))
    assert len(short) == 4 and {f.index for f in short} <= {125, 126, 127}


def test_first_frame_at_offset_and_bounds():
    path = bikes_path()
    img = first_frame(path, start_s=3.0, size=(64, 32))
    ref = read_frames(path, start_s=3.0, end_s=3.04, size=(64, 32))
    assert len(ref) == 1 and ref[0].index == 75
    np.testing.assert_array_equal(img, ref[0].image)
    with pytest.raises(VideoProbeError, match="past the end"):
        first_frame(path, start_s=60.0)
    with pytest.raises(ValueError, match="fps or num_frames"):
        read_frames(path, fps=2, num_frames=3)


def test_bad_files_have_distinct_reasons(vids, tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("these are meeting notes, not a video\n" * 20)
    data = vids["faststart"].read_bytes()
    trunc_fast = tmp_path / "trunc_faststart.mp4"
    trunc_fast.write_bytes(data[: len(data) // 2])  # index intact, media data cut
    plain = make_testsrc(tmp_path / "moov_at_end.mp4", width=96, height=64, duration_s=2.0)
    pdata = plain.read_bytes()
    trunc_moov = tmp_path / "trunc_moov.mp4"
    trunc_moov.write_bytes(pdata[: len(pdata) // 2])  # index (at the end) lost
    cases = {
        "missing": (tmp_path / "missing.mp4", "does not exist"),
        "empty": (empty, "empty"),
        "text": (text, "not a media file"),
        "audio": (vids["audio_only"], "audio-only"),
        "truncated_media": (trunc_fast, "truncated"),
        "truncated_index": (trunc_moov, "moov atom"),
        "directory": (tmp_path, "directory"),
    }
    reasons = {}
    for name, (path, expected) in cases.items():
        with pytest.raises(VideoProbeError) as info:
            probe(path)
        assert expected in info.value.reason, (name, info.value.reason)
        assert str(path) in str(info.value)
        reasons[name] = info.value.reason
    assert len(set(reasons.values())) == len(reasons), reasons
    # The reader refuses the same files with the same kind of reason.
    with pytest.raises(VideoProbeError, match="audio-only"):
        first_frame(vids["audio_only"])
    with pytest.raises(VideoProbeError, match="empty"):
        list(iter_frames(empty))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_unreadable_file(vids, tmp_path):
    locked = tmp_path / "locked.mp4"
    locked.write_bytes(vids["plain"].read_bytes())
    locked.chmod(0)
    with pytest.raises(VideoProbeError, match="permission denied"):
        probe(locked)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_memory_stays_flat_on_long_video(tmp_path):
    require_ffmpeg()
    # 60 s at 25 fps, 320x180: 1,500 frames, 259 MB of RGB if it were all held.
    path = make_testsrc(tmp_path / "long.mp4", width=320, height=180, rate=25, duration_s=60.0, gop=250)
    base = peak = 0
    count = 0
    total_bytes = 0
    for f in iter_frames(path):
        count += 1
        total_bytes += f.image.nbytes
        if count == 50:
            base = _rss_bytes()
        elif count > 50 and count % 25 == 0:
            peak = max(peak, _rss_bytes())
    assert count == 1500 and total_bytes > 250e6
    assert peak - base < 40e6, f"RSS grew by {(peak - base) / 1e6:.1f} MB while streaming"


@pytest.mark.parametrize("ext", ["ts", "mkv"])
def test_other_containers_seek_and_count(vids, tmp_path, ext):
    # MPEG-TS starts at a non-zero timestamp and its seeks can land after the target keyframe;
    # Matroska stores no frame count.
    path = tmp_path / f"clip.{ext}"
    ffmpeg("-i", str(vids["faststart"]), "-c", "copy", str(path))
    p = probe(path)
    assert (p.frame_count, p.fps) == (100, 25.0) and p.duration_s == pytest.approx(4.0, abs=0.05)
    span = read_frames(path, start_s=1.0, end_s=1.2)
    assert [f.index for f in span] == [25, 26, 27, 28, 29]
    np.testing.assert_allclose([f.t_s for f in span], [1.0, 1.04, 1.08, 1.12, 1.16], atol=1e-6)
    from_start = [f for f in iter_frames(path, end_s=1.2)][25:]
    for a, b in zip(span, from_start):
        np.testing.assert_array_equal(a.image, b.image)
