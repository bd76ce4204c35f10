"""Ray Train (several nodes) on a local Ray instance with two CPU workers: the same run as one process with
the same global batch. Opt-in (MOTIONFORGE_TEST_RAY=1): starting Ray and its workers takes about 1.5 min on
the 2-core CI machines, and tests/training/test_train_tiny.py already checks multi-process equality (torchrun)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.training.config import (DataConfig, DataSource, DistributedConfig, LoraConfig, ModelConfig, OptimConfig,
                                    TrainConfig)
from tests.training._synthetic import make_root

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.environ.get("MOTIONFORGE_TEST_RAY") != "1", reason="opt-in: MOTIONFORGE_TEST_RAY=1")

_SCRIPT = """
import json, sys
import ray
from stages.training.config import TrainConfig
from stages.training.ray_train import run_with_ray
cfg = TrainConfig.model_validate_json(open(sys.argv[1]).read())
if cfg.distributed.ray_workers:
    ray.init(num_cpus=4, include_dashboard=False)
    s = run_with_ray(cfg)
else:
    from stages.training.trainer import run_training
    s = run_training(cfg)
print("SUMMARY " + json.dumps(s))
"""


def _run(tmp: Path, root: str, name: str, per_device: int, ray_workers: int) -> dict:
    cfg = TrainConfig(
        output_dir=str(tmp / name), model=ModelConfig(model_id="tiny://qwen2_vl"),
        data=DataConfig(sources=(DataSource(path=root),), eval_fraction=0.0, num_frames=4, short_side=32),
        lora=LoraConfig(r=8, alpha=16, dropout=0.0),
        optim=OptimConfig(learning_rate=5e-3, per_device_batch_size=per_device, max_steps=6),
        dataloader_num_workers=0, report_to=(),
        distributed=DistributedConfig(ray_workers=ray_workers, ray_use_gpu=False))
    path = tmp / f"{name}.json"
    path.write_text(cfg.model_dump_json())
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(path)], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SUMMARY ")]
    assert proc.returncode == 0 and lines, proc.stderr[-5000:]
    return json.loads(lines[-1][len("SUMMARY "):])


def test_ray_train_two_workers_match_one_process(tmp_path):
    root = make_root(tmp_path, n_videos=4, per_video=2).url
    one = _run(tmp_path, root, "one", per_device=4, ray_workers=0)
    two = _run(tmp_path, root, "ray", per_device=2, ray_workers=2)
    assert two["world_size"] == 2 and two["global_batch_size"] == one["global_batch_size"]
    # as for torchrun DDP (test_train_tiny): only the all-reduce's float32 summation order differs
    for (s1, l1), (s2, l2) in zip(one["loss_curve"], two["loss_curve"]):
        assert s1 == s2 and l2 == pytest.approx(l1, rel=1e-4, abs=1e-4)
