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
