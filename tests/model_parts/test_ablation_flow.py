"""The compression ablation flow end to end on the tiny Qwen2-VL, on CPU: a real (short) fine-tune per
(method, rate) cell, the MotionBench Tables 7-8 grid written, failed cells kept as rows, re-runs resumed."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from flows.ablation import (METHOD_LABELS, PAPER_METHODS, AblationCell, AblationConfig, compression_ablation, load_step,
                            plan_cells, synthetic_motion_probe, write_tables)
from stages.synth.motion_clips import DIRECTIONS, motion_clip_set, render_motion_clip

METHODS = PAPER_METHODS  # MotionBench Tables 7-8's rows
assert METHODS == ("none", "pre_encoder", "qformer", "post_pool", "kangaroo", "te_fusion")
# small enough for two busy CPU cores: 28 px frames (one decoder token per slot), 2 optimiser steps
TINY_STEP = {"model_id": "tiny://qwen2_vl", "n_train": 4, "n_eval": 4, "steps": 2, "batch_size": 4,
             "frame_size": 28, "device": "cpu"}
CALLS: list[str] = []
SPEED_METRICS = ("train_samples_per_s", "eval_samples_per_s", "train_seconds")


def counting_step(cell: AblationCell) -> dict[str, float]:
    """The real default step, counted (to see which cells a re-run repeats); fails pre_encoder on purpose."""
    CALLS.append(cell.key)
    if cell.params.get("fail") == cell.method:
        raise RuntimeError(f"planted failure for {cell.method}")
    return synthetic_motion_probe(cell)


def test_motion_clips_are_the_same_motion_at_any_frame_count():
    a, b = motion_clip_set(3, 4, 8), motion_clip_set(3, 4, 32)
    for x, y in zip(a, b):
        assert x.answer_index == y.answer_index
        assert np.array_equal(x.frames[0], y.frames[0]) and np.array_equal(x.frames[-1], y.frames[-1])
    clip = render_motion_clip(5, 6, size=56)
    # the bright square's centre moves the labelled way (background values are < 120, the square's >= 150)
    ys, xs = zip(*[np.argwhere(f.max(axis=2) >= 150).mean(axis=0) for f in clip.frames[[0, -1]]])
    moved = {"left": xs[1] < xs[0] - 10, "right": xs[1] > xs[0] + 10, "up": ys[1] < ys[0] - 10,
             "down": ys[1] > ys[0] + 10}
    assert moved[DIRECTIONS[clip.answer_index]] and sum(moved.values()) == 1


def test_plans_follow_the_papers_two_settings():
    t7 = plan_cells(AblationConfig(out="x", methods=("te_fusion",), rates=(2, 4, 6, 8), decoder_slots=4))
    assert [(c.rate, c.input_slots, c.decoder_slots) for c in t7] == [(2, 8, 4), (4, 16, 4), (6, 24, 4), (8, 32, 4)]
    t8 = plan_cells(AblationConfig(out="x", setting="fixed_input_frames", methods=("te_fusion",),
                                   rates=(2, 4, 6, 8, 16), input_slots=16))
    assert [(c.rate, c.decoder_slots) for c in t8] == [(2, 8), (4, 4), (8, 2), (16, 1)]  # 6 does not divide 16
    with pytest.raises(ValueError, match="package.module:function"):
        load_step("nodots")


def test_ablation_flow_end_to_end(prefect_harness, tmp_path: Path):
    CALLS.clear()
    cfg = AblationConfig(out=str(tmp_path), methods=METHODS, rates=(2, 4), decoder_slots=1,
                         train_eval="tests.model_parts.test_ablation_flow:counting_step",
                         step_params={**TINY_STEP, "fail": "pre_encoder"})
    out = compression_ablation(cfg)
    assert sorted(CALLS) == sorted(f"{m}-k{k}" for m in METHODS for k in (2, 4))
    rows = list(csv.DictReader(open(out["csv"])))
    assert len(rows) == 12
    for r in rows:
        if r["method"] == "pre_encoder":
            assert r["status"] == "error" and "planted failure" in r["error"]
            continue
        assert r["status"] == "ok", r
        acc = float(r["accuracy"])
        assert acc * 4 == round(acc * 4) and 0.0 <= acc <= 1.0  # a count of right answers out of 4
        # Table 7's invariant: every method gives the decoder the same number of video tokens (1 slot x 1)
        assert float(r["video_tokens_per_clip"]) == 1.0
        assert float(r["encoder_slots_per_clip"]) == int(r["rate"])
        assert float(r["train_loss_first"]) != float(r["train_loss_last"])  # the optimiser really stepped
        # the loops' speed is measured in every cell; its values depend on the machine, so only their form is checked
        for speed in SPEED_METRICS:
            assert math.isfinite(float(r[speed])) and float(r[speed]) > 0, (speed, r)
    assert "peak_gpu_mib" not in rows[0]  # a CPU run has no GPU memory to report (not a column of zeros)
    table = Path(out["table"]).read_text()
    assert "| method | k=2 | k=4 |" in table
    for metric in SPEED_METRICS + ("video_tokens_per_clip",):
        grid = table.split(f"**{metric}**")[1].split("**")[0]
        assert grid.count("| error | error |") == 1 and METHOD_LABELS["te_fusion"] in grid
    for m in METHODS:
        assert METHOD_LABELS[m] in table
    acc_grid = table.split("**accuracy**")[1].split("**")[0]
    assert acc_grid.count("| error | error |") == 1
    # a re-run finds every cell on disk and trains nothing again
    CALLS.clear()
    out2 = compression_ablation(cfg)
    assert CALLS == [] and Path(out2["table"]).read_text() == table
    cell = json.loads((tmp_path / "ablation" / "compression" / "cells" / "te_fusion-k4.json").read_text())
    assert cell["cell"]["method"] == "te_fusion" and cell["status"] == "ok"


def test_throughput_grids_print_rates_to_three_figures(tmp_path: Path):
    cfg = AblationConfig(out=str(tmp_path), methods=("none", "te_fusion"), rates=(2,))
    cells = plan_cells(cfg)
    metrics = [{"accuracy": 0.5, "train_samples_per_s": 1234.56, "eval_samples_per_s": 12.0, "peak_gpu_mib": 20480.4,
                "video_tokens_per_clip": 64.0},
               {"accuracy": 1.0, "train_samples_per_s": 0.012345, "eval_samples_per_s": 3.14159, "peak_gpu_mib": 512.0,
                "video_tokens_per_clip": 64.0}]
    records = [{"cell": c.model_dump(mode="json"), "status": "ok", "error": None, "metrics": m, "seconds": 1.0}
               for c, m in zip(cells, metrics)]
    table = Path(write_tables(cfg, records)["table"]).read_text()

    def row(metric: str, method: str) -> str:
        grid = table.split(f"**{metric}**")[1].split("**")[0]
        return next(ln for ln in grid.splitlines() if ln.startswith(f"| {METHOD_LABELS[method]} |"))

    assert row("train_samples_per_s", "none").endswith("| 1235 |")
    assert row("train_samples_per_s", "te_fusion").endswith("| 0.0123 |")
    assert row("eval_samples_per_s", "none").endswith("| 12.0 |")  # a whole rate keeps its decimals
    assert row("eval_samples_per_s", "te_fusion").endswith("| 3.14 |")
    assert row("peak_gpu_mib", "none").endswith("| 20480 |") and row("peak_gpu_mib", "te_fusion").endswith("| 512 |")
    assert row("video_tokens_per_clip", "none").endswith("| 64 |") and row("accuracy", "te_fusion").endswith("| 1.000 |")


def test_cli_runs_the_grid(prefect_harness, tmp_path: Path):
    from tests._cli import invoke

    CALLS.clear()
    res = invoke("ablation", "--out", str(tmp_path), "--name", "cli", "--methods", "te_fusion,post_pool", "--rates", "2",
                 "--train-eval", "tests.model_parts.test_ablation_flow:counting_step",
                 "-p", "fail=\"te_fusion\"", "-p", "n_train=2", "-p", "n_eval=2", "-p", "steps=1", "-p", "frame_size=28",
                 "-p", "device=cpu")
    assert sorted(CALLS) == ["post_pool-k2", "te_fusion-k2"]
    table = (tmp_path / "ablation" / "cli" / "table.md").read_text()
    assert "table:" in res.output and "| TE Fusion (ours in the paper) | error |" in table
    assert "| PLLaVA (post-encoder pooling) | 0." in table or "| PLLaVA (post-encoder pooling) | 1." in table
