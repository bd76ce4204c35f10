"""The papers' model parts (issue 18) trained through the training flow (issue 17) by config: a tiny Qwen2-VL
with TE Fusion (rate 2) and the added position tokens ("tokens" mode), LoRA or full fine-tuning, through the
real ``run_training`` / Trainer path; the checkpoint then re-evaluated through ``stages.training.evaluate``."""
from __future__ import annotations

import re

import pytest
import torch

from stages.training.config import DataConfig, DataSource, LoraConfig, ModelConfig, ModelPart, OptimConfig, TrainConfig
from tests.training._synthetic import make_root

PARTS = ModelPart(target="stages.training.parts:papers_model_parts",
                  kwargs={"temporal_fusion": {"method": "te_fusion", "rate": 2}, "position_tokens": {"mode": "tokens"}})
STEPS = 8
_BOX = re.compile(r"\[(\d+), (\d+), (\d+), (\d+)\]")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("parts_root"), n_videos=4, per_video=1)


def _cfg(root, out, method="lora", parts=(PARTS,)) -> TrainConfig:
    # 4 frames = 2 Qwen2-VL time slots: divisible by the fusion rate 2
    data = DataConfig(sources=(DataSource(path=str(root.url)),), eval_fraction=0.5, split_seed=1, num_frames=4,
                      short_side=32)
    return TrainConfig(output_dir=str(out), model=ModelConfig(model_id="tiny://qwen2_vl"), data=data, method=method,
                       lora=LoraConfig(r=4, alpha=8, dropout=0.0),
                       optim=OptimConfig(learning_rate=5e-3, per_device_batch_size=2, max_steps=STEPS, seed=3),
                       model_parts=parts, save_steps=4, dataloader_num_workers=0, report_to=())


def _to_tokens(text: str) -> str:
    """The codec's box form -> coordinate tokens, written here from the documented forms ([x1, y1, x2, y2] on the
    0-1000 grid; one <cN> per value), not by calling the codec."""
    return _BOX.sub(lambda m: "[" + ", ".join(f"<c{v}>" for v in m.groups()) + "]", text)


