"""Profiles compose per-stage overrides; the demo picks `small` only when all of its weights are here."""
from __future__ import annotations

import os

from flows.cli import _small_profile_available
from flows.config import load_pipeline_config


def test_profiles_compose_and_tiny_is_offline():
    tiny = load_pipeline_config("tiny")
    assert tiny.profile == "tiny"
    assert tiny.tag.ram_plus.model_id == "tiny://ram_plus"
    assert tiny.detect.detector.model_id.startswith("tiny://") and tiny.track.tracker.model_id.startswith("tiny://")
    assert tiny.caption.vlm.model_id.startswith("tiny://") and tiny.check.vlm.model_id.startswith("tiny://")
    paper = load_pipeline_config("paper")
    assert paper.detect.detector.model_id == "IDEA-Research/grounding-dino-base"
    assert paper.tag.tagger == "ram_plus"
    # overrides win over the profile, and the stage config hash follows the change
    over = load_pipeline_config("tiny", overrides={"scenes": {"threshold": 30.0}})
    assert over.scenes.threshold == 30.0 and over.scenes.config_hash() != tiny.scenes.config_hash()


def test_small_profile_detection(tmp_path, monkeypatch):
    monkeypatch.setenv("MOTIONFORGE_WEIGHTS", str(tmp_path))
    ok, missing = _small_profile_available()
    assert not ok and missing
    for m in missing:  # put every missing checkpoint where MOTIONFORGE_WEIGHTS points
        os.makedirs(tmp_path / m, exist_ok=True)
    assert _small_profile_available() == (True, [])


def test_vlm_stages_ask_for_a_gpu_only_for_in_process_models():
    from stages.registry import get_stage

    paper, tiny = load_pipeline_config("paper"), load_pipeline_config("tiny")
    for name in ("caption", "check", "describe", "qgen", "ffilter"):
        st = get_stage(name)
        assert st.resources_for(paper.stage_config(name)).gpus == 0  # the paper's models sit behind endpoints
        assert st.resources_for(tiny.stage_config(name)).gpus >= 1  # in-process transformers models
    assert get_stage("track").resources_for(paper.track).gpus == 1


def test_paper_profile_needs_only_the_ram_plus_checkpoint(tmp_path, monkeypatch, prefect_harness):
    """With the vocabulary shipped, the paper profile's tag stage is missing nothing but the .pth, and the
    run says so by name (hub offline, no local weights)."""
    from typer.testing import CliRunner

    from experts.ram_plus import DEFAULT_CHECKPOINT_FILE, TAG_LIST_FILE, TAG_THRESHOLD_FILE
    from experts.ram_plus.loading import PACKAGED_VOCAB_DIR, load_vocabulary, vocabulary_dir
    from flows.cli import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MOTIONFORGE_WEIGHTS", str(tmp_path / "no-weights"))
    paper = load_pipeline_config("paper")
    spec = paper.tag.ram_plus
    assert spec.vocab_dir is None
    # the vocabulary the paper run would use: the shipped release files, matching the released checkpoint
    hub_cache_dir = tmp_path / "hub-snapshot"
    hub_cache_dir.mkdir()
    assert vocabulary_dir(spec, hub_cache_dir / DEFAULT_CHECKPOINT_FILE) == PACKAGED_VOCAB_DIR
    tags, _ = load_vocabulary(PACKAGED_VOCAB_DIR)
    assert len(tags) == 4585

    # Given only a .pth in the reference layout (Swin-L 384, 4,585 x 51 descriptions), the paper spec
    # loads. The tensors are stride-0 views of one value each, so the file and the model stay tiny.
    import torch

    from experts.ram_plus import load_ram_plus
    from tests._ram_plus_layout import Geometry, official_layout

    weights = tmp_path / "weights" / spec.model_id
    weights.mkdir(parents=True)
    state = {k: torch.zeros((), dtype=torch.int64 if k.endswith("relative_position_index") else torch.float32)
             .expand(shape) for k, shape in official_layout(Geometry.released("swin_l", 384)).items()}
    torch.save({"model": state}, weights / DEFAULT_CHECKPOINT_FILE)
    assert (weights / DEFAULT_CHECKPOINT_FILE).stat().st_size < 5_000_000
    monkeypatch.setenv("MOTIONFORGE_WEIGHTS", str(tmp_path / "weights"))
    tagger = load_ram_plus(spec.model_copy(update={"device": "cpu"}))
    assert tagger.tags == tuple(tags) and tagger.model.config.num_tags == 4585
    monkeypatch.setenv("MOTIONFORGE_WEIGHTS", str(tmp_path / "no-weights"))

    runner = CliRunner()
    vids = tmp_path / "videos"
    res = runner.invoke(app, ["synth", "--out", str(vids), "--n", "1", "--seed", "3"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = tmp_path / "root"
    res = runner.invoke(app, ["run", "--input", str(vids), "--out", str(out), "--stages", "ingest,scenes,tag",
                              "--profile", "paper"], catch_exceptions=False)
    assert res.exit_code == 1, res.output
    text = " ".join(res.output.split())  # rich wraps long lines
    assert "1 stage shard(s) failed" in text, text
    assert "tag / shard 00000" in text and "WeightsNotFoundError" in text
    assert f"xinyu1205/recognize-anything-plus-model/{DEFAULT_CHECKPOINT_FILE}" in text
    assert TAG_LIST_FILE not in text and TAG_THRESHOLD_FILE not in text and "Vocabulary" not in text
