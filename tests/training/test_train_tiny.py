"""End to end on CPU: a tiny random-initialised Qwen2-VL (the production loader's ``tiny://`` checkpoint)
fine-tuned with LoRA on a synthetic iMOVE-IT output root through ``python -m stages.training.trainer``.

Three runs share one config but for the batch layout: A one process, batch 4, 40 steps; B the same killed
with SIGKILL right after its step-20 checkpoint, then started again; C two processes (torchrun, gloo) with
2 samples each. Every run is a fresh process with one intra-op thread, so CPU float results are repeatable.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.training.config import DataConfig, DataSource, LoraConfig, ModelConfig, OptimConfig, TrainConfig
from stages.training.trainer import FINGERPRINT_FILE, launch_command
from tests.training._synthetic import make_root

REPO = Path(__file__).resolve().parents[2]
STEPS = 40


def _config(tmp: Path, root: str, name: str, per_device: int, tensorboard: bool = False) -> Path:
    cfg = TrainConfig(
        output_dir=str(tmp / name), model=ModelConfig(model_id="tiny://qwen2_vl"),
        data=DataConfig(sources=(DataSource(path=root),), eval_fraction=0.0, num_frames=4, short_side=32),
        lora=LoraConfig(r=8, alpha=16, dropout=0.0),
        optim=OptimConfig(learning_rate=5e-3, per_device_batch_size=per_device, max_steps=STEPS, seed=7),
        save_steps=10, dataloader_num_workers=1, report_to=("tensorboard",) if tensorboard else ())
    path = tmp / f"{name}.json"
    path.write_text(cfg.model_dump_json(), encoding="utf-8")
    return path


def _run(cmd: list[str], expect_rc: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect_rc, f"{cmd} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _summary(tmp: Path, name: str) -> dict:
    return json.loads((tmp / name / "summary.json").read_text(encoding="utf-8"))


def _losses(summary: dict) -> dict[int, float]:
    return {step: loss for step, loss in summary["loss_curve"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    root = make_root(tmp, n_videos=4, per_video=2).url
    a = _config(tmp, root, "A", per_device=4, tensorboard=True)
    b = _config(tmp, root, "B", per_device=4)
    c = _config(tmp, root, "C", per_device=2)
    _run([sys.executable, "-m", "stages.training.trainer", str(a)])
    killed = _run([sys.executable, str(REPO / "tests/training/_run_killed.py"), str(b), "20"], expect_rc=-9)
    b_after_kill = sorted(p.name for p in (tmp / "B" / "checkpoints").iterdir())
    _run([sys.executable, "-m", "stages.training.trainer", str(b)])
    _run(launch_command(c, 2))
    return {"tmp": tmp, "killed": killed, "b_after_kill": b_after_kill}


def test_forty_steps_lower_the_loss_by_30_percent(runs):
    s = _summary(runs["tmp"], "A")
    loss = _losses(s)
    assert sorted(loss) == list(range(1, STEPS + 1))
    # mean of the first and last five steps: one batch's loss swings by a few percent with its samples
    first, last = sum(loss[i] for i in range(1, 6)) / 5, sum(loss[i] for i in range(STEPS - 4, STEPS + 1)) / 5
    assert last <= 0.7 * first, (first, last)
    assert s["tokens_per_s"] > 0 and s["samples_per_s"] > 0
    # TensorBoard events, and the checkpoints and final adapter say what they were trained on
    assert list((runs["tmp"] / "A" / "tensorboard").glob("events.out.tfevents.*"))
    fp = json.loads((runs["tmp"] / "A" / "final" / FINGERPRINT_FILE).read_text())
    assert fp["data_fingerprint"] == s["data_fingerprint"] and fp["config"]["model"]["model_id"] == "tiny://qwen2_vl"
    assert (runs["tmp"] / "A" / "final" / "adapter_model.safetensors").exists()
    for ck in (runs["tmp"] / "A" / "checkpoints").iterdir():
        assert json.loads((ck / FINGERPRINT_FILE).read_text())["config_fingerprint"] == s["config_fingerprint"]


def test_killed_run_resumes_to_the_same_loss(runs):
    assert runs["b_after_kill"] == ["checkpoint-10", "checkpoint-20"]
    b = _summary(runs["tmp"], "B")
    assert b["resumed_from"].endswith("checkpoint-20") and b["steps_this_run"] == STEPS - 20
    a_loss, b_loss = _losses(_summary(runs["tmp"], "A")), _losses(b)
    # same process layout, same data order, same frames, one thread: the float ops are the same ones, and
    # 1e-5 only leaves room for the checkpoint's float32 round trip
    assert b_loss[STEPS] == pytest.approx(a_loss[STEPS], abs=1e-5)
    for step in range(21, STEPS + 1):
        assert b_loss[step] == pytest.approx(a_loss[step], abs=1e-5), step


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(runs):
    import torch
    from safetensors.torch import load_file

    a, c = _summary(runs["tmp"], "A"), _summary(runs["tmp"], "C")
    assert c["world_size"] == 2 and c["global_batch_size"] == a["global_batch_size"] == 4
    a_loss, c_loss = _losses(a), _losses(c)
    # DDP averages two half-batch gradients with an all-reduce, a different float32 summation order than one
    # batch's backward (~1e-7 relative per step); AdamW carries it through 40 steps. Seen: <= 2e-6. A wrong
    # loss normalisation or data split shifts the losses by 1e-2 and more.
    for step in range(1, STEPS + 1):
        assert c_loss[step] == pytest.approx(a_loss[step], rel=1e-4, abs=1e-4), step
    wa = load_file(str(runs["tmp"] / "A" / "final" / "adapter_model.safetensors"))
    wc = load_file(str(runs["tmp"] / "C" / "final" / "adapter_model.safetensors"))
    assert wa.keys() == wc.keys()
    for k in wa:
        assert torch.allclose(wa[k], wc[k], rtol=1e-3, atol=1e-4), k


@pytest.mark.parametrize("fails", [False, True])
def test_trainer_entry_point_destroys_the_process_group(tmp_path, monkeypatch, fails):
    """``python -m stages.training.trainer`` destroys the launcher's process group before it returns from a
    finished run: left to interpreter shutdown, a gloo group can abort a rank that finished (SIGABRT), and
    torchrun then kills rank 0 before it writes the summary. When training raised it leaves the group alone
    (another rank may be inside a collective; destroying would wait for it). A one-process gloo group stands in
    for torchrun's."""
    import torch.distributed as dist

    from stages.training import trainer

    cfg = tmp_path / "cfg.json"
    cfg.write_text(TrainConfig(output_dir=str(tmp_path / "out"), model=ModelConfig(model_id="tiny://qwen2_vl"),
                               data=DataConfig(sources=(DataSource(path=str(tmp_path)),))).model_dump_json())
    seen = []

    def fake_training(c, resume=True):
        seen.append(dist.is_initialized())
        if fails:
            raise RuntimeError("training failed")

    monkeypatch.setattr(trainer, "run_training", fake_training)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        if fails:
            with pytest.raises(RuntimeError, match="training failed"):
                trainer.main([str(cfg)])
        else:
            assert trainer.main([str(cfg)]) == 0
        assert seen == [True] and dist.is_initialized() is fails
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
