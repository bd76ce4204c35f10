"""caption -> check -> tasks on a synthetic video, with VLM doubles: exact answers from the ground truth."""
from __future__ import annotations

import json
import re

import pytest

from schemas._base import from_table
from schemas.imove_it import ImoveItSample
from schemas.track_verdicts import TrackVerdict
from schemas.tracks import Track
from stages.imove_it import caption, check, tasks
from stages.base import install_expert_override
from stages.runner import run_shard
from stages.shared.relative_tokens import dequantize_box, dequantize_time, parse_boxes, parse_times
from stages.synth.videos import SynthConfig, render_video
from storage.root import OutputRoot
from tests._stage_tables import write_stage


class CaptionDouble:
    """Static: names the colour and category; dynamic: states the ground-truth motion direction."""

    def __init__(self, truth: dict):
        self.by_label = {o["category"]: o for o in truth["objects"]}
        self.calls = []

    def generate(self, requests):
        from experts.vlm import VlmResponse

        out = []
        for r in requests:
            self.calls.append(r)
            label = re.search(r"Category: (\w+)", r.text)
            if label:  # static prompt
                o = self.by_label[label.group(1)]
                out.append(VlmResponse(text=f"The {o['category']} is a {o['color']} {o['shape']}.", error=None,
                                       cached=False, model="double"))
            else:
                m = re.search(r"Appearance of the instance: The (\w+)", r.text)
                o = self.by_label[m.group(1)]
                out.append(VlmResponse(text=f"The {o['color']} {o['category']} moves {o['motion']['direction']}",
                                       error=None, cached=False, model="double"))
        return out


class CheckDouble:
    """Accepts every caption except the planted one (its category), which it calls not unique."""

    def __init__(self, reject_label: str):
        self.reject_label = reject_label

    def generate(self, requests):
        from experts.vlm import VlmResponse

        out = []
        for r in requests:
            label = re.search(r"Category: (\w+)", r.text).group(1)
            ok = "no" if label == self.reject_label else "yes"
            out.append(VlmResponse(text=json.dumps({"correct": "yes", "unique": ok, "reason": "two look alike" if ok == "no" else "fine"}),
                                   error=None, cached=False, model="double"))
        return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn")
    cfg = SynthConfig(min_shots=1, max_shots=1) if "min_shots" in SynthConfig.model_fields else SynthConfig()
    truth = render_video(d / "v.mp4", 11, cfg).model_dump(mode="json")
    return d / "v.mp4", truth


def _tracks_from_truth(video, truth) -> list[Track]:
    fps = truth["fps"]
    shot = truth["shots"][0]
    start_f, end_f = shot["start_frame"], shot["end_frame"]
    rows = []
    for o in truth["objects"]:
        if o["too_large"]:
            continue
        pts = [{"t_s": f / fps, "frame_index": f, "box_xyxy_px": [float(v) for v in b], "visible": True,
                "mask_area_px": int((b[2] - b[0]) * (b[3] - b[1])), "object_score": 5.0, "kf_score": 0.9}
               for f, *b in o["boxes"] if start_f <= f <= end_f]
        if not pts:
            continue
        rows.append(Track(instance_id=f"inst-{o['object_id']}", clip_id="clip-0", video_id="vid-0", video_path=str(video),
                          label=o["category"], start_s=start_f / fps, end_s=(end_f + 1) / fps,
                          duration_s=(end_f + 1 - start_f) / fps, width=truth["width"], height=truth["height"],
                          first_box_xyxy_px=pts[0]["box_xyxy_px"], track_fps=None, num_frames=len(pts),
                          num_visible=len(pts), points=pts))
    return rows


