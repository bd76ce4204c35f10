"""SAMURAI vs plain SAM 2: speed and memory at the same model and resolution.

Rows (same random-initialised or loaded model, same synthetic clip of moving squares):

* ``official``      -- sam2's own ``SAM2VideoPredictor.propagate_in_video`` (frames pre-loaded, as it requires);
* ``plain``         -- our streaming tracker with ``samurai_mode=False`` (SAM 2 behaviour);
* ``samurai``       -- our streaming tracker with ``samurai_mode=True``.

Each tracker row runs on a short and a long clip (10 s and 60 s at ``--clip-fps``) and reports frames per
second, peak accelerator memory (CUDA) or peak process RSS growth (CPU), and the bytes of state kept.
Targets (issue 4): samurai fps >= 0.9x plain; long-clip peak memory within 20% of the short clip.

    python benchmarks/bench_samurai.py --model tiny --device cpu          # CPU smoke, tiny config
    python benchmarks/bench_samurai.py --model large --device cuda        # random-init SAM 2.1-L, 1024 px
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = {
    "tiny": None,  # experts.samurai.tracker.TINY_CONFIG + TINY_OVERRIDES
    "t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "large": "configs/sam2.1/sam2.1_hiera_l.yaml",
}


def synthetic_clip(n_frames: int, h: int, w: int, n_objects: int, seed: int = 0):
    """Textured background with ``n_objects`` squares bouncing at constant speed; generated on the fly."""
    rng = np.random.default_rng(seed)
    bg = rng.integers(20, 90, size=(h, w, 3), dtype=np.uint8)
    side = max(8, min(h, w) // 8)
    starts = rng.uniform([0, 0], [w - side, h - side], size=(n_objects, 2))
    vels = rng.uniform(-6, 6, size=(n_objects, 2)) * (min(h, w) / 720)
    colors = rng.integers(150, 255, size=(n_objects, 3), dtype=np.uint8)
    prompts = [(f"obj{k}", (float(starts[k, 0]), float(starts[k, 1]),
                            float(starts[k, 0] + side), float(starts[k, 1] + side))) for k in range(n_objects)]

    def frames():
        for t in range(n_frames):
            f = bg.copy()
            for k in range(n_objects):
                # reflect at the borders so objects stay in view
                x = (starts[k, 0] + vels[k, 0] * t) % (2 * (w - side))
                y = (starts[k, 1] + vels[k, 1] * t) % (2 * (h - side))
                x = int(x if x < w - side else 2 * (w - side) - x)
                y = int(y if y < h - side else 2 * (h - side) - y)
                f[y:y + side, x:x + side] = colors[k]
            yield f

    return frames, prompts


def build(model_key: str, device: str):
    import torch

    from experts.samurai.tracker import TINY_CONFIG, TINY_OVERRIDES, build_sam2_model

    torch.manual_seed(0)
    if model_key == "tiny":
        return build_sam2_model(TINY_CONFIG, TINY_OVERRIDES, device=device)
    return build_sam2_model(CONFIGS[model_key], (), device=device)


class Meter:
    def __init__(self, device):
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()
            self.base = self.torch.cuda.memory_allocated()
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.t0 = time.perf_counter()

    def stop(self):
        if self.cuda:
            self.torch.cuda.synchronize()
        dt = time.perf_counter() - self.t0
        if self.cuda:
            peak = self.torch.cuda.max_memory_allocated() - self.base
        else:  # RSS high-water mark: only growth beyond earlier runs is visible, run short clips first
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base
        return dt, peak


def run_ours(model, spec_kw, frames_fn, prompts, n, meter, warmup):
    from experts.samurai import SamuraiSpec, SamuraiTracker

    spec = SamuraiSpec(model_id="bench", **spec_kw)
    tracker = SamuraiTracker(model, spec, device=meter_device(model), dtype=meter.dtype)
    sess = tracker.session(prompts)
    it = frames_fn()
    for _ in range(warmup):  # same clip, first frames: compile kernels / allocator warm-up
        sess.step(next(it))
    meter.start()
    visible = 0
    for f in it:
        pts = sess.step(f)
        visible += sum(p.visible for p in pts)
    dt, peak = meter.stop()
    done = n - warmup
    return {"frames": done, "seconds": round(dt, 3), "fps": round(done / dt, 2), "peak_mem_mb": round(peak / 2**20, 1),
            "state_mb": round(sess.state_nbytes() / 2**20, 2), "visible_points": visible,
            "frames_redone": sess.redone_frames}


def meter_device(model):
    return next(model.parameters()).device


def run_official(model, frames_fn, prompts, n, meter, warmup):
    """sam2's own predictor: needs the whole clip as a JPEG folder, loaded up front (not timed)."""
    import torch
    from PIL import Image

    with tempfile.TemporaryDirectory() as d:
        for i, f in enumerate(frames_fn()):
            Image.fromarray(f).save(Path(d) / f"{i:05d}.jpg", quality=95)
        with torch.inference_mode(), torch.autocast(meter_device(model).type, dtype=meter.dtype,
                                                    enabled=meter.dtype != torch.float32):
            meter.start()  # peak memory includes the pre-loaded frames: that is how this predictor works
            state = model.init_state(d)
            load_s = time.perf_counter() - meter.t0
            for k, (oid, box) in enumerate(prompts):
                model.add_new_points_or_box(state, frame_idx=0, obj_id=k, box=np.array(box))
            t0 = time.perf_counter()
            count = 0
            for fi, _, masks in model.propagate_in_video(state):
                count += 1
            _, peak = meter.stop()
            dt = time.perf_counter() - t0
    return {"frames": count, "seconds": round(dt, 3), "fps": round(count / dt, 2), "peak_mem_mb": round(peak / 2**20, 1),
            "frame_loading_s": round(load_s, 2)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(CONFIGS), default="tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    ap.add_argument("--objects", type=int, default=2)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--clip-fps", type=float, default=10.0)
    ap.add_argument("--short-s", type=float, default=10.0)
    ap.add_argument("--long-s", type=float, default=60.0)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--official", choices=["none", "short", "both"], default="short")
    ap.add_argument("--no-force-present", action="store_true",
                    help="keep random weights as they are (they predict 'no object', which skips most work)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--out", default=None, help="write the JSON result here too")
    args = ap.parse_args(argv)

    import torch

    from experts.base import resolve_device, resolve_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = build(args.model, str(device))
    if not args.no_force_present:
        # Random weights say "no object" on every frame, which would leave masks empty and the Kalman
        # filter and memory gate idle; shifting the object-score head makes every row do the full work.
        with torch.no_grad():
            model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.add_(20.0)
    meter = Meter(device)
    meter.dtype = dtype
    n_params = sum(p.numel() for p in model.parameters())

    result = {
        "machine": {
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
        },
        "model": args.model, "params_m": round(n_params / 1e6, 1), "image_size": model.image_size,
        "dtype": str(dtype).replace("torch.", ""), "objects": args.objects,
        "forced_present": not args.no_force_present,
        "video": f"{args.width}x{args.height} @ {args.clip_fps} fps", "rows": {},
    }
    clips = {"short": int(round(args.short_s * args.clip_fps)), "long": int(round(args.long_s * args.clip_fps))}
    # one throwaway run first, so that allocator growth and kernel selection are not billed to the first row
    frames_fn, prompts = synthetic_clip(4 * args.warmup + 1, args.height, args.width, args.objects)
    run_ours(model, {"samurai_mode": True, "device": device.type}, frames_fn, prompts, 4 * args.warmup + 1,
             meter, args.warmup)
    for name, n in clips.items():
        frames_fn, prompts = synthetic_clip(n + args.warmup, args.height, args.width, args.objects)
        for mode in ("plain", "samurai"):
            r = run_ours(model, {"samurai_mode": mode == "samurai", "device": device.type}, frames_fn, prompts,
                         n + args.warmup, meter, args.warmup)
            result["rows"][f"{mode}_{name}"] = r
            print(f"{mode:8s} {name:5s} {json.dumps(r)}", flush=True)
    for name in (["short"] if args.official == "short" else ["short", "long"] if args.official == "both" else []):
        frames_fn, prompts = synthetic_clip(clips[name], args.height, args.width, args.objects)
        r = run_official(model, frames_fn, prompts, clips[name], meter, 0)
        result["rows"][f"official_{name}"] = r
        print(f"official {name:5s} {json.dumps(r)}", flush=True)

    rows = result["rows"]
    result["summary"] = {
        "samurai_over_plain_fps_short": round(rows["samurai_short"]["fps"] / rows["plain_short"]["fps"], 3),
        "samurai_over_plain_fps_long": round(rows["samurai_long"]["fps"] / rows["plain_long"]["fps"], 3),
        "samurai_peak_mem_long_over_short": round(rows["samurai_long"]["peak_mem_mb"]
                                                  / max(rows["samurai_short"]["peak_mem_mb"], 1e-6), 3),
        "plain_peak_mem_long_over_short": round(rows["plain_long"]["peak_mem_mb"]
                                                / max(rows["plain_short"]["peak_mem_mb"], 1e-6), 3),
    }
    if "official_short" in rows:
        result["summary"]["samurai_over_official_fps_short"] = round(
            rows["samurai_short"]["fps"] / rows["official_short"]["fps"], 3)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
