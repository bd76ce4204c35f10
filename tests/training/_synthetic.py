"""A small synthetic iMOVE-IT output root: real encoded clips (ffmpeg testsrc) and a ``tasks`` table made by
the production sample builder (stages.imove_it.tasks.build_samples) from hand-made captions."""
from __future__ import annotations

import uuid
from pathlib import Path

from schemas.captions import Caption
from stages.imove_it.tasks import TasksConfig, build_samples
from stages.shared.prompts import load_json_prompt
from storage.root import OutputRoot
from tests._stage_tables import write_stage
from tests._video_fixtures import make_testsrc, require_ffmpeg

LABELS = ("car", "dog", "ball", "person")
MOTIONS = ("moves from left to right.", "jumps up and lands.", "rolls toward the camera.", "walks away slowly.")


def make_root(tmp: Path, n_videos: int = 4, per_video: int = 2) -> OutputRoot:
    """``n_videos`` 2 s clips of 64x48 px, ``per_video`` instances each, three task samples per instance."""
    require_ffmpeg()
    root = OutputRoot(str(tmp / "root"))
    templates = load_json_prompt("imove_it", "task_templates.v1")
    cfg = TasksConfig()
    rows = []
    for v in range(n_videos):
        path = make_testsrc(tmp / f"clip{v}.mp4", width=64, height=48, rate=10, duration_s=2.0)
        for k in range(per_video):
            i = v * per_video + k
            t1, t2 = 0.2 + 0.1 * k, 1.2 + 0.2 * k
            cap = Caption(
                instance_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"inst{i}")), clip_id=f"clip{v}", video_id=f"v{v}",
                video_path=str(path), label=LABELS[i % 4], clip_start_s=0.0, clip_end_s=2.0, width=64, height=48,
                t1_s=t1, t2_s=t2, box1_xyxy_px=[4.0 + k, 6.0, 30.0 + k, 40.0], box2_xyxy_px=[30.0, 8.0 + k, 60.0, 44.0],
                prompt_version="test", frame_times_s=[t1, t2], static_caption=f"a red {LABELS[i % 4]}",
                dynamic_caption=f"The {LABELS[i % 4]} {MOTIONS[(i + k) % 4]}")
            rows += build_samples(cap, cfg, templates)
    write_stage(root, "tasks", 0, rows)
    return root
