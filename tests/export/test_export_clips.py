"""Clip files of the exports (iMOVE-IT, the MotionBench release) at scale: sources cut in parallel, and a clip
already in the folder from an earlier (or killed) export kept unless its source, span or file changed."""
from __future__ import annotations

import collections
import json
import os
import threading

import pytest

import stages.export.media as media
from stages.export.media import ClipSource, clip_index_path, write_clips
from tests._video_fixtures import make_testsrc, require_ffmpeg


@pytest.fixture()
def sources(tmp_path):
    require_ffmpeg()
    a = make_testsrc(tmp_path / "a.mp4", duration_s=3.0, gop=25)
    b = make_testsrc(tmp_path / "b.mp4", duration_s=3.0, gop=25)
    clips = [ClipSource(f"{p.stem}{i}.mp4", str(p), s, e)
             for p in (a, b) for i, (s, e) in enumerate([(0.0, 1.0), (1.2, 2.0), (2.0, 2.8)])]
    return a, b, clips


@pytest.fixture()
def counted(monkeypatch):
    """Real cuts and keyframe look-ups, counted by clip name and by source."""
    calls = {"cut": collections.Counter(), "keyframes": collections.Counter()}
    real_cut, real_keys = media.cut_clip, media.keyframe_times

    def cut(src, dst, *a, **kw):
        calls["cut"][os.path.basename(dst)] += 1
        return real_cut(src, dst, *a, **kw)

    def keys(src):
        calls["keyframes"][os.path.basename(src)] += 1
        return real_keys(src)

    monkeypatch.setattr(media, "cut_clip", cut)
    monkeypatch.setattr(media, "keyframe_times", keys)
    return calls


def test_a_second_export_cuts_only_what_changed(sources, counted, tmp_path):
    a, b, clips = sources
    out = tmp_path / "export" / "videos"
    done, errors = write_clips(clips, out, workers=2)
    assert errors == {} and set(done) == {c.name for c in clips} and set(done.values()) <= {"copy", "reencode"}
    assert counted["cut"] == {c.name: 1 for c in clips}
    assert counted["keyframes"] == {"a.mp4": 1, "b.mp4": 1}  # once per source, not per clip
    assert sorted(p.name for p in out.iterdir()) == sorted(c.name for c in clips)  # the index lies outside
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    counted["cut"].clear()
    again, errors = write_clips(clips, out, workers=2)
    assert (again, errors, sum(counted["cut"].values())) == (done, {}, 0)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    moved = [ClipSource("a1.mp4", str(a), 1.0, 2.0) if c.name == "a1.mp4" else c for c in clips]  # a new span
    (out / "b2.mp4").unlink()  # a clip file gone
    with open(clip_index_path(out), "a") as f:
        f.write('{"name": "a0.mp4", "src"')  # a line cut by a crash: ignored
    write_clips(moved, out, workers=2)
    assert counted["cut"] == {"a1.mp4": 1, "b2.mp4": 1}

    counted["cut"].clear()
    st = os.stat(b)
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the source re-written
    write_clips(moved, out, workers=2)
    assert counted["cut"] == {"b0.mp4": 1, "b1.mp4": 1, "b2.mp4": 1}
    lines = [json.loads(x) for x in clip_index_path(out).read_text().splitlines()]
    assert sorted(x["name"] for x in lines) == sorted(c.name for c in clips)  # one line per clip, no stale ones


def test_a_clip_that_failed_is_cut_on_the_next_export_and_the_others_are_kept(sources, monkeypatch, tmp_path):
    a, b, clips = sources
    out = tmp_path / "videos"
    real_cut = media.cut_clip

    def failing(src, dst, *a, **kw):
        if os.path.basename(dst) == "b1.mp4":
            raise media.ClipCutError("ffmpeg exit 1 (as if killed)")
        return real_cut(src, dst, *a, **kw)

    monkeypatch.setattr(media, "cut_clip", failing)
    done, errors = write_clips(clips, out, workers=2)
    assert list(errors) == ["b1.mp4"] and len(done) == 5
    cut = []
    monkeypatch.setattr(media, "cut_clip", lambda src, dst, *a, **kw: cut.append(os.path.basename(dst))
                        or real_cut(src, dst, *a, **kw))
    done, errors = write_clips(clips, out, workers=2)
    assert (cut, errors, len(done)) == (["b1.mp4"], {}, 6)


def test_sources_are_cut_at_the_same_time(monkeypatch, tmp_path):
    """Two sources, two workers: each source's first cut waits for the other's (a barrier), which only
    returns when both run at once; one after the other, the barrier would break after 60 s."""
    barrier = threading.Barrier(2, timeout=60)
    names = []

    def cut(src, dst, start_s, end_s, keyframes):
        barrier.wait()
        names.append(os.path.basename(dst))
        open(dst, "wb").close()
        return "copy"

    monkeypatch.setattr(media, "cut_clip", cut)
    monkeypatch.setattr(media, "keyframe_times", lambda src: [0.0])
    srcs = []
    for name in ("x.mp4", "y.mp4"):
        (tmp_path / name).write_bytes(b"not read by the stand-in")
        srcs.append(str(tmp_path / name))
    done, errors = write_clips([ClipSource(f"{i}.mp4", s, 0.0, 1.0) for i, s in enumerate(srcs)], tmp_path / "v",
                               workers=2)
    assert errors == {} and sorted(names) == ["0.mp4", "1.mp4"] and done == {"0.mp4": "copy", "1.mp4": "copy"}
