"""Training pieces without a training loop: data, frame sampling, label masking, model set-up, fingerprints."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from stages.training.collator import IGNORE_INDEX, VlmCollator, build_messages
from stages.training.config import DataConfig, DataSource, LoraConfig, ModelConfig, ModelPart, TrainConfig
from stages.training.data import (
    TrainSample,
    VideoConversationDataset,
    data_fingerprint,
    frames_at,
    load_samples,
    sample_rng,
    segment_times,
)
from tests._video_fixtures import make_testsrc, require_ffmpeg
from tests.training._synthetic import make_root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("imove"), n_videos=4, per_video=2)


def _cfg(root, tmp_path, **kw):
    data = DataConfig(sources=(DataSource(path=str(root.url)),), eval_fraction=kw.pop("eval_fraction", 0.0),
                      num_frames=2, short_side=32)
    return TrainConfig(output_dir=str(tmp_path / "run"), model=ModelConfig(model_id=kw.pop("model_id", "tiny://qwen2_vl")),
                       data=data, **{"lora": LoraConfig(r=4, alpha=8, dropout=0.0), **kw})


def test_segment_times_random_inside_segments_centre_in_eval():
    centre = segment_times(1.0, 3.0, 4, None)
    assert centre == pytest.approx([1.25, 1.75, 2.25, 2.75])
    a = segment_times(1.0, 3.0, 4, sample_rng(0, 0, "s1"))
    assert a == segment_times(1.0, 3.0, 4, sample_rng(0, 0, "s1"))  # same (seed, epoch, sample): same frames
    assert a != segment_times(1.0, 3.0, 4, sample_rng(0, 1, "s1"))  # a new epoch draws again
    for i, t in enumerate(a):  # one time inside each 0.5 s segment
        assert 1.0 + 0.5 * i <= t < 1.0 + 0.5 * (i + 1)


def test_frames_at_picks_the_nearest_decoded_frame(tmp_path):
    require_ffmpeg()
    path = make_testsrc(tmp_path / "v.mp4", width=64, height=48, rate=10, duration_s=2.0)
    from experts.video import read_frames

    every = read_frames(path)  # frames at 0.0, 0.1, ..., 1.9 s
    got = frames_at(str(path), 0.0, 2.0, [0.04, 0.96, 1.51], None)
    want = [every[0].image, every[10].image, every[15].image]  # nearest: 0.0, 1.0, 1.5 s
    assert all(np.array_equal(g, w) for g, w in zip(got, want))


def test_split_keeps_each_clip_on_one_side_and_mixed_data_trains(root, tmp_path):
    extra = tmp_path / "chat.jsonl"
    extra.write_text(json.dumps({"id": "c1", "conversations": [{"from": "human", "value": "hi"},
                                                               {"from": "gpt", "value": "hello"}]}) + "\n")
    cfg = DataConfig(sources=(DataSource(path=str(root.url)), DataSource(kind="conversations", path=str(extra),
                                                                         repeat=2)), eval_fraction=0.5, split_seed=3)
    train, held = load_samples(cfg, "train"), load_samples(cfg, "eval")
    assert {s.clip_id for s in train if s.clip_id}.isdisjoint({s.clip_id for s in held})
    assert len({s.sample_id for s in train if s.clip_id} | {s.sample_id for s in held}) == 24
    assert [s.sample_id for s in train].count("c1") == 2 and all(s.sample_id != "c1" for s in held)
    assert data_fingerprint(train) == data_fingerprint(load_samples(cfg, "train"))
    assert data_fingerprint(train) != data_fingerprint(train[1:])


@pytest.mark.parametrize("family", ["qwen2_vl", "internvl"])
def test_labels_cover_exactly_the_assistant_replies(root, tmp_path, family):
    from stages.training.model import load_model_for_training

    cfg = _cfg(root, tmp_path, model_id=f"tiny://{family}")
    model, processor = load_model_for_training(cfg)
    samples = load_samples(cfg.data, "train")[:3]
    multi = TrainSample(sample_id="m", conversations=(("human", "<video>\nWhat moves?"), ("gpt", "A dog."),
                                                       ("human", "When?"), ("gpt", "From <3> to <90>.")),
                        video_path=samples[0].video_path, clip_start_s=0.0, clip_end_s=2.0)
    text_only = TrainSample(sample_id="t", conversations=(("human", "Say hi."), ("gpt", "Hi there.")))  # mixed-in chat
    rows = samples[:1] + [text_only] + samples[1:] + [multi]
    ds = VideoConversationDataset(rows, 2, 32, train=False)
    batch = VlmCollator(processor, 2)([ds[i] for i in range(len(ds))])
    tok = processor.tokenizer
    for r, s in enumerate(rows):
        ids, labels = batch["input_ids"][r], batch["labels"][r]
        replies = [t for role, t in s.conversations if role == "gpt"]
        learned = tok.decode(ids[labels != IGNORE_INDEX])
        # independent check: every reply followed by the template's end-of-turn text, nothing else
        assert learned == "".join(f"{t}<|im_end|>\n" for t in replies)
        assert (labels[batch["attention_mask"][r] == 0] == IGNORE_INDEX).all()
    # the videos went in as the model's own vision tokens, and the mixed batch runs through the model
    assert ("pixel_values_videos" in batch) or ("pixel_values" in batch)
    import torch

    assert torch.isfinite(model(**batch).loss)


def test_video_placeholder_without_video_is_an_error():
    s = TrainSample(sample_id="x", conversations=(("human", "<video>\nWhat?"), ("gpt", "No.")))
    with pytest.raises(ValueError, match="no video"):
        build_messages(s, has_video=False)


@pytest.mark.parametrize("family,vision,projector", [
    ("qwen2_vl", "model.visual.", "model.visual.merger."),
    ("qwen2_5_vl", "model.visual.", "model.visual.merger."),
    ("internvl", "model.vision_tower.", "model.multi_modal_projector."),
])
def test_lora_on_language_model_vision_frozen_projector_trained(root, tmp_path, family, vision, projector):
    from stages.training.model import load_model_for_training

    model, _ = load_model_for_training(_cfg(root, tmp_path, model_id=f"tiny://{family}"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for n in trainable:
        inner = n.replace("base_model.model.", "", 1)
        is_proj = inner.startswith(projector)
        assert not inner.startswith(vision) or is_proj, n  # nothing of the vision tower but its projector
        assert is_proj or ("lora_" in n and inner.startswith("model.language_model.")), n
    assert any(n.replace("base_model.model.", "", 1).startswith(projector) for n in trainable)
    assert any("lora_A" in n for n in trainable)


def test_full_finetuning_trains_language_model_and_projector_not_vision(root, tmp_path):
    from stages.training.model import load_model_for_training

    model, _ = load_model_for_training(_cfg(root, tmp_path, method="full"))
    by_name = {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(v for n, v in by_name.items() if n.startswith("model.language_model."))
    assert all(v for n, v in by_name.items() if n.startswith("model.visual.merger."))
    assert not any(v for n, v in by_name.items() if n.startswith("model.visual.") and ".merger." not in n)


def add_gate(model, processor, size: int = 3):
    """A stand-in model part (what issue 18's parts plug into): adds a small trainable module."""
    import torch

    model.motion_gate = torch.nn.Linear(size, size)
    return model, processor


def test_model_parts_hook_runs_after_loading_and_its_parameters_train(root, tmp_path):
    from stages.training.model import load_model_for_training

    part = ModelPart(target="tests.training.test_training_parts:add_gate", kwargs={"size": 5})
    cfg = _cfg(root, tmp_path, model_parts=(part,), lora=LoraConfig(r=4, alpha=8, extra_trainable=("motion_gate",)))
    model, _ = load_model_for_training(cfg)
    gate = [(n, p) for n, p in model.named_parameters() if "motion_gate" in n and p.requires_grad]
    assert gate and gate[0][1].shape[-1] == 5
    with pytest.raises(ValueError, match="package.module:function"):
        load_model_for_training(_cfg(root, tmp_path, model_parts=(ModelPart(target="nocolon"),)))


def test_resume_refuses_a_checkpoint_of_other_data(tmp_path):
    from stages.training.trainer import FINGERPRINT_FILE, FingerprintMismatchError, check_resumable

    ck = tmp_path / "checkpoint-10"
    ck.mkdir()
    (ck / FINGERPRINT_FILE).write_text(json.dumps({"config_fingerprint": "c1", "data_fingerprint": "d1"}))
    check_resumable(ck, {"config_fingerprint": "c1", "data_fingerprint": "d1"})
    with pytest.raises(FingerprintMismatchError, match="data_fingerprint"):
        check_resumable(ck, {"config_fingerprint": "c1", "data_fingerprint": "d2"})


def test_an_export_jsonl_trains_and_evaluates_like_its_root(root, tmp_path):
    """`motionforge export imove-it` output (production exporter) gives the same samples and split, and ground
    truth back from its tokens: times to within half a token (3.2.2), boxes on the 0-1000 grid."""
    from flows.cli_imove import export_imove_it
    from stages.shared.relative_tokens import N_TIME, quantize_box

    res = export_imove_it(root.url, tmp_path / "export", formats=["internvl"])
    assert res.samples == 24 and not res.dropped
    path = res.files["internvl"]
    for split in ("train", "eval"):
        kw = dict(eval_fraction=0.5, split_seed=3)
        from_root = load_samples(DataConfig(sources=(DataSource(path=root.url),), **kw), split)
        from_export = load_samples(DataConfig(sources=(DataSource(path=str(path)),), **kw), split)
        assert [s.sample_id for s in from_export] == [s.sample_id for s in from_root]
        for a, b in zip(from_root, from_export):
            assert a.conversations == b.conversations and a.clip_id == b.clip_id and a.task == b.task
            # the export's media is the cut clip: t=0 at the clip start, same length as the span
            assert b.clip_start_s == 0.0 and b.clip_end_s == pytest.approx(a.clip_end_s - a.clip_start_s)
            assert os.path.isfile(b.video_path) and b.video_path.startswith(str(tmp_path / "export" / "videos"))
            half_token = a.duration_s / N_TIME / 2 + 1e-9
            assert abs(a.t1_s - b.t1_s) <= half_token and abs(a.t2_s - b.t2_s) <= half_token
            assert b.box1_xyxy_px == tuple(quantize_box(a.box1_xyxy_px, a.width, a.height))
            if a.task == "dynamic_captioning":  # the reference is the reply, which holds the caption
                assert a.dynamic_caption.rstrip(".") in b.dynamic_caption


def test_train_command_config_defaults_and_overrides(tmp_path):
    from flows.cli_train import build_train_config

    cfg = build_train_config("/data/root", "r1", None, None, None, None, None, None, None)
    assert cfg.output_dir == "/data/root/training/r1" and [s.path for s in cfg.data.sources] == ["/data/root"]
    assert cfg.method == "lora" and cfg.optim.warmup_ratio == 0.03 and cfg.freeze_vision_tower and cfg.train_projector
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"optim": {"learning_rate": 1e-4}, "data": {"num_frames": 16}}))
    cfg = build_train_config("/r", "r2", f, "tiny://qwen2_vl", "full", ["/exp/imove_it.jsonl"], 7, 2, None,
                             ["/mix/chat.jsonl"])
    assert cfg.optim.learning_rate == 1e-4 and cfg.optim.max_steps == 7 and cfg.data.num_frames == 16
    assert [(s.kind, s.path) for s in cfg.data.sources] == [("imove_it", "/exp/imove_it.jsonl"),
                                                           ("conversations", "/mix/chat.jsonl")]
    assert cfg.method == "full" and cfg.distributed.nproc_per_node == 2 and cfg.model.model_id == "tiny://qwen2_vl"


def test_an_unreadable_video_names_the_sample_and_the_file(tmp_path):
    s = TrainSample(sample_id="bad-1", conversations=(("human", "<video>\nWhat?"), ("gpt", "No.")),
                    video_path=str(tmp_path / "missing.mp4"), clip_start_s=0.0, clip_end_s=2.0, source="root")
    with pytest.raises(ValueError, match="sample bad-1 .*missing.mp4"):
        VideoConversationDataset([s], 2, 32, train=True)[0]
