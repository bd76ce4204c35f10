"""The flows and commands around training, end to end on tiny models: ``motionforge train`` (a Prefect flow
run with its artifacts), then the trained checkpoint through ``eval imove-it``, ``eval charades``,
``eval export-checkpoint`` and MotionBench's ``eval run --checkpoint``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests._cli import invoke
from tests.training._synthetic import make_root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prefect_harness):
    tmp = tmp_path_factory.mktemp("flows")
    root = make_root(tmp, n_videos=4, per_video=1)
    cfg = tmp / "train.json"
    cfg.write_text(json.dumps({
        "data": {"eval_fraction": 0.5, "split_seed": 1, "num_frames": 2, "short_side": 32},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "optim": {"learning_rate": 1e-3, "per_device_batch_size": 2},
        "save_steps": 2, "dataloader_num_workers": 0, "report_to": ["tensorboard"],
    }))
    invoke("train", "--out", root.url, "--name", "tiny", "--config", str(cfg), "--model", "tiny://internvl",
           "--max-steps", "3")
    return tmp, root, Path(root.url) / "training" / "tiny"


def test_train_command_runs_the_flow_and_publishes_artifacts(trained):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    _, _, run = trained
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 3 and [s for s, _ in summary["loss_curve"]] == [1, 2, 3]
    assert (run / "final" / "adapter_config.json").exists() and list((run / "tensorboard").glob("events.*"))
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["train-loss-curve"])))
        md = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["train-summary"])))
    assert arts and len(json.loads(arts[0].data)) == 3
    assert md and "samples/s" in md[0].data and summary["data_fingerprint"] in md[0].data


def test_eval_imove_it_scores_the_held_out_split(trained):
    _, root, run = trained
    invoke("eval", "imove-it", "--checkpoint", str(run / "final"), "--no-java")
    metrics = json.loads((run / "final" / "eval_imove_it" / "metrics.json").read_text())
    preds = [json.loads(l) for l in (run / "final" / "eval_imove_it" / "predictions.jsonl").read_text().splitlines()]
    tasks = {p["task"] for p in preds}
    assert tasks == {"spatial_grounding", "temporal_grounding", "dynamic_captioning"}
    tg = metrics["temporal_grounding"]
    assert set(tg) >= {"R@0.3", "R@0.5", "R@0.7", "mIoU", "unparseable"}
    # an untrained miniature rarely writes two time tokens: whatever it wrote without them is a listed miss
    from stages.shared.relative_tokens import parse_times

    no_times = sorted(p["sample_id"] for p in preds
                      if p["task"] == "temporal_grounding" and len(parse_times(p["answer"] or "")) < 2)
    assert sorted(tg["unparseable"]) == no_times
    assert set(metrics["spatial_grounding"]) >= {"box_mIoU", "Acc@0.5"}
    assert "CIDEr" in metrics["dynamic_captioning"] and "METEOR" in metrics["dynamic_captioning"]["skipped"]


def test_eval_charades_and_motionbench_on_the_checkpoint(trained, tmp_path):
    tmp, _, run = trained
    ann = tmp_path / "sta.txt"
    ann.write_text("clip0 0.2 1.2##a car moves from left to right.\nclip1 0.5 1.5##a dog jumps.\n")
    invoke("eval", "charades", "--checkpoint", str(run / "final"), "--annotations", str(ann), "--videos", str(tmp),
           "--out", str(tmp_path / "cha"))
    m = json.loads((tmp_path / "cha" / "metrics.json").read_text())["temporal_grounding"]
    assert m["n"] == 2 and set(m) >= {"R@0.3", "R@0.5", "R@0.7", "mIoU"}

    merged = tmp_path / "merged"
    invoke("eval", "export-checkpoint", "--checkpoint", str(run / "final"), "--to", str(merged))
    assert (merged / "config.json").exists() and not (merged / "adapter_config.json").exists()
    meta = tmp_path / "video_info.meta.jsonl"
    meta.write_text(json.dumps({"key": "clip0", "video_path": "clip0.mp4", "question_type": "Motion Recognition",
                                "qa": [{"uid": "q1", "question": "What moves?\nA. car\nB. dog\nC. ball\nD. none",
                                        "answer": "A"}]}) + "\n")
    for how in (["--model", str(merged)], ["--checkpoint", str(run / "final")]):
        invoke("eval", "run", *how, "--meta", str(meta), "--videos", str(tmp), "--num-frames", "2",
               "--short-side", "32", "--responses", str(tmp_path / "resp.json"), "--json")
        assert set(json.loads((tmp_path / "resp.json").read_text())) == {"q1"}

    # the eval deployment's MotionBench branch: same scorer, replies and accuracy written beside each other
    from flows.train import evaluate, metric_rows

    res = evaluate(checkpoint=str(run / "final"), benchmark="motionbench", annotations=str(meta), videos=str(tmp),
                   out=str(tmp_path / "mb"), num_frames=2)
    assert res["scored"] == 1 and "Motion Recognition" in res["per_category"]
    assert set(json.loads((tmp_path / "mb" / "responses.json").read_text())) == {"q1"}
    assert {r["metric"] for r in metric_rows(res)} >= {"Motion Recognition", "overall"}


def test_training_holds_gpu_slots_of_the_concurrency_limit(prefect_harness):
    """A training run takes one slot per process it starts, like the pipeline's GPU stages, and a missing limit
    is a clear error instead of an unguarded run."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from flows.pipeline import GpuLimitMissingError
    from flows.train import gpu_slots, gpus_needed
    from stages.training.config import DistributedConfig, TrainConfig

    cfg = TrainConfig(output_dir="x", distributed=DistributedConfig(nproc_per_node=2))
    assert gpus_needed(cfg) == 2
    assert gpus_needed(cfg.model_copy(update={"distributed": DistributedConfig(ray_workers=3)})) == 3
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="mf-train-gpu", limit=4))
        with gpu_slots(gpus_needed(cfg), "mf-train-gpu", "test run"):
            assert client.read_global_concurrency_limit_by_name("mf-train-gpu").active_slots == 2
        assert client.read_global_concurrency_limit_by_name("mf-train-gpu").active_slots == 0
    with pytest.raises(GpuLimitMissingError, match="setup-prefect"):
        with gpu_slots(1, "mf-no-such-limit", "test run"):
            pass
