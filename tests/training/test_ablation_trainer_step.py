"""The ablation flow with the training flow's Trainer as its step (``flows.ablation_training:trainer_step``):
one TE Fusion cell trained on a synthetic iMOVE-IT root with the tiny Qwen2-VL and scored on a MotionBench
meta file made from the same clips, on CPU."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from flows.ablation import AblationCell, AblationConfig, compression_ablation
from tests.training._synthetic import make_root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("abl")
    root = make_root(tmp, n_videos=2, per_video=1)
    meta = tmp / "video_info.meta.jsonl"
    rows = [{"key": f"clip{v}", "video_path": f"clip{v}.mp4", "question_type": "Motion Recognition",
             "qa": [{"uid": f"q{v}", "question": "What moves?\nA. car\nB. dog\nC. ball\nD. none", "answer": "A"}]}
            for v in range(2)]
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp, root, meta


def test_one_cell_trains_with_the_trainer_and_is_scored_on_motionbench(prefect_harness, data, tmp_path):
    tmp, root, meta = data
    params = {"data": root.url, "motionbench_meta": str(meta), "motionbench_videos": str(tmp), "steps": 2,
              "lr": 1e-3, "lora_r": 4, "short_side": 32, "runs_dir": str(tmp_path / "runs")}
    cfg = AblationConfig(out=str(tmp_path), methods=("te_fusion",), rates=(2,), decoder_slots=1,
                         train_eval="flows.ablation_training:trainer_step", step_params=params)
    out = compression_ablation(cfg)
    rows = list(csv.DictReader(open(out["csv"])))
    assert len(rows) == 1 and rows[0]["status"] == "ok", rows
    acc = float(rows[0]["accuracy"])
    assert acc * 2 == round(acc * 2) and 0.0 <= acc <= 1.0  # right answers out of 2 questions
    assert float(rows[0]["errors"]) == 0.0 and float(rows[0]["train_loss"]) > 0
    for speed in ("train_samples_per_s", "eval_samples_per_s"):  # measured, so only their form is checked
        assert math.isfinite(float(rows[0][speed])) and float(rows[0][speed]) > 0, rows[0]
    assert "peak_gpu_mib" not in rows[0]  # no GPU, no memory figure (not a zero)
    assert "**train_samples_per_s**" in Path(out["table"]).read_text()
    run = tmp_path / "runs" / "te_fusion-k2"
    # the cell's run: 2 slots x 2 frames, the cell's fusion recorded and its weights saved beside the adapter
    fp = json.loads((run / "final" / "motionforge_fingerprint.json").read_text())
    assert fp["config"]["data"]["num_frames"] == 4
    assert fp["config"]["model_parts"][0]["kwargs"]["temporal_fusion"] == {"method": "te_fusion", "rate": 2}
    assert (run / "final" / "model_parts.safetensors").exists()
    replies = json.loads((run / "eval_motionbench" / "responses.json").read_text())
    assert set(replies) == {"q0", "q1"}


def test_a_cell_without_data_or_benchmark_is_a_clear_error():
    from flows.ablation_training import cell_train_config, trainer_step

    cell = AblationCell(method="post_pool", rate=2, input_slots=4, decoder_slots=2, params={})
    with pytest.raises(ValueError, match="motionbench_meta"):
        trainer_step(cell)
    with pytest.raises(ValueError, match="-p data="):
        cell_train_config(cell, "/tmp/x")
    cfg = cell_train_config(cell.model_copy(update={"params": {"data": "/r"}}), "/tmp/x")
    assert cfg.data.num_frames == 8 and cfg.model_parts[0].kwargs["temporal_fusion"]["method"] == "post_pool"
