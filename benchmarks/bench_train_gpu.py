"""Training throughput on a GPU: LoRA (iMOVE B.1) vs full fine-tuning of a full-size random-initialised VLM
through the production training path (stages.training: loader, collator, Trainer).

    python benchmarks/bench_train_gpu.py [--size 2b|7b] [--steps 20] [--batch 2] [--frames 8] [--side 448]
    python benchmarks/bench_train_gpu.py --tiny --steps 3      # CPU smoke run of this script (tiny model)

Per method it prints (and writes to <work>/bench_train.json): samples/s, tokens/s (non-padding input tokens,
vision tokens included), peak GPU memory, trainable parameters, and the loss of the first and last step.
Each method runs in its own process so the peak memory of one does not hide in the other's. Random weights
and synthetic clips (ffmpeg testsrc): the numbers measure speed, not learning. No network is needed: the
tokenizer is the tiny in-memory one, the model has Qwen2-VL's published 2B (or 7B) shape.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    # Qwen2-VL-2B-Instruct / 7B-Instruct published text shapes; the vision tower is the same 675M ViT in both
    "2b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
               num_key_value_heads=2),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4),
}


def build_full(out: Path, size: str, side: int) -> None:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, \
        Qwen2VLProcessor, Qwen2VLVideoProcessor

    from experts.llm import build_tiny_qwen_tokenizer
    from experts.vlm import _tiny_vision_ids

    tok = build_tiny_qwen_tokenizer()
    ids = tok.convert_tokens_to_ids
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=151936, max_position_embeddings=32768, **SHAPES[size],
                         rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
                         bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                         pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=SHAPES[size]["hidden_size"], num_heads=16,
                           mlp_ratio=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        **_tiny_vision_ids(tok),
    )
    with torch.device("cuda"):
        model = Qwen2VLForConditionalGeneration(cfg).to(torch.bfloat16)
    pixels = dict(min_pixels=128 * 28 * 28, max_pixels=side * side)
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels),
                            video_processor=Qwen2VLVideoProcessor(**pixels, cap_pixels_per_frame=True),
                            tokenizer=tok, chat_template=tok.chat_template)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    del model
    torch.cuda.empty_cache()


def make_export(work: Path, n_clips: int, side: int) -> Path:
    """An ``export imove-it``-style JSONL over synthetic clips, written with the production sample builder."""
    import uuid

    from schemas.captions import Caption
    from stages.imove_it.tasks import TasksConfig, build_samples
    from stages.shared.prompts import load_json_prompt

    templates = load_json_prompt("imove_it", "task_templates.v1")
    path = work / "imove_it.jsonl"
    lines = []
    for v in range(n_clips):
        clip = work / f"clip{v}.mp4"
        if not clip.exists():
            subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                            f"testsrc=size={side}x{side}:rate=25:duration=4", "-c:v", "libx264", "-preset",
                            "ultrafast", "-pix_fmt", "yuv420p", str(clip)], check=True)
        cap = Caption(instance_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"bench{v}")), clip_id=f"clip{v}",
                      video_id=f"v{v}", video_path=str(clip), label="object", clip_start_s=0.0, clip_end_s=4.0,
                      width=side, height=side, t1_s=0.5, t2_s=3.0, box1_xyxy_px=[10.0, 20.0, 100.0, 120.0],
                      box2_xyxy_px=[200.0, 40.0, 300.0, 160.0], prompt_version="bench", frame_times_s=[0.5, 3.0],
                      static_caption="a colourful test pattern",
                      dynamic_caption="The object slides from the upper left toward the right edge while rotating.")
        for s in build_samples(cap, TasksConfig(), templates):
            lines.append(json.dumps({"id": s.sample_id, "video": s.video_path, "clip_start_s": 0.0,
                                     "clip_end_s": 4.0, "task": s.task, "conversations": s.conversations}))
    path.write_text("\n".join(lines) + "\n")
    return path


def run_one(args) -> dict:
    """One method in this process: train ``--steps`` steps, report throughput and peak memory."""
    import torch

    from stages.training.config import DataConfig, DataSource, LoraConfig, ModelConfig, OptimConfig, TrainConfig
    from stages.training.trainer import run_training

    cuda = torch.cuda.is_available()
    cfg = TrainConfig(
        output_dir=str(Path(args.work) / f"run_{args.method}"),
        model=ModelConfig(model_id=args.model, dtype="bf16" if cuda else "fp32",
                          gradient_checkpointing=args.grad_ckpt),
        data=DataConfig(sources=(DataSource(path=args.data),), eval_fraction=0.0, num_frames=args.frames,
                        short_side=args.side),
        method=args.method, lora=LoraConfig(r=64, alpha=128, dropout=0.05),
        optim=OptimConfig(learning_rate=2e-4 if args.method == "lora" else 1e-5, per_device_batch_size=args.batch,
                          max_steps=args.steps),
        save_steps=10 ** 6, save_total_limit=1, dataloader_num_workers=4 if cuda else 0, report_to=(), bf16=cuda,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    summary = run_training(cfg, resume=False)
    wall = time.perf_counter() - t0
    curve = summary["loss_curve"]
    return {"method": args.method, "steps": summary["global_step"], "batch": args.batch, "frames": args.frames,
            "samples_per_s": round(summary["samples_per_s"], 3), "tokens_per_s": round(summary["tokens_per_s"], 1),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None,
            "wall_s_incl_load_and_save": round(wall, 1), "parameters": summary["parameters"],
            "trainable": summary["trainable"],
            "loss_first": round(curve[0][1], 4), "loss_last": round(curve[-1][1], 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/bench_train")
    ap.add_argument("--size", choices=sorted(SHAPES), default="2b")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--side", type=int, default=448)
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (less memory, slower)")
    ap.add_argument("--methods", default="lora,full")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny://qwen2_vl, small frames")
    ap.add_argument("--method", help=argparse.SUPPRESS)  # internal: run one method in this process
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.method:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    import torch

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        model, args.side, args.frames = "tiny://qwen2_vl", 64, 2
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: this benchmark needs a GPU (use --tiny for a CPU smoke run)")
        model = str(work / f"qwen2vl_{args.size}_random")
        if not (Path(model) / "config.json").exists():
            t0 = time.perf_counter()
            build_full(Path(model), args.size, args.side)
            print(f"built {model} in {time.perf_counter() - t0:.0f}s", flush=True)
    data = make_export(work, args.clips, args.side)
    results = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
               "model": "tiny://qwen2_vl" if args.tiny else f"Qwen2-VL-{args.size} shape, random init", "runs": []}
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--method", method, "--model", model, "--data", str(data), "--work",
               str(work), "--steps", str(args.steps), "--batch", str(args.batch), "--frames", str(args.frames),
               "--side", str(args.side)] + (["--grad-ckpt"] if args.grad_ckpt else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            results["runs"].append({"method": method, "error": proc.stderr[-2000:]})
        else:
            results["runs"].append(json.loads(line[-1][len("RESULT "):]))
        print(json.dumps(results["runs"][-1]), flush=True)
    (work / "bench_train.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
