"""``tiny://ram_plus``: a random-initialised miniature RAM++ written as a checkpoint + vocabulary files.

Same modules and state-dict layout as the released model (Swin with shifted windows and attention masks,
description reweighting, query-to-label head), at 64 px with 24 tags x 3 descriptions, so it runs in
milliseconds on a CPU. It is loaded back through ``load_ram_plus`` like a real checkpoint. Outputs are not
meaningful; the thresholds are set so that some tags pass for typical images and data flows downstream.
"""
from __future__ import annotations

from pathlib import Path

from experts.base import register_tiny

from .spec import TAG_LIST_FILE, TAG_THRESHOLD_FILE

TINY_CHECKPOINT_FILE = "ram_plus_tiny.pth"

# Everyday, mostly movable things and motions, so a tiny smoke run produces plausible detector prompts.
TINY_TAGS = (
    "person", "dog", "cat", "car", "bicycle", "ball", "horse", "bird", "boat", "bus", "child", "skateboard",
    "tree", "road", "grass", "water", "sky", "building", "table", "chair", "run", "jump", "walk", "dance",
)


@register_tiny("ram_plus")
def build_tiny_ram_plus(out_dir: Path) -> None:
    import torch

    from .model import RamPlusConfig, build_ram_plus_model

    cfg = RamPlusConfig.for_variant("tiny")
    assert cfg.num_tags == len(TINY_TAGS)
    generator = torch.Generator().manual_seed(0)
    model = build_ram_plus_model(cfg)
    model.init_random_weights(generator)
    with torch.no_grad():
        # Wider output weights than the 0.02 default so tag scores spread over (0, 1) instead of all ~0.5.
        model.fc.weight.copy_(torch.randn(model.fc.weight.shape, generator=generator) * 0.5)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, out_dir / TINY_CHECKPOINT_FILE)
    (out_dir / TAG_LIST_FILE).write_text("\n".join(TINY_TAGS) + "\n", encoding="utf-8")
    # Per-tag thresholds that differ (as in the released file), high enough that a handful of tags pass.
    thresholds = [0.85 if i % 2 else 0.9 for i in range(len(TINY_TAGS))]
    (out_dir / TAG_THRESHOLD_FILE).write_text("\n".join(f"{t:.2f}" for t in thresholds) + "\n", encoding="utf-8")
