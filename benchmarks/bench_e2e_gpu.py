"""End-to-end GPU benchmark: videos per GPU-hour for each stage and each branch, GPU utilisation, peak memory.

What runs: the ``paper`` profile's pipeline over generated 720p videos of 10-60 s (shots of ffmpeg's test
sources, hard cuts between them), every stage through the production runner (``stages.runner.run_shard``,
no Prefect: orchestration is measured by bench_orchestration.py), one shard after another on one GPU.

Models, full size, random weights (no hub needed):

* the chat stages run in-process (``--backend transformers`` or ``vllm``) on random checkpoints of the
  published shapes: Qwen2-VL-7B-Instruct for caption / check / describe / the first-frame judges (the paper
  profile's InternVL2-40B, Qwen2-VL-72B and GPT-4o are endpoints; ``--vlm-shape 72b`` builds the 72B shape,
  which needs ~150 GB in bf16), Qwen2.5-7B-Instruct for qgen (GPT-4o's architecture is not public). The
  tokenizer is the in-memory tiny one (vocabulary padded to the real size); EOS is disabled so unconstrained
  replies run to max_new_tokens (an upper bound), while JSON-constrained ones stop when the grammar ends.
* the vision experts (RAM++, Grounding DINO, SAM 2.1, CLIP) use the paper profile's checkpoints, which must
  resolve locally (HF cache or $MOTIONFORGE_WEIGHTS); when they do not, the iMOVE-IT stages are reported as
  not measured and the MotionBench branch still runs.

Reported per stage: wall seconds, videos per GPU-hour (videos / stage hours), GPU utilisation (mean and p90
of nvidia-smi samples every 0.5 s while the stage ran), peak GPU memory (torch.cuda.max_memory_allocated),
rows ok / error; per branch: videos per GPU-hour over the branch's stages plus the common ones (ingest,
scenes). Results go to stdout and --json.

    python benchmarks/bench_e2e_gpu.py --videos 16 [--backend transformers|vllm] [--shard-size 4] [--json out.json]

The image stages run their batched, prefetched paths: ``--batch-size`` clips per RAM++ / Grounding DINO call
and per CLIP call of trackfilter (their crops in one forward pass), first frames and track frames decoded on a
prefetch thread while the models work (``stages.shared.prefetch``); the chat stages get the same batch size.

Smoke mode, to check the script runs end to end without a GPU: ``--device cpu --tiny`` takes the ``tiny``
profile's random miniatures of the same architectures (``tiny://``), 2 small videos of 3-6 s, and hides any
GPU (CUDA_VISIBLE_DEVICES=""); its "videos per hour" are CPU figures of the miniatures, not a throughput claim.

    python benchmarks/bench_e2e_gpu.py --device cpu --tiny --videos 2 --shard-size 1

Status: written for the device runner; not run in the session that wrote it (no GPU was lent).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COMMON = ("ingest", "scenes")
BRANCHES = {
    "imove_it": ("tag", "detect", "track", "trackfilter", "caption", "check", "tasks"),
    "motionbench": ("describe", "qgen", "ffilter", "review", "finalize"),
}
SHAPES = {
    # published configs (config.json of the released checkpoints)
    "qwen2_vl_7b": dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                                  num_key_value_heads=4), vision=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16)),
    "qwen2_vl_72b": dict(text=dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                                   num_key_value_heads=8), vision=dict(depth=32, embed_dim=1280, hidden_size=8192, num_heads=16)),
    "qwen2_5_7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4),
}
VOCAB = 152064


def make_videos(folder: Path, n: int, seed: int = 0, size: tuple[int, int] = (1280, 720),
                duration_s: tuple[float, float] = (10, 60), shot_s: tuple[float, float] = (2, 12)) -> list[Path]:
    """H.264 videos (720p, 10-60 s by default), shots of 2-12 s from different test sources (hard cuts between)."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    sources = ["testsrc2", "smptehdbars", "mandelbrot", f"life=s={w}x{h}:mold=10:ratio=0.1", f"cellauto=s={w}x{h}",
               "rgbtestsrc"]
    out = []
    for i in range(n):
        p = folder / f"e2e_{w}x{h}_{i:04d}.mp4" if size != (1280, 720) else folder / f"e2e_{i:04d}.mp4"
        out.append(p)
        if p.exists():
            continue
        total = rng.uniform(*duration_s)
        shots, t = [], 0.0
        while t < total:
            d = min(rng.uniform(*shot_s), total - t)
            shots.append((rng.choice(sources), max(d, 0.5)))
            t += d
        inputs, filt = [], []
        for k, (src, d) in enumerate(shots):
            spec = src if "=" in src else f"{src}=s={w}x{h}"
            inputs += ["-f", "lavfi", "-t", f"{d:.2f}", "-i", f"{spec}:r=25" if "=s=" in spec else spec]
            filt.append(f"[{k}:v]scale={w}:{h},fps=25,format=yuv420p,setsar=1[v{k}]")
        graph = ";".join(filt) + ";" + "".join(f"[v{k}]" for k in range(len(shots))) + f"concat=n={len(shots)}:v=1:a=0[out]"
        subprocess.run(["ffmpeg", "-v", "error", "-y", *inputs, "-filter_complex", graph, "-map", "[out]", "-c:v", "libx264",
                        "-preset", "veryfast", "-crf", "23", str(p)], check=True)
    return out


