"""Test driver: train from a config file and SIGKILL this process right after the checkpoint of step K is
saved (no clean-up, like a lost node). ``python tests/training/_run_killed.py CONFIG.json K``"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from transformers import TrainerCallback

from stages.training.config import TrainConfig
from stages.training.trainer import run_training


class KillAfterSave(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kw):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    cfg = TrainConfig.model_validate(json.loads(Path(sys.argv[1]).read_text(encoding="utf-8")))
    run_training(cfg, extra_callbacks=(KillAfterSave(int(sys.argv[2])),))
    sys.exit(3)  # not reached when the kill fires
