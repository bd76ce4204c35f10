"""``motionforge export imove-it``: clip-aligned media and the three trainer formats.

* ShareGPT (LLaMA-Factory): its REAL data code (llamafactory 0.9.5: dataset_info.json parser, loader, ShareGPT
  converter, the multimodal plugin's placeholder check and video reader) runs in a subprocess of
  .venv-consumers (tests/export/_llamafactory_load.py says exactly what runs and what is not LLaMA-Factory's).
* ms-swift: not checked beyond the shared ``messages`` + ``videos`` layout (no written contract, not installed).
* LLaVA-NeXT / LLaVA-Video and InternVL chat: not on the registry, so each is checked against its DOCUMENTED
  contract (shared/design/CONSUMERS.md sections 4 and 5) by readers written here from that text.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from schemas.captions import Caption
from stages.export.imove_it import FORMATS, export_samples, ok_rows
from stages.imove_it.tasks import TasksConfig, build_samples
from stages.shared.prompts import load_json_prompt
from stages.shared.relative_tokens import N_TIME
from storage.root import OutputRoot
from tests._cli import invoke
from tests._stage_tables import write_stage
from tests._video_fixtures import make_testsrc, require_ffmpeg

REPO = Path(__file__).resolve().parents[2]
CONSUMERS_PY = REPO / ".venv-consumers" / "bin" / "python"
FPS = 25
CLIPS = [("v0", 1.0, 3.0), ("v0", 3.48, 5.48), ("v1", 0.52, 2.52)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    require_ffmpeg()
    d = tmp_path_factory.mktemp("imove")
    src = {v: make_testsrc(d / f"{v}.mp4", width=96, height=64, rate=FPS, duration_s=6.0, gop=FPS) for v in ("v0", "v1")}
    templates = load_json_prompt("imove_it", "task_templates.v1")
    samples = []
    for i, (vid, s, e) in enumerate(CLIPS):
        cap = Caption(instance_id=f"inst{i}", clip_id=f"clip{i}", video_id=vid, video_path=str(src[vid]), label="box",
                      clip_start_s=s, clip_end_s=e, width=96, height=64, t1_s=s + 0.4, t2_s=e - 0.4,
                      box1_xyxy_px=[10.0, 10.0, 40.0, 30.0], box2_xyxy_px=[50.0, 20.0, 90.0, 60.0],
                      prompt_version="v1", frame_times_s=[s, e], static_caption="a box",
                      dynamic_caption="The box slides to the right")
        samples += build_samples(cap, TasksConfig(), templates)
    root = OutputRoot(d / "root")
    write_stage(root, "tasks", 0, samples)
    out = d / "export"
    res = invoke("export", "imove-it", "--out", str(d / "root"), "--to", str(out))
    assert f"wrote {len(samples)} iMOVE-IT samples over 3 clips" in " ".join(res.output.split())
    return d, src, samples, out


def _frames(path):
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="gray").astype(np.float32) for f in c.decode(video=0)]


def test_every_sample_names_its_cut_clip(run):
    d, src, samples, out = run
    by_id = {s.sample_id: s for s in samples}
    recs = [json.loads(l) for l in (out / "imove_it_internvl.jsonl").read_text().splitlines()]
    assert len(recs) == len(samples) == 9
    for rec in recs:
        s = by_id[rec["id"]]
        assert rec["video"] == f"videos/{s.clip_id}.mp4" and not os.path.isabs(rec["video"])
    for i, (vid, s, e) in enumerate(CLIPS):
        got = _frames(out / "videos" / f"clip{i}.mp4")
        whole = _frames(src[vid])
        assert len(got) == round((e - s) * FPS)  # the clip's duration, which the time tokens divide into 300
        for k in (0, len(got) - 1):
            diffs = [float(np.abs(got[k] - f).mean()) for f in whole]
            assert int(np.argmin(diffs)) == round(s * FPS) + k  # t=0 is the clip start, frame for frame
        # a time token points at the same picture in the cut file as in the source at clip_start + t
        smp = next(x for x in samples if x.clip_id == f"clip{i}")
        k1 = int(smp.t1_token / N_TIME * (e - s) * FPS)
        diffs = [float(np.abs(got[k1] - f).mean()) for f in whole]
        assert abs(int(np.argmin(diffs)) - (s + smp.t1_s) * FPS) <= (e - s) * FPS / N_TIME + 1


# -- LLaMA-Factory: its own code ------------------------------------------------------------------------------
def run_llamafactory(dataset_dir: Path, tmp: Path) -> dict:
    if not CONSUMERS_PY.exists():
        pytest.fail(f"{CONSUMERS_PY} missing: run scripts/setup_consumers.sh (scripts/setup.sh calls it)")
    env = dict(os.environ, HF_DATASETS_CACHE=str(tmp / "hf_cache"), HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(CONSUMERS_PY), str(Path(__file__).with_name("_llamafactory_load.py")), str(dataset_dir),
                           "motionforge_imove_it"], capture_output=True, text=True, env=env, timeout=600, cwd=str(tmp))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_llamafactory_loads_every_sample_from_a_moved_folder(run, tmp_path):
    d, src, samples, out = run
    moved = tmp_path / "elsewhere" / "imove"
    shutil.copytree(out, moved)
    got = run_llamafactory(moved, tmp_path)
    assert got["llamafactory_version"] == "0.9.5"
    assert got["examples"] == got["accepted"] == len(samples) and got["rejected"] == {}
    for f in got["frames"].values():
        assert Path(f["videos"][0]).parent == moved / "videos"  # media_dir join, not the CWD fallback
        # floor(duration x 2 fps) frames of a 2 s clip
        assert f["frames"] == [4] and f["durations"][0] == pytest.approx(2.0, abs=1.5 / FPS)


def test_llamafactory_rejects_a_placeholder_mismatch(run, tmp_path):
    """Its placeholder check is live: a sample with two <video> for one video is rejected (so the count above
    means something)."""
    d, src, samples, out = run
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    lines = (bad / "imove_it_sharegpt.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    rec["messages"][0]["content"] = "<video>" + rec["messages"][0]["content"]
    lines[0] = json.dumps(rec)
    (bad / "imove_it_sharegpt.jsonl").write_text("\n".join(lines) + "\n")
    got = run_llamafactory(bad, tmp_path)
    assert got["accepted"] == len(samples) - 1 and "does not match" in next(iter(got["rejected"].values()))


def test_sharegpt_records_one_video_tag_per_video(run):
    """The ``messages`` + ``videos`` layout, one ``<video>`` per listed video. ms-swift reads the same layout by
    its own description, but neither its code nor a written contract of it (CONSUMERS.md has none) is checked here."""
    d, src, samples, out = run
    for line in (out / "imove_it_sharegpt.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]
        text = "".join(m["content"] for m in rec["messages"])
        assert text.count("<video>") == len(rec["videos"]) == 1 and "<image>" not in text
        assert (out / rec["videos"][0]).is_file()


# -- LLaVA-NeXT / LLaVA-Video: documented contract (CONSUMERS.md 4) ---------------------------------------------
def llava_documented_reader(data_path: Path, video_folder: Path, video_fps: float = 1.0) -> list[dict]:
    """What LLaVA-NeXT's train.py does with a plain --data_path, as documented: a .json LIST of records; a record
    with 'image' is an image sample; 'video' joined to --video_folder; conversations human/gpt (a leading
    non-human turn dropped); exactly one '<image>' (the whole video) or the video's features are lost / shifted;
    frames = every round(native_fps / video_fps)-th frame (a step of 0 fails the sample)."""
    import av

    data = json.loads(data_path.read_text())
    assert isinstance(data, list)
    kept = []
    for rec in data:
        assert "image" not in rec and isinstance(rec["video"], str)
        conv = rec["conversations"]
        while conv and conv[0]["from"] != "human":
            conv = conv[1:]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        text = "".join(t["value"] for t in conv)
        if text.count("<image>") != 1 or "<video>" in text or not conv[0]["value"].startswith("<image>"):
            continue
        path = os.path.join(video_folder, rec["video"])
        if not os.path.isfile(path):
            continue
        with av.open(path) as c:
            st = c.streams.video[0]
            step = round(float(st.average_rate) / video_fps)
            n = sum(1 for _ in c.decode(video=0))
        if step == 0 or n == 0:
            continue
        kept.append({"id": rec["id"], "frames": len(range(0, n, step))})
    return kept


def test_llava_reader_keeps_every_sample_with_its_video(run, tmp_path):
    d, src, samples, out = run
    moved = tmp_path / "copy"
    shutil.copytree(out, moved)
    kept = llava_documented_reader(moved / "imove_it_llava.json", moved)
    assert len(kept) == len(samples) and all(k["frames"] == 2 for k in kept)  # 2 s at 1 frame/s


# -- InternVL chat: documented contract (CONSUMERS.md 5) -----------------------------------------------------
def internvl_documented_reader(meta_path: Path, n_frames: int = 8) -> list[dict]:
    """InternVL's fine-tuning data path as documented: a meta JSON {name: {root, annotation (.jsonl),
    data_augment, repeat_time}}; each line's 'video' joined to root; '<video>\\n' prepended to turn 1 if absent;
    only the exact '<video>\\n' becomes 'Frame-i: <image>' lines (one per sampled frame); no 'clip' span."""
    meta = json.loads(meta_path.read_text())
    out = []
    for name, ds in meta.items():
        assert ds["annotation"].endswith("jsonl") and isinstance(ds["data_augment"], bool)
        assert ds["repeat_time"] == 1
        for line in Path(ds["annotation"]).read_text().splitlines():
            rec = json.loads(line)
            assert "image" not in rec and "clip" not in rec
            conv = rec["conversations"]
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
            first = conv[0]["value"]
            if "<video>" not in first:
                first = "<video>\n" + first
            expanded = first.replace("<video>\n", "".join(f"Frame-{i + 1}: <image>\n" for i in range(n_frames)))
            if expanded.count("<image>") != n_frames or "<video>" in expanded:
                continue
            if any("<video>" in t["value"] or "<image>" in t["value"] for t in conv[1:]):
                continue
            if not os.path.isfile(os.path.join(ds["root"], rec["video"])):
                continue
            out.append(rec["id"])
    return out


def test_internvl_reader_keeps_every_sample(run):
    d, src, samples, out = run
    assert sorted(internvl_documented_reader(out / "imove_it_internvl_meta.json")) == sorted(s.sample_id for s in samples)
    for line in (out / "imove_it_internvl.jsonl").read_text().splitlines():
        first = json.loads(line)["conversations"][0]["value"]
        assert first.startswith("<video>\n") and first.count("<video>") == 1


def test_format_option_and_errors(run, tmp_path):
    d, src, samples, out = run
    invoke("export", "imove-it", "--out", str(d / "root"), "--to", str(tmp_path / "one"), "--format", "llava")
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [".videos.clips.jsonl", "imove_it_llava.json",
                                                                     "videos"]  # the index of clips cut
    rows = ok_rows(OutputRoot(d / "root").read_stage("tasks"))
    with pytest.raises(ValueError, match="unknown format"):
        export_samples(rows, tmp_path / "x", ["jsonl"])
    # a clip whose source is gone: its samples are left out and listed, the others written
    rows[0] = dict(rows[0], video_path=str(tmp_path / "gone.mp4"))
    gone = [r["sample_id"] for r in rows if r["clip_id"] == rows[0]["clip_id"]]
    for r in rows:
        if r["clip_id"] == rows[0]["clip_id"]:
            r["video_path"] = str(tmp_path / "gone.mp4")
    res = export_samples(rows, tmp_path / "partial", FORMATS)
    assert sorted(res.dropped) == sorted(gone) and res.samples == len(rows) - len(gone)
    err = json.loads((tmp_path / "partial" / "export_errors.json").read_text())
    assert sorted(err["samples_left_out"]) == sorted(gone)
    assert len(json.loads((tmp_path / "partial" / "imove_it_llava.json").read_text())) == res.samples
    # malformed turns: that sample is left out with its reason, the rest written
    ok = [r for r in rows if r["sample_id"] not in gone]
    bad = dict(ok[0], conversations=[{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}])
    res = export_samples([bad] + ok[1:], tmp_path / "bad", ["sharegpt"])
    assert res.samples == len(ok) - 1 and "alternate" in res.dropped[bad["sample_id"]]
    assert len((tmp_path / "bad" / "imove_it_sharegpt.jsonl").read_text().splitlines()) == len(ok) - 1


def test_export_from_a_root_reads_shard_by_shard_and_equals_the_list_export(run, tmp_path, monkeypatch):
    """From an output root the samples are read a shard at a time (twice: clips, then records) and never as a
    whole stage; every format's records are those of the same samples exported from a list (in shard order
    instead of sample-id order), and the LLaVA file is still one JSON list."""
    from flows.cli_imove import export_imove_it

    d, src, samples, out = run
    root = OutputRoot(tmp_path / "root")
    for shard in range(3):  # the nine samples over three shards, one clip each
        write_stage(root, "tasks", shard, [s for s in samples if s.clip_id == f"clip{shard}"])
    want = export_samples(ok_rows(root.read_stage("tasks")), tmp_path / "from_list")

    def whole(self, stage, schema=None):
        raise AssertionError(f"the export read all of {stage} at once")

    monkeypatch.setattr(OutputRoot, "read_stage", whole)
    got = export_imove_it(root.url, tmp_path / "from_root", workers=2)
    assert (got.samples, got.clips, got.dropped) == (want.samples, want.clips, want.dropped) == (9, 3, {})
    for fmt in FORMATS:
        a, b = got.files[fmt].read_text(), want.files[fmt].read_text()
        recs_a = json.loads(a) if fmt == "llava" else [json.loads(x) for x in a.splitlines()]
        recs_b = json.loads(b) if fmt == "llava" else [json.loads(x) for x in b.splitlines()]
        assert sorted(recs_a, key=lambda r: r["id"]) == recs_b, fmt
        assert [r["video" if fmt != "sharegpt" else "videos"] for r in recs_a] == sorted(
            [r["video" if fmt != "sharegpt" else "videos"] for r in recs_a])  # shard order: clip0, clip1, clip2
    assert json.loads((tmp_path / "from_root" / "imove_it_internvl_meta.json").read_text())[
        "motionforge_imove_it"]["length"] == 9
    only = export_imove_it(root.url, tmp_path / "only", tasks=["temporal_grounding"], formats=["llava"])
    assert only.samples == sum(s.task == "temporal_grounding" for s in samples) > 0
    assert {r["task"] for r in json.loads(only.files["llava"].read_text())} == {"temporal_grounding"}
    empty = export_samples([], tmp_path / "none", ["llava"])
    assert empty.samples == 0 and json.loads(empty.files["llava"].read_text()) == []