def _tokenizer():
    from experts.llm import build_tiny_qwen_tokenizer

    return build_tiny_qwen_tokenizer()


def build_vlm(out: Path, shape: str) -> None:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor, \
        Qwen2VLVideoProcessor

    from experts.vlm import _tiny_vision_ids

    if (out / "config.json").exists():
        return
    tok = _tokenizer()
    ids = tok.convert_tokens_to_ids
    s = SHAPES[shape]
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=VOCAB, max_position_embeddings=32768, **s["text"],
                         rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
                         bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(mlp_ratio=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, **s["vision"]),
        **_tiny_vision_ids(tok),
    )
    with torch.device("cuda"):
        model = Qwen2VLForConditionalGeneration(cfg).to(torch.bfloat16)
    pixels = dict(min_pixels=256 * 28 * 28, max_pixels=448 * 448)
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels),
                            video_processor=Qwen2VLVideoProcessor(**pixels, cap_pixels_per_frame=True),
                            tokenizer=tok, chat_template=tok.chat_template)
    model.generation_config.eos_token_id = None  # random weights: unconstrained replies run to max_new_tokens
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    proc.save_pretrained(out)
    del model
    torch.cuda.empty_cache()


def build_llm(out: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if (out / "config.json").exists():
        return
    tok = _tokenizer()
    ids = tok.convert_tokens_to_ids
    cfg = Qwen2Config(vocab_size=VOCAB, max_position_embeddings=32768, rope_theta=1e6, **SHAPES["qwen2_5_7b"],
                      bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    torch.cuda.empty_cache()


class GpuSampler:
    """nvidia-smi utilisation and memory samples every ``interval`` seconds, on a thread."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.samples, self._stop = interval, [], threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                line = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                                       "-i", "0"], capture_output=True, text=True, timeout=5).stdout.strip()
                util, mem = (float(x) for x in line.split(",")[:2])
                self.samples.append((time.perf_counter(), util, mem))
            except Exception:  # noqa: BLE001 -- a missed sample is not an error
                pass

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(timeout=5)

    def window(self, t0: float, t1: float) -> dict:
        u = sorted(s[1] for s in self.samples if t0 <= s[0] <= t1)
        if not u:
            return {"gpu_util_mean": None, "gpu_util_p90": None, "samples": 0}
        return {"gpu_util_mean": round(sum(u) / len(u), 1), "gpu_util_p90": u[int(0.9 * (len(u) - 1))], "samples": len(u)}


def pipeline_config(args, vlm_dir: Path | None, llm_dir: Path | None):
    from flows.config import load_pipeline_config

    # the image stages' batched paths: clips per RAM++ / Grounding DINO call, clips per CLIP call in trackfilter
    vision = {n: {"batch_size": args.batch_size} for n in ("tag", "detect", "trackfilter")}
    if args.tiny:  # the tiny profile's own miniatures (tiny://), with this run's batch size
        chat_bs = {"batch_size": args.batch_size}
        return load_pipeline_config("tiny", overrides={
            "ingest": {"shard_size": args.shard_size}, **vision,
            "caption": {"vlm": chat_bs}, "check": {"vlm": chat_bs}, "describe": {"vlm": chat_bs},
            "qgen": {"llm": chat_bs}})
    chat = {"backend": args.backend, "device": "cuda", "dtype": "bf16", "batch_size": args.batch_size}
    vlm = {"model_id": str(vlm_dir), **chat}
    judges = [{"name": f"judge-{i}", "vlm": {**vlm, "max_new_tokens": 16}} for i in range(args.judges)]
    overrides = {
        "ingest": {"shard_size": args.shard_size},
        "caption": {"vlm": vlm}, "check": {"vlm": vlm}, "describe": {"vlm": vlm},
        "qgen": {"llm": {"model_id": str(llm_dir), **chat, "max_new_tokens": 2048}},
        "ffilter": {"judges": judges}, **vision,
    }
    return load_pipeline_config("paper", overrides=overrides)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=4)
    ap.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--judges", type=int, default=2, help="first-frame judges (all the same random VLM shape)")
    ap.add_argument("--vlm-shape", choices=["7b", "72b"], default="7b")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "motionforge-e2e-gpu")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny profile's miniatures and small videos (smoke mode)")
    args = ap.parse_args()
    if args.device == "cpu":
        if not args.tiny:
            raise SystemExit("--device cpu runs only with --tiny: the full-size random checkpoints need a GPU")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA: every expert resolves to the CPU

    import torch

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench_e2e_gpu needs a CUDA GPU (or run the smoke mode: --device cpu --tiny)")
    from experts.base import clear_expert_cache
    from flows.pipeline import plan_inputs
    from stages.registry import available_stages, get_stage, order
    from stages.runner import InputsNotReadyError, plan_shards, run_shard
    from storage.manifest import record_stage_config
    from storage.root import OutputRoot

    t0 = time.perf_counter()
    if args.tiny:
        video_dir = args.dir / "videos-tiny"
        videos = make_videos(video_dir, args.videos, size=(320, 240), duration_s=(3, 6), shot_s=(1, 3))
        vlm_dir = llm_dir = None
    else:
        video_dir = args.dir / "videos"
        videos = make_videos(video_dir, args.videos)
        vlm_dir, llm_dir = args.dir / f"qwen2_vl_{args.vlm_shape}", args.dir / "qwen2_5_7b"
        build_vlm(vlm_dir, f"qwen2_vl_{args.vlm_shape}")
        build_llm(llm_dir)
    print(f"inputs and random checkpoints ready in {time.perf_counter() - t0:.0f}s ({args.dir})")

    pc = pipeline_config(args, vlm_dir, llm_dir)
    cfg = pc.model_dump(mode="json")
    out = args.dir / (f"root-tiny-{args.device}" if args.tiny else f"root-{args.backend}")
    root = OutputRoot(str(out))
    plan_inputs.fn(str(video_dir), str(out), args.shard_size, list(pc.ingest.extensions))
    names = order(available_stages())
    for n in names:
        record_stage_config(root, n, pc.stage_config(n).config_hash(), cfg[n], list(get_stage(n).inputs))
    res: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "backend": args.backend,
                 "profile": "tiny" if args.tiny else "paper", "videos": len(videos), "video_minutes": None,
                 "batch_size": args.batch_size, "stages": {}}
    with GpuSampler() as gpu:
        for n in names:
            st = get_stage(n)
            shards = [0] if st.scope == "global" else plan_shards(root)
            clear_expert_cache()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            s0 = time.perf_counter()
            ok = err = 0
            note = None
            try:
                for k in shards:
                    o = run_shard(st, root, pc.stage_config(n), k, force=True, pipeline=cfg)
                    ok, err = ok + o.ok, err + o.error
            except InputsNotReadyError as exc:
                note = f"not measured: {exc}"
            except Exception as exc:  # noqa: BLE001 -- e.g. vision weights not local: report and go on
                note = f"not measured: {type(exc).__name__}: {str(exc)[:300]}"
            if cuda:
                torch.cuda.synchronize()
            s1 = time.perf_counter()
            row = {"seconds": round(s1 - s0, 2), "rows_ok": ok, "rows_error": err,
                   "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else 0.0,
                   **gpu.window(s0, s1)}
            row["videos_per_gpu_hour"] = round(len(videos) / ((s1 - s0) / 3600), 1) if note is None and s1 > s0 else None
            if note:
                row["note"] = note
            res["stages"][n] = row
            print(f"{n:12s} {row['seconds']:9.1f}s  videos/GPU-h {row['videos_per_gpu_hour']!s:>9}  util mean "
                  f"{row['gpu_util_mean']!s:>5}%  p90 {row['gpu_util_p90']!s:>5}%  peak {row['peak_gpu_gib']:6.1f} GiB"
                  f"  ok {ok} err {err}" + (f"  [{note}]" if note else ""))
    for branch, stages in BRANCHES.items():
        rows = [res["stages"].get(s) for s in COMMON + stages]
        if any(r is None or "note" in r for r in rows):
            res[f"{branch}_videos_per_gpu_hour"] = None
            continue
        hours = sum(r["seconds"] for r in rows) / 3600
        res[f"{branch}_videos_per_gpu_hour"] = round(len(videos) / hours, 1)
    print(json.dumps({k: v for k, v in res.items() if k != "stages"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