def test_collator_writes_coordinate_tokens_and_fuses_the_video_placeholders(root, tmp_path):
    from experts.model_parts import TemporalFusionTower, attached_parts
    from stages.training.collator import IGNORE_INDEX, VlmCollator
    from stages.training.data import VideoConversationDataset, load_samples
    from stages.training.model import load_model_for_training

    cfg = _cfg(root, tmp_path / "run")
    model, processor = load_model_for_training(cfg)
    parts = attached_parts(model)
    assert parts is not None and isinstance(model.base_model.model.model.visual, TemporalFusionTower)
    samples = load_samples(cfg.data, "train")
    ds = VideoConversationDataset(samples, 4, 32, train=False)
    items = [ds[i] for i in range(len(ds))]
    plain = VlmCollator(processor, 4)(items)  # the default path, for the unfused layout
    vid = model.config.video_token_id
    batch = VlmCollator(processor, 4, parts=parts, video_token_id=vid)(items)
    # the decoder sees half the time slots: grid and placeholders (merge 2x2) shrink by the rate
    assert (batch["video_grid_thw"][:, 0] * 2 == plain["video_grid_thw"][:, 0]).all()
    per_row = (batch["input_ids"] == vid).sum(1)
    assert per_row.tolist() == (batch["video_grid_thw"].prod(-1) // 4).tolist()
    assert ((plain["input_ids"] == vid).sum(1) == 2 * per_row).all()
    tok = processor.tokenizer
    coord_rows = 0
    for r, s in enumerate(samples):
        learned = tok.decode(batch["input_ids"][r][batch["labels"][r] != IGNORE_INDEX])
        replies = [t for role, t in s.conversations if role == "gpt"]
        assert learned == "".join(f"{_to_tokens(t)}<|im_end|>\n" for t in replies)
        if _BOX.search(replies[0]):
            coord_rows += 1
            # each coordinate is one added token, not digits
            ids = batch["input_ids"][r][batch["labels"][r] != IGNORE_INDEX].tolist()
            assert sum(i in set(parts.new_token_ids) for i in ids) >= 8  # two boxes
    assert coord_rows > 0
    # the batch runs through the fused model, and the parts' parameters and the new token rows get gradient
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("temporal_proj" in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())
    assert any("slot_embed" in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())
    assert any("trainable_tokens_delta" in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())


@pytest.fixture(scope="module", params=["lora", "full"])
def trained(request, root, tmp_path_factory):
    from stages.training.trainer import run_training

    cfg = _cfg(root, tmp_path_factory.mktemp(f"parts_{request.param}") / "run", method=request.param)
    return cfg, run_training(cfg)


def test_training_moves_the_fusion_weights_and_the_new_token_rows(trained):
    from pathlib import Path

    from safetensors.torch import load_file

    cfg, summary = trained
    losses = [loss for _, loss in summary["loss_curve"]]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    # eight steps at lr 5e-3: the mean of the last three batches' losses is below the first three's (seen:
    # 7.8 -> 7.3 with LoRA; a batch's loss swings by ~0.3 with its samples, hence means, not single steps)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    final = Path(summary["final"])
    for folder in (final, Path(cfg.output_dir) / "checkpoints" / "checkpoint-4"):
        saved = load_file(str(folder / "model_parts.safetensors"))
        proj = [v for k, v in saved.items() if k.endswith("temporal_proj.weight")][0]
        slot = [v for k, v in saved.items() if k.endswith("slot_embed")][0]
        d = proj.shape[0]
        init = torch.cat([torch.eye(d) / 2] * 2, dim=1)  # the documented start: the mean of the 2 slots
        # AdamW's first steps move every weight that has a gradient by ~lr = 5e-3; 1e-4 is far above float noise
        assert (proj - init).abs().max() > 1e-4 and slot.abs().max() > 1e-4  # slot embedding starts at zero


def test_the_checkpoint_reapplies_the_parts_and_evaluates(trained, tmp_path):
    from pathlib import Path

    from safetensors.torch import load_file

    from experts.model_parts import TemporalFusionTower, attached_parts
    from experts.vlm import VlmSpec, load_transformers_weights, vlm_from_loaded
    from stages.training import evaluate as ev

    cfg, summary = trained
    final = Path(summary["final"])
    model, processor, got_cfg = ev.load_checkpoint(final, device="cpu", merge=cfg.method == "lora")
    assert got_cfg.model_parts == (PARTS,)
    parts = attached_parts(model)
    assert parts is not None and isinstance(model.model.visual, TemporalFusionTower)
    # the trained fusion weights are the ones in use
    saved = load_file(str(final / "model_parts.safetensors"))
    params = dict(model.named_parameters())
    for k, v in saved.items():
        assert torch.equal(params[k].detach().cpu(), v), k
    # the new token rows that training saw moved away from their initialisation (mean of the value's digit
    # rows in the base checkpoint, computed here from the base model and tokenizer)
    base, base_proc = load_transformers_weights(VlmSpec(model_id="tiny://qwen2_vl", device="cpu"))
    base_emb = base.get_input_embeddings().weight
    emb = model.get_input_embeddings().weight.detach()
    tok = processor.tokenizer
    moved = 0
    for t in ("<c0>", "<c1000>", "<150>") + tuple(f"<c{v}>" for v in range(0, 1001, 7)):
        digits = base_proc.tokenizer(re.search(r"\d+", t).group(), add_special_tokens=False)["input_ids"]
        init = base_emb[digits].mean(0)
        if (emb[tok.convert_tokens_to_ids(t)] - init).abs().max() > 1e-4:
            moved += 1
    assert moved > 0
    # generation runs on the fused layout and answers come back in the codec's forms
    vlm = vlm_from_loaded(model, processor, VlmSpec(model_id="tiny://qwen2_vl", batch_size=2))
    samples = ev.held_out_samples(got_cfg)
    metrics = ev.evaluate_imove_it(vlm, samples, got_cfg.data.num_frames, got_cfg.data.short_side, tmp_path / "ev",
                                   batch_size=2, max_new_tokens=12, use_java=False)
    assert metrics["errors"] == {}
    answers = (tmp_path / "ev" / "predictions.jsonl").read_text()
    assert not re.search(r"<c\d+>", answers)
    # the expert's side of it, seen through a stand-in for `generate` that answers with coordinate tokens: the
    # prompt's box went in as coordinate tokens, the video as the fused layout, the answer comes back as a box
    import numpy as np

    from experts.vlm import VlmRequest

    seen = {}
    answer_ids = tok("[<c12>, <c34>, <c560>, <c78>]<|im_end|>", add_special_tokens=False,
                     return_tensors="pt")["input_ids"]

    def fake_generate(**kw):
        seen.update(kw)
        return torch.cat([kw["input_ids"], answer_ids.expand(kw["input_ids"].shape[0], -1)], dim=1)

    model.generate = fake_generate
    frames = tuple(np.full((32, 32, 3), 40 * i, dtype=np.uint8) for i in range(4))
    resp = vlm.generate([VlmRequest(text="Where is [10, 20, 300, 400]?", images=frames, as_video=True,
                                    max_new_tokens=8, temperature=0.0)])[0]
    assert resp.error is None and resp.text == "[12, 34, 560, 78]"
    prompt = tok.decode(seen["input_ids"][0])
    assert "Where is [<c10>, <c20>, <c300>, <c400>]?" in prompt
    vid = model.config.video_token_id
    assert seen["video_grid_thw"][0, 0] == 1  # 4 frames = 2 slots, fused by 2
    assert int((seen["input_ids"] == vid).sum()) == int(seen["video_grid_thw"].prod()) // 4


def test_saved_part_weights_must_fit_the_reapplied_parts(trained, tmp_path):
    import shutil
    from pathlib import Path

    from stages.training import evaluate as ev

    cfg, summary = trained
    ck = tmp_path / "ck"
    shutil.copytree(summary["final"], ck)
    import json

    fp = json.loads((ck / "motionforge_fingerprint.json").read_text())
    fp["config"]["model_parts"][0]["kwargs"]["temporal_fusion"] = {"method": "post_mlp", "rate": 2}
    (ck / "motionforge_fingerprint.json").write_text(json.dumps(fp))
    # LoRA: the parts file is refused; full: the saved state dict already does not fit
    with pytest.raises(ValueError, match="do not match the re-applied parts|do not fit the model"):
        ev.load_checkpoint(Path(ck), device="cpu")


EVENTS = ModelPart(target="stages.training.parts:papers_model_parts",
                   kwargs={"event_compression": {"enabled": True, "num_events": 2}})


def _event_cfg(root, out, method="lora"):
    # 4 sampled frames -> 4 tower slots (each frame repeated to fill one); 56 px short side: 64x48 clips become
    # 84x56, 6x4 patches, 3x2 merged tokens per slot (a grid the stride 2 does not divide in width)
    cfg = _cfg(root, out, method=method, parts=(EVENTS,))
    data = cfg.data.model_copy(update={"short_side": 56})
    return cfg.model_copy(update={"data": data, "optim": cfg.optim.model_copy(update={"max_steps": 2}), "save_steps": 2})


def test_event_compression_batches_and_gradients_reach_every_trainable_part(root, tmp_path):
    """Full fine-tuning with the vision tower trainable: the collator's batch has the compressed number of video
    placeholders, and one backward pass reaches every trainable parameter, tower included (through the kept
    and pooled tokens)."""
    from experts.model_parts import attached_parts
    from stages.training.collator import VlmCollator
    from stages.training.data import VideoConversationDataset, load_samples
    from stages.training.model import load_model_for_training

    cfg = _event_cfg(root, tmp_path / "run", method="full").model_copy(update={"freeze_vision_tower": False})
    model, processor = load_model_for_training(cfg)
    parts = attached_parts(model)
    assert parts is not None and parts.event_compression is not None and not parts.new_parameters
    items = [VideoConversationDataset(load_samples(cfg.data, "train"), 4, 56, train=False)[i] for i in range(2)]
    vid = model.config.video_token_id
    batch = VlmCollator(processor, 4, parts=parts, video_token_id=vid)(items)
    grid = batch["video_grid_thw"]
    assert grid[:, 0].tolist() == [4, 4]  # one slot per sampled frame
    for row, (t, h, w) in zip(batch["input_ids"], grid.tolist()):
        h, w = h // 2, w // 2
        # iMOVE's count written out: 2 event frames at h x w, the other t - 2 pooled 2 x 2 (ceil at an odd edge)
        assert int((row == vid).sum()) == 2 * h * w + (t - 2) * ((h + 1) // 2) * ((w + 1) // 2)
    model.train()
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("model.visual.") for n, _ in trainable)
    for name, p in trainable:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_event_compression_trains_with_the_trainer_and_answers_through_evaluation(root, tmp_path):
    """The production path: run_training (Trainer, LoRA) with event compression by config, then the checkpoint
    re-applied by stages.training.evaluate and answering held-out samples through the VLM expert's generate."""
    from experts.model_parts import attached_parts
    from experts.vlm import VlmSpec, vlm_from_loaded
    from stages.training import evaluate as ev
    from stages.training.trainer import run_training

    cfg = _event_cfg(root, tmp_path / "run")
    summary = run_training(cfg)
    losses = [loss for _, loss in summary["loss_curve"]]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    model, processor, got = ev.load_checkpoint(summary["final"], device="cpu", merge=True)
    assert got.model_parts == (EVENTS,) and attached_parts(model).event_compression is not None
    vlm = vlm_from_loaded(model, processor, VlmSpec(model_id="tiny://qwen2_vl", batch_size=2))
    samples = ev.held_out_samples(got)
    metrics = ev.evaluate_imove_it(vlm, samples, got.data.num_frames, got.data.short_side, tmp_path / "ev",
                                   batch_size=2, max_new_tokens=4, use_java=False)
    assert metrics["errors"] == {}
    assert len((tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()) == len([s for s in samples if s.task])


def test_a_resumed_run_continues_with_the_trained_part_weights(trained, tmp_path):
    """Checkpoint-4 copied to a new run folder and resumed: steps 5-8 repeat the uninterrupted run's losses,
    which they cannot if the fusion weights restarted from their initialisation (a LoRA checkpoint holds the
    adapter only; the parts' weights come from model_parts.safetensors)."""
    import shutil
    from pathlib import Path

    from stages.training.trainer import run_training

    cfg, summary = trained
    run = tmp_path / "resumed"
    shutil.copytree(Path(cfg.output_dir) / "checkpoints" / "checkpoint-4", run / "checkpoints" / "checkpoint-4")
    again = run_training(cfg.model_copy(update={"output_dir": str(run)}))
    assert again["resumed_from"].endswith("checkpoint-4") and again["steps_this_run"] == STEPS - 4
    first, resumed = dict(summary["loss_curve"]), dict(again["loss_curve"])
    # same process, same data order and frames: only the checkpoint's float32 round trip differs
    for step in range(5, STEPS + 1):
        assert resumed[step] == pytest.approx(first[step], abs=1e-4), step