def test_language_stages_exact_against_truth(tmp_path, synthetic):
    video, truth = synthetic
    root = OutputRoot(tmp_path / "r")
    tracks = _tracks_from_truth(video, truth)
    labels = [t.label for t in tracks]
    assert len(set(labels)) == len(labels) >= 3
    write_stage(root, "track", 0, tracks)
    dropped = tracks[0].instance_id  # the track filter dropped this one: it must not be captioned
    write_stage(root, "trackfilter", 0, [
        TrackVerdict(instance_id=t.instance_id, clip_id=t.clip_id, video_id=t.video_id, label=t.label,
                     kept=t.instance_id != dropped, clip_scores=[], clip_sample_t_s=[],
                     status="ok" if t.instance_id != dropped else "skipped",
                     error=None if t.instance_id != dropped else "planted drop") for t in tracks])
    install_expert_override("caption.vlm", CaptionDouble(truth))
    out = run_shard(caption.STAGE, root, caption.CaptionConfig(num_frames=4), 0)
    caps = {r["instance_id"]: r for r in root.read_shard("caption", 0).to_pylist()}
    assert dropped not in caps and out.rows == len(tracks) - 1
    for t in tracks[1:]:
        c = caps[t.instance_id]
        o = next(o for o in truth["objects"] if o["category"] == t.label)
        if c["status"] == "skipped":  # visible too briefly to caption
            assert "min_segment_s" in c["error"]
            continue
        assert c["status"] == "ok", c["error"]
        assert c["static_caption"].startswith(f"The {t.label}")
        assert c["dynamic_caption"] == f"The {o['color']} {t.label} moves {o['motion']['direction']}"
        assert c["t1_s"] == t.points[0]["t_s"] and c["t2_s"] == t.points[-1]["t_s"]
        assert c["prompt_version"] == "static_caption.v1+dynamic_caption.v1"

    ok_caps = [c for c in caps.values() if c["status"] == "ok"]
    rejected = ok_caps[0]["label"]
    install_expert_override("check.vlm", CheckDouble(rejected))
    run_shard(check.STAGE, root, check.CheckConfig(num_frames=2), 0)
    verdicts = {r["instance_id"]: r for r in root.read_shard("check", 0).to_pylist()}
    assert {v["instance_id"] for v in verdicts.values() if not v["accepted"]} == {ok_caps[0]["instance_id"]}
    assert "not unique" in verdicts[ok_caps[0]["instance_id"]]["error"]

    run_shard(tasks.STAGE, root, tasks.TasksConfig(), 0)
    samples = from_table(root.read_shard("tasks", 0), ImoveItSample)
    accepted = [c for c in ok_caps if c["label"] != rejected]
    assert len(samples) == 3 * len(accepted)
    W, H = truth["width"], truth["height"]
    for s in samples:
        tr = next(t for t in tracks if t.instance_id == s.instance_id)
        T = s.duration_s
        gt_t1, gt_t2 = tr.points[0]["t_s"] - tr.start_s, tr.points[-1]["t_s"] - tr.start_s
        gt_b1, gt_b2 = tr.points[0]["box_xyxy_px"], tr.points[-1]["box_xyxy_px"]
        human, gpt = s.conversations[0]["value"], s.conversations[1]["value"]
        assert human.startswith("<video>\n") and s.conversations[0]["from"] == "human"
        if s.task == "spatial_grounding":
            b1, b2 = parse_boxes(gpt)
            for q, gt in ((b1, gt_b1), (b2, gt_b2)):
                for v, g, ext in zip(dequantize_box(q, W, H), gt, (W, H, W, H)):
                    assert abs(v - g) <= ext / 1000
            assert parse_times(human)[:2] == [s.t1_token, s.t2_token]
        elif s.task == "temporal_grounding":
            q1, q2 = parse_times(gpt)
            assert abs(dequantize_time(q1, T) - gt_t1) <= T / 300 and abs(dequantize_time(q2, T) - gt_t2) <= T / 300
        else:
            assert gpt.rstrip(".") == s.dynamic_caption.rstrip(".")
            assert [dequantize_time(q, T) for q in parse_times(human)[:2]] == pytest.approx([gt_t1, gt_t2], abs=T / 300)
    # deterministic ids and texts on a re-run
    again = run_shard(tasks.STAGE, root, tasks.TasksConfig(), 0, force=True)
    assert again.rows == len(samples)
    assert sorted(x.sample_id for x in from_table(root.read_shard("tasks", 0), ImoveItSample)) == sorted(x.sample_id for x in samples)


