"""benchmarks/bench_e2e_gpu.py's parts that run without a GPU: test videos made with PyAV alone, the random
full-size vision architectures against the releases' published sizes, and the config it hands the stages.

The full run needs a GPU (benchmarks/device/gpu_checks.sh); its CPU smoke mode is exercised by hand
(docs/gpu_stages.md), not here, because it takes minutes; tests/test_device_kit.py checks that it imports
without Prefect.
"""
from __future__ import annotations

from argparse import Namespace
from fractions import Fraction

import pytest

from tests._benchmarks import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_e2e_gpu")


def test_videos_are_made_without_an_ffmpeg_program(bench, tmp_path, monkeypatch):
    import av

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no ffmpeg / ffprobe to call
    (video,) = bench.make_videos(tmp_path / "v", 1, seed=3, size=(160, 96), duration_s=(2.0, 2.0), shot_s=(0.8, 0.8))
    # the same draws make_videos takes: shots of 0.8 s, the last one shortened to fill 2.0 s but at least 0.5 s
    expected = round(0.8 * 25) * 2 + round(0.5 * 25)
    with av.open(str(video)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264"
        assert (s.codec_context.width, s.codec_context.height) == (160, 96)
        assert s.average_rate == Fraction(25)
        frames = [f.to_ndarray(format="gray") for f in c.decode(s)]
    assert len(frames) == expected
    assert bench.video_minutes([video]) == pytest.approx(expected / 25 / 60, abs=0.01)
    assert not list((tmp_path / "v").glob("*.part.mp4"))


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_random_sam2_and_clip_have_the_released_sizes(bench):
    """Parameter counts as the releases publish them: SAM 2.1 Hiera-L 224.4 M (the sam2 README's table, one
    decimal, so +-0.05 M), CLIP ViT-B/32 151,277,313 (OpenAI's release; exact)."""
    import torch

    from experts.clip import build_clip
    from experts.samurai.tracker import build_sam2_model
    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES

    config, fname = HF_MODEL_ID_TO_FILENAMES["facebook/sam2.1-hiera-large"]
    assert fname == "sam2.1_hiera_large.pt"
    torch.manual_seed(0)
    assert abs(_params(build_sam2_model(config, device="cpu")) - 224.4e6) <= 0.05e6
    assert _params(build_clip(bench.CLIP_ARCH)) == 151_277_313


def test_grounding_dino_base_matches_the_release_config(bench):
    """The release's config.json (IDEA-Research/grounding-dino-base), read off the hub: Swin-B at 384 px
    (embed 128, depths 2-2-18-2, heads 4-8-16-32, window 12, last stage 1024 wide), BERT-base text
    encoder, d_model 256, 6 + 6 layers, 900 queries, 4 feature levels."""
    import torch
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    from experts.grounding_dino import build_grounding_dino

    cfg = GroundingDinoConfig(backbone_config=SwinConfig(**bench.GROUNDING_DINO_BASE_SWIN),
                              text_config=BertConfig(vocab_size=bench.BERT_BASE_VOCAB))
    b = cfg.backbone_config
    assert (b.embed_dim, list(b.depths), list(b.num_heads), b.window_size, b.image_size, b.hidden_size) == \
        (128, [2, 2, 18, 2], [4, 8, 16, 32], 12, 384, 1024)
    t = cfg.text_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.vocab_size) == (768, 12, 12, 30522)
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers, cfg.num_queries, cfg.num_feature_levels) == \
        (256, 6, 6, 900, 4)
    with torch.device("meta"):
        model = build_grounding_dino(cfg, "grounding_dino")
    # backbone feature widths feed the input projections: stages 2-4 of Swin-B are 256, 512, 1024 wide
    widths = [m[0].in_channels for m in model.model.input_proj_vision[:3]]
    assert widths == [256, 512, 1024]


def test_config_points_the_stages_at_the_random_checkpoints(bench, tmp_path):
    """What the stages receive with random vision weights: the built checkpoints and the volume filters."""
    vision = {
        "tag": {"tagger": "ram_plus", "ram_plus": {"model_id": str(tmp_path / "ram")}, **bench.random_volume(3)["tag"]},
        "detect": {"detector": {"model_id": str(tmp_path / "gd")}, "clip": {"model_id": str(tmp_path / "c.st"),
                                                                            "arch": bench.CLIP_ARCH},
                   **bench.random_volume(3)["detect"]},
        "track": {"tracker": {"model_id": str(tmp_path / "sam2.1_hiera_large.pt")}},
        "trackfilter": bench.random_volume(3)["trackfilter"],
    }
    args = Namespace(tiny=False, shard_size=2, batch_size=4, backend="transformers", device="cuda", judges=2,
                     set=["track.max_frames=5", "caption.num_frames=4"], vllm_shares="0.45,0.3")
    pc = bench.pipeline_config(args, tmp_path / "vlm", tmp_path / "llm", vision)
    assert pc.tag.ram_plus.model_id == str(tmp_path / "ram") and pc.tag.max_tags == 3
    assert pc.detect.box_threshold == 0.0 and pc.detect.max_instances_per_clip == 3
    assert pc.detect.min_clip_score == -1.0 and pc.detect.clip.arch == "ViT-B-32-quickgelu"
    assert pc.trackfilter.min_visible_fraction is None and pc.trackfilter.max_area_ratio is None
    assert pc.track.tracker.model_id.endswith("sam2.1_hiera_large.pt") and pc.track.max_frames == 5
    assert pc.caption.num_frames == 4 and pc.caption.vlm.model_id == str(tmp_path / "vlm")
    assert pc.qgen.llm.model_id == str(tmp_path / "llm") and pc.ingest.shard_size == 2
    assert [j.name for j in pc.ffilter.judges] == ["judge-0", "judge-1"]
    assert pc.caption.vlm.vllm_engine.gpu_memory_utilization is None  # transformers: no engine options

    args.backend = "vllm"  # one engine per model in this process, each within its share of the GPU
    pc = bench.pipeline_config(args, tmp_path / "vlm", tmp_path / "llm", vision)
    vlms = [pc.caption.vlm, pc.check.vlm, pc.describe.vlm] + [j.vlm for j in pc.ffilter.judges]
    assert {(v.backend, v.model_id, v.vllm_engine.gpu_memory_utilization) for v in vlms} == {
        ("vllm", str(tmp_path / "vlm"), 0.45)}  # the same engine options: one shared VLM engine
    assert (pc.qgen.llm.backend, pc.qgen.llm.vllm_engine.gpu_memory_utilization) == ("vllm", 0.3)
    assert bench.vllm_shares("0.5,0.4") == (0.5, 0.4)
    for bad in ("0.6,0.4", "0.5", "0,0.3", "a,b"):
        with pytest.raises(SystemExit):
            bench.vllm_shares(bad)


def test_set_parses_json_values_and_nested_keys(bench):
    assert bench.parse_sets(["track.max_frames=4", "detect.clip.arch=ViT-B-32", "trackfilter.max_area_ratio=null"]) == {
        "track": {"max_frames": 4}, "detect": {"clip": {"arch": "ViT-B-32"}}, "trackfilter": {"max_area_ratio": None}}
    with pytest.raises(SystemExit):
        bench.parse_sets(["max_frames=4"])
