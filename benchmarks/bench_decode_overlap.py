"""Decode / model overlap in the GPU stages: the detect stage with and without the prefetch thread and batching.

What runs: ``stages.imove_it.detect.detect_clips`` (the stage's own code: first-frame decode, Grounding DINO,
CLIP scoring of the surviving boxes, NMS) over generated 720p H.264 videos (ffmpeg ``testsrc2``, 25 fps, a
keyframe every ``--gop`` frames, so a clip that starts between keyframes decodes forward from the previous
one, as real videos do) cut into ``--clip-s`` clips, each tagged with the same ``--labels``. Models: the
tiny random-initialised Grounding DINO and CLIP (``tiny://``), loaded through the production loaders, on CPU.

Configurations (prefetch depth in clips x clips per model call), run interleaved, ``--rounds`` rounds each,
medians reported, since other work shares the machine:

* ``d0 b1`` -- decode inline, one clip per call (no overlap, no batching);
* ``d4 b1`` -- decode on the prefetch thread 4 clips ahead;
* ``d0 b8`` / ``d4 b8`` -- the same with 8 clips per Grounding DINO call and all their crops in one CLIP call.

Also reported, from the same rounds: the decode alone (every clip's first frame read in a loop) and the
models alone (``detect_clips`` with the frames already decoded, batch 1 and 8): with perfect overlap a
configuration takes max(decode, models) instead of their sum. Rows of all configurations are checked to agree
(same instances and statuses; score and box differences printed: float batching noise).

``--torch-threads 1`` (default) leaves the second core to the decode thread, as on a GPU machine where the
model's work is on the accelerator and the CPU decodes.

    python benchmarks/bench_decode_overlap.py [--videos 4] [--duration-s 12] [--rounds 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = [(0, 1), (4, 1), (0, 8), (4, 8)]  # (prefetch depth, batch size)


def make_videos(folder: Path, n: int, duration_s: float, gop: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"overlap_{i:02d}_{duration_s:g}s_g{gop}.mp4"
        out.append(p)
        if not p.exists():
            subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                            f"testsrc2=s=1280x720:r=25:d={duration_s}", "-vf", f"hue=h={37 * i}", "-c:v", "libx264",
                            "-preset", "veryfast", "-g", str(gop), "-keyint_min", str(gop), "-sc_threshold", "0",
                            "-pix_fmt", "yuv420p", str(p)], check=True)
    return out


def tag_rows(videos: list[Path], duration_s: float, clip_s: float, labels: list[str]):
    from schemas.tags import ClipTags

    rows = []
    for v in videos:
        t = 0.0
        while t + clip_s <= duration_s + 1e-6:
            rows.append(ClipTags(clip_id=f"{v.stem}@{t:g}", video_id=v.stem, video_path=str(v),
                                 start_frame=round(t * 25), end_frame=round((t + clip_s) * 25), start_s=t,
                                 end_s=t + clip_s, duration_s=clip_s, fps=25.0, width=1280, height=720,
                                 tagger="ram_plus", tags=[{"tag": x, "score": 0.9} for x in labels], dropped_tags=[]))
            t += clip_s
    return rows


def _key(r):
    return (r.clip_id, r.label or "", r.status)


def compare(a: list, b: list) -> dict:
    """Largest differences between two runs' rows, after checking they hold the same instances and statuses.
    CLIP scores are compared where both runs cropped the same pixels (a box edge within float noise of a
    whole pixel can crop one more row in one run)."""
    import math

    import numpy as np

    assert sorted(map(_key, a)) == sorted(map(_key, b)), "configurations disagree on instances / statuses"
    worst = {"detection_score": 0.0, "clip_score_same_crop": 0.0, "box_px": 0.0, "crops_differing": 0}
    for k in set(map(_key, a)):
        xa = sorted((r for r in a if _key(r) == k), key=lambda r: r.instance_id)
        xb = sorted((r for r in b if _key(r) == k), key=lambda r: r.instance_id)
        for ra, rb in zip(xa, xb):
            if ra.box_xyxy_px is None:
                continue
            worst["box_px"] = max(worst["box_px"], float(np.abs(np.subtract(ra.box_xyxy_px, rb.box_xyxy_px)).max()))
            worst["detection_score"] = max(worst["detection_score"], abs(ra.detection_score - rb.detection_score))
            edges = [(math.floor(r.box_xyxy_px[0]), math.floor(r.box_xyxy_px[1]), math.ceil(r.box_xyxy_px[2]),
                      math.ceil(r.box_xyxy_px[3])) for r in (ra, rb)]
            if ra.clip_score is not None and rb.clip_score is not None:
                if edges[0] == edges[1]:
                    worst["clip_score_same_crop"] = max(worst["clip_score_same_crop"], abs(ra.clip_score - rb.clip_score))
                else:
                    worst["crops_differing"] += 1
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--duration-s", type=float, default=12.0)
    ap.add_argument("--clip-s", type=float, default=2.0)
    ap.add_argument("--gop", type=int, default=100, help="frames between keyframes")
    ap.add_argument("--labels", default="person,car,dog")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "motionforge-bench-overlap")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from stages.imove_it.detect import PROFILES as DETECT_PROFILES
    from stages.imove_it.detect import DetectConfig, detect_clips, load_clip_scorer, load_detector
    from stages.imove_it.first_frame import clip_first_frame

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    videos = make_videos(args.dir, args.videos, args.duration_s, args.gop)
    rows = tag_rows(videos, args.duration_s, args.clip_s, args.labels.split(","))
    base = DetectConfig.model_validate({**DETECT_PROFILES["tiny"],
                                        "detector": {"model_id": "tiny://grounding_dino", "device": "cpu"},
                                        "clip": {"model_id": "tiny://clip", "device": "cpu"}})
    detector, clip = load_detector(base), load_clip_scorer(base.clip)
    cfgs = {f"d{d} b{b}": base.model_copy(update={"prefetch_depth": d, "batch_size": b}) for d, b in CONFIGS}
    detect_clips(rows[:2], detector, clip, cfgs["d0 b1"])  # warm-up (lazy inits, first-call allocations)

    times: dict[str, list[float]] = {name: [] for name in [*cfgs, "decode only", "models only b1", "models only b8"]}
    cpu: dict[str, list[float]] = {name: [] for name in cfgs}  # process CPU seconds (all threads)
    outputs: dict[str, list] = {}
    for rnd in range(args.rounds):
        for name, cfg in cfgs.items():  # interleaved: each round runs every configuration once
            t0, c0 = time.perf_counter(), time.process_time()
            outputs[name] = detect_clips(rows, detector, clip, cfg)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        t0 = time.perf_counter()
        frames = {r.clip_id: clip_first_frame(r.video_path, r.start_s, r.end_s) for r in rows}
        times["decode only"].append(time.perf_counter() - t0)
        by_path = {(r.video_path, r.start_s): frames[r.clip_id] for r in rows}
        for b in (1, 8):
            cfg = cfgs[f"d0 b{b}"]
            t0 = time.perf_counter()
            detect_clips(rows, detector, clip, cfg, read_frame=lambda p, s, e: by_path[(p, s)])
            times[f"models only b{b}"].append(time.perf_counter() - t0)
        print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    # paired: each configuration against the baseline of the same round, so load that shifts between rounds
    # (other work on the machine) cancels out
    paired = {k: statistics.median(t / b for t, b in zip(times[k], times["d0 b1"])) for k in cfgs}
    diffs = [compare(outputs["d0 b1"], outputs[n]) for n in cfgs if n != "d0 b1"]
    worst = {k: max(d[k] for d in diffs) for k in diffs[0]}
    res = {"clips": len(rows), "videos": len(videos), "resolution": "1280x720", "gop": args.gop,
           "torch_threads": torch.get_num_threads(), "rounds": args.rounds, "median_s": med,
           "all_s": times, "cpu_s": cpu, "paired_ratio_vs_d0_b1": paired,
           "max_diff_vs_d0_b1": worst}
    print(f"\n{len(rows)} clips of {args.clip_s:g}s from {len(videos)} 720p videos (keyframe every {args.gop} frames), "
          f"tiny Grounding DINO + tiny CLIP on CPU, torch threads {torch.get_num_threads()}, median of {args.rounds}:")
    for k in times:
        extra = ""
        if k in cfgs:
            b = int(k.split()[1][1:])
            ideal = max(med["decode only"], med[f"models only b{b}"])
            serial = med["decode only"] + med[f"models only b{b}"]
            extra = (f"  (paired {paired[k]:.2f}x of d0 b1; CPU {statistics.median(cpu[k]):.2f}s; "
                     f"decode+models {serial:.2f}s, "
                     f"max(decode, models) {ideal:.2f}s)")
        print(f"  {k:16s} {med[k]:7.2f}s{extra}")
    print("  rows agree across configurations (same instances and statuses); largest differences vs d0 b1: "
          + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in worst.items()))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