def test_verdict_parsing():
    assert check.parse_verdict('{"correct": "yes", "unique": "no", "reason": "x"}') == (True, False, "x")
    assert check.parse_verdict('Sure! {"correct": true, "unique": true}') == (True, True, None)
    assert check.parse_verdict("correct: no\nunique: yes\nreason: wrong way") == (False, True, "wrong way")
    assert check.parse_verdict("I cannot tell") == (None, None, None)


def test_export_jsonl_and_datasets_loading(tmp_path, synthetic):
    test_language_stages_exact_against_truth(tmp_path, synthetic)
    from flows.cli_imove import export_imove_it

    res = export_imove_it(str(tmp_path / "r"), tmp_path / "x")
    n = res.samples
    lines = [json.loads(l) for l in (tmp_path / "x" / "imove_it_internvl.jsonl").read_text().splitlines()]
    assert n == len(lines) > 0
    for rec in lines:
        assert {"id", "video", "conversations", "task"} <= set(rec) and (tmp_path / "x" / rec["video"]).is_file()
        assert rec["conversations"][0]["from"] == "human" and rec["conversations"][0]["value"].startswith("<video>\n")
        assert rec["conversations"][1]["from"] == "gpt"
    assert len({r["id"] for r in lines}) == n
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "r" / "tasks" / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert len(ds) == n and set(ds.features) >= {"conversations", "task", "box1_tokens"}


class _BatchRecorder(CaptionDouble):
    """CaptionDouble that also records how many requests each ``generate`` call carried."""

    def __init__(self, truth: dict):
        super().__init__(truth)
        self.sizes = []

    def generate(self, requests):
        self.sizes.append(len(requests))
        return super().generate(requests)


def test_caption_batches_and_prefetch_keep_the_rows_and_isolate_an_unreadable_video(tmp_path, synthetic):
    """Caption one instance per VLM call with inline decoding, then 3 per call with frames decoded ahead on the
    prefetch thread; one instance's video is gone (in the middle of the first batch). The double answers from
    each request alone, so the rows must be equal exactly; the error stays that instance's row."""
    import dataclasses

    video, truth = synthetic
    tracks = _tracks_from_truth(video, truth)
    assert len(tracks) >= 3
    gone = dataclasses.replace(tracks[0], instance_id="inst-gone", video_path=str(tmp_path / "gone.mp4"))
    shard = tracks[:1] + [gone] + tracks[1:]
    verdicts = [TrackVerdict(instance_id=t.instance_id, clip_id=t.clip_id, video_id=t.video_id, label=t.label,
                             kept=True, clip_scores=[], clip_sample_t_s=[]) for t in shard]

    def run(where, batch_size, depth):
        root = OutputRoot(tmp_path / where)
        write_stage(root, "track", 0, shard)
        write_stage(root, "trackfilter", 0, verdicts)
        double = _BatchRecorder(truth)
        install_expert_override("caption.vlm", double)
        cfg = caption.CaptionConfig(num_frames=4, prefetch_depth=depth,
                                    vlm={"model_id": "double", "backend": "transformers", "batch_size": batch_size})
        out = run_shard(caption.STAGE, root, cfg, 0)
        return out, root.read_shard("caption", 0).to_pylist(), double

    out1, one, d1 = run("one", 1, 0)
    out3, three, d3 = run("three", 3, 2)
    assert max(d1.sizes) == 1 and 1 < max(d3.sizes) <= 3 and len(d3.sizes) < len(d1.sizes)
    for out in (out1, out3):
        assert out.error == 1 and out.ok >= 2
    drop = ("created_at", "config_hash")
    assert [{k: v for k, v in r.items() if k not in drop} for r in three] == \
           [{k: v for k, v in r.items() if k not in drop} for r in one]
    err = [r for r in three if r["status"] == "error"]
    assert [r["instance_id"] for r in err] == ["inst-gone"] and "gone.mp4" in err[0]["error"]
    assert [r["instance_id"] for r in three] == [t.instance_id for t in shard]
    assert caption.CaptionConfig(prefetch_depth=0).config_hash() == caption.CaptionConfig().config_hash()
