"""Training throughput per temporal-fusion method (MotionBench section 4, Tables 7-8's rows) on a full-size
random-initialised Qwen2-VL-2B: one row per (method, rate).

    python benchmarks/bench_fusion_gpu.py [--size 2b] [--frames 32] [--side 448] [--steps 10] [--warmup 3] \
        [--batch 1] [--rates 2,4,8] [--methods none,pre_encoder,qformer,post_pool,kangaroo,te_fusion] \
        [--train lora|full] [--grad-ckpt] [--json /tmp/bench_fusion/bench_fusion.json]
    python benchmarks/bench_fusion_gpu.py --device cpu --tiny      # CPU smoke run of this script (tiny model,
                                                                   # one torch thread per cell)

What one step is: the training flow's model (``stages.training.model.load_model_for_training``) with the cell's
fusion plugged in by config (``stages.training.parts:papers_model_parts``), so the trainable set is the training
path's: with ``--train lora`` (the default, iMOVE B.1) the vision tower is frozen, the merger trains in full,
the language model gets LoRA (r 64, on its attention and MLP projections) and the fusion's new parameters
(inflated patch kernel, Q-Former, projections, slot embedding) train in full; ``--train full`` trains the
language model and merger in full instead. One step is the forward, the backward, gradient clipping at 1.0
and an AdamW step, in bf16 (weights and autocast) on CUDA and fp32 on CPU. The batch is built once by the
training collator (``stages.training.collator.VlmCollator``) from synthetic frames (``--frames`` random
frames of ``--side`` x ``--side`` px, exactly that size after the processor) and stays on the device, so the
figures are the model's step alone: no video decoding, processor or data loader time.

Every method reads the same ``--frames`` frames (MotionBench Table 8's "same input frames" setting), so rate k
leaves the decoder (frames / 2) / k time slots of video tokens; each rate must divide frames / 2.

Per row: the step time (median and mean of ``--steps`` timed steps after ``--warmup`` untimed ones, the device
synchronised around each), samples/s and frames/s (batch x steps, and x frames, over the timed steps' wall
time), the vision tokens one sample gives the decoder, the sequence length, and on CUDA the weights' memory
after loading and the peak memory over warm-up and timed steps (optimiser state and activations included).
Each (method, rate) runs in its own process (forked from a server that has imported torch and transformers
once, so no process inherits another's CUDA state or peak): an out-of-memory or crash is a row with an
error, not a lost table. The rows are printed as a table and written to ``--json``.

The weights are random and the video is noise: the numbers measure speed and memory, not learning. No network
is needed: the tokenizer is the tiny in-memory one and the model has Qwen2-VL-2B's (or 7B's) published shape
(built once by ``bench_train_gpu.build_full`` and kept in ``--work``).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_train_gpu, however this script is started

from bench_train_gpu import SHAPES, build_full  # noqa: E402  -- the same full-size random model, built offline

FRAMES_PER_SLOT = 2  # Qwen2-VL's temporal_patch_size
# imported once by the process server, so each cell's process starts with them loaded
PRELOAD = ["torch", "numpy", "transformers", "peft", "peft.utils.transformers_weight_conversion",
           "transformers.models.qwen2_vl.modeling_qwen2_vl", "transformers.models.qwen2_vl.processing_qwen2_vl",
           "transformers.models.qwen2_vl.image_processing_qwen2_vl",
           "transformers.models.qwen2_vl.video_processing_qwen2_vl", "transformers.models.qwen2.tokenization_qwen2",
           "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "experts.vlm", "experts.model_parts",
           "stages.shared.relative_tokens", "stages.training.model", "stages.training.collator",
           "stages.training.parts"]
QUESTION = "<video>\nHow does the main object move in this clip?"
ANSWER = "It slides from the left edge to the right edge, then turns and comes back halfway."


def measure_cell(spec: dict) -> dict:
    """One (method, rate) in this process: load, build the batch, warm up, time ``steps`` training steps."""
    import numpy as np
    import torch
    from transformers.utils import logging as hf_logging

    from experts.model_parts import TemporalFusionConfig
    from stages.training.collator import VlmCollator
    from stages.training.config import DataConfig, DataSource, ModelConfig, ModelPart, TrainConfig
    from stages.training.data import TrainSample
    from stages.training.model import load_model_for_training, trainable_summary
    from stages.training.parts import parts_of

    hf_logging.disable_progress_bar()
    # peft asks the model the deprecated way once per process; the same line in every row says nothing
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    dev = torch.device(spec["device"])
    cuda = dev.type == "cuda"
    if not cuda:  # on a CPU this is a smoke run of the script; one thread keeps it cheap beside other work
        torch.set_num_threads(1)
    frames, side, batch_size = spec["frames"], spec["side"], spec["batch"]
    fusion = TemporalFusionConfig(method=spec["method"], rate=spec["rate"])
    cfg = TrainConfig(
        output_dir=str(Path(spec["work"]) / f"run_{spec['method']}-k{spec['rate']}"),
        model=ModelConfig(model_id=spec["model"], dtype="bf16" if cuda else "fp32",
                          attn_implementation=spec["attn"], gradient_checkpointing=spec["grad_ckpt"]),
        # the data config is not read here (the batch is synthetic); it records the clip shape
        data=DataConfig(sources=(DataSource(path="synthetic"),), num_frames=frames, short_side=side),
        method=spec["train"],
        model_parts=(ModelPart(target="stages.training.parts:papers_model_parts",
                               kwargs={"temporal_fusion": fusion.model_dump(mode="json", exclude_defaults=True)}),),
    )
    row: dict = {"method": spec["method"], "rate": spec["rate"],
                 "device": torch.cuda.get_device_name(dev) if cuda else "cpu"}
    t0 = time.perf_counter()
    model, processor = load_model_for_training(cfg, device=str(dev))
    row["load_s"] = round(time.perf_counter() - t0, 1)
    row.update(trainable_summary(model))
    if cuda:
        row["weights_mib"] = round(torch.cuda.memory_allocated(dev) / 2**20)
    # every frame exactly side x side: no upscaling to the checkpoint's minimum, no per-video pixel budget
    vp = processor.video_processor
    vp.size = {"shortest_edge": side * side, "longest_edge": side * side}
    vp.cap_pixels_per_frame = False
    video_token = model.config.video_token_id
    collator = VlmCollator(processor, frames, parts=parts_of(model), video_token_id=video_token)
    rng = np.random.default_rng(0)
    sample = TrainSample(sample_id="bench", conversations=(("human", QUESTION), ("gpt", ANSWER)))
    items = [{"sample": sample, "frames": rng.integers(0, 256, (frames, side, side, 3), dtype=np.uint8),
              "duration_s": frames / 2.0} for _ in range(batch_size)]
    batch = {k: v.to(dev) for k, v in collator(items).items()}
    grid = batch["video_grid_thw"][0].tolist()  # the compressed grid the decoder's placeholders describe
    row.update(frames=frames, side=side, batch=batch_size, encoder_slots=grid[0] * fusion.rate,
               decoder_slots=grid[0], vision_tokens=int((batch["input_ids"][0] == video_token).sum()),
               seq_len=int(batch["input_ids"].shape[1]))

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)  # the Trainer's adamw_torch

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    def step() -> torch.Tensor:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):  # the Trainer's bf16 mixed precision
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    model.train()
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        losses = [step() for _ in range(spec["warmup"])]
        times = []
        for _ in range(spec["steps"]):
            sync()
            t = time.perf_counter()
            losses.append(step())
            sync()
            times.append(time.perf_counter() - t)
    except torch.OutOfMemoryError as exc:
        row["error"] = "CUDA out of memory: " + str(exc).splitlines()[0]
        row["peak_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20)
        return row
    wall = sum(times)
    row.update(step_s=round(statistics.median(times), 4), step_s_mean=round(wall / len(times), 4),
               samples_per_s=round(batch_size * len(times) / wall, 3),
               frames_per_s=round(batch_size * frames * len(times) / wall, 1),
               loss_last=round(float(losses[-1]), 4))
    if cuda:
        row["peak_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20)
    return row


def _cell_process(conn, spec: dict) -> None:
    try:
        conn.send(measure_cell(spec))
    except Exception as exc:  # noqa: BLE001 -- one configuration failing is a row, not a lost table
        traceback.print_exc()
        conn.send({"method": spec["method"], "rate": spec["rate"], "error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


def _build_process(conn, out: str, size: str, side: int) -> None:
    try:
        build_full(Path(out), size, side)
        conn.send(None)
    except Exception as exc:  # noqa: BLE001 -- reported by the parent with what to do
        traceback.print_exc()
        conn.send(f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


def run_in_process(ctx, target, args: tuple, timeout_s: float):
    """``target(conn, *args)`` in a fresh process; (what it sent or None, exit code or a reason)."""
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(send, *args))
    proc.start()
    send.close()
    got = None
    try:
        if recv.poll(timeout_s):
            got = recv.recv()
    except EOFError:  # the process died before sending (killed by the OOM killer, a segfault ...)
        pass
    proc.join(timeout=30)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return got, f"no result within {timeout_s:.0f} s; killed"
    return got, proc.exitcode


def print_table(rows: list[dict]) -> None:
    head = ["method", "k", "enc slots", "dec tokens", "seq len", "step s", "samples/s", "frames/s", "peak MiB"]
    lines = []
    for r in rows:
        cells = [r["method"], str(r["rate"])]
        if r.get("error"):
            lines.append(cells + [f"error: {r['error'][:120]}"])
            continue
        cells += [str(r["encoder_slots"]), str(r["vision_tokens"]), str(r["seq_len"]), f"{r['step_s']:.4f}",
                  f"{r['samples_per_s']:.3f}", f"{r['frames_per_s']:.1f}",
                  str(r["peak_mib"]) if "peak_mib" in r else "-"]
        lines.append(cells)
    # an error row's message spans the measured columns: only the method and rate columns size to it
    widths = [max([len(head[i])] + [len(ln[i]) for ln in lines if len(ln) == len(head) or i < 2])
              for i in range(len(head))]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for ln in lines:
        print("  ".join(c.ljust(w) for c, w in zip(ln, widths)))


def main() -> None:
    from experts.model_parts.config import METHOD_LABELS, PAPER_METHODS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/bench_fusion", help="built model and default JSON go here")
    ap.add_argument("--size", choices=sorted(SHAPES), default="2b")
    ap.add_argument("--frames", type=int, help="frames per clip (default 32; 16 with --tiny)")
    ap.add_argument("--side", type=int, help="frame side in px, a multiple of 28 (default 448; 56 with --tiny)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, help="timed steps (default 10; 3 with --tiny)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default 3; 1 with --tiny)")
    ap.add_argument("--rates", default="2,4,8")
    ap.add_argument("--methods", default=",".join(PAPER_METHODS), help="the paper's six rows by default")
    ap.add_argument("--train", choices=("lora", "full"), default="lora", help="the training flow's method")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (less memory, slower)")
    ap.add_argument("--attn", help="attn_implementation (sdpa, flash_attention_2); default: the model's own")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--tiny", action="store_true", help="smoke run: tiny://qwen2_vl, small frames, few steps")
    ap.add_argument("--cell-timeout", type=float, default=1800.0, help="seconds one (method, rate) may take")
    ap.add_argument("--json", help="where to write the results (default <work>/bench_fusion.json)")
    args = ap.parse_args()
    small = args.tiny
    frames = args.frames if args.frames is not None else (16 if small else 32)
    side = args.side if args.side is not None else (56 if small else 448)
    steps = args.steps if args.steps is not None else (3 if small else 10)
    warmup = args.warmup if args.warmup is not None else (1 if small else 3)
    rates = [int(k) for k in args.rates.split(",")]
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHOD_LABELS]
    if unknown:
        sys.exit(f"unknown method(s) {unknown}; known: {', '.join(METHOD_LABELS)}")
    slots = frames // FRAMES_PER_SLOT
    bad = [k for k in rates if k < 2 or frames % FRAMES_PER_SLOT or slots % k]
    if bad:
        sys.exit(f"--frames {frames} gives {slots} time slots of {FRAMES_PER_SLOT} frames; rates {bad} do not divide "
                 f"it (or are < 2): use a multiple of {FRAMES_PER_SLOT} x every rate")
    if steps < 1 or warmup < 0 or args.batch < 1:
        sys.exit("--steps and --batch must be >= 1, --warmup >= 0")
    if side < 28 or side % 28:
        sys.exit(f"--side {side} is not a multiple of 28 (14 px patches, 2 x 2 merged)")

    # asked through NVML, which leaves CUDA uninitialised: the parent only asks whether a GPU exists, and the
    # process server, which inherits this environment, must never hold CUDA state its forked cells would inherit
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    if small:
        model = "tiny://qwen2_vl"
    else:
        if device != "cuda":
            sys.exit("the full-size model needs a GPU (use --device cpu --tiny for a CPU smoke run)")
        model = str(work / f"qwen2vl_{args.size}_random")
        if not (Path(model) / "config.json").exists():
            t0 = time.perf_counter()
            err, code = run_in_process(ctx, _build_process, (model, args.size, side), args.cell_timeout)
            if err is not None or code != 0:
                sys.exit(f"building the random {args.size} model in {model} failed ({err or code}); see the "
                         "traceback above, free GPU memory or pick another --work")
            print(f"built {model} in {time.perf_counter() - t0:.0f}s", flush=True)
    settings = {"frames": frames, "side": side, "batch": args.batch, "steps": steps, "warmup": warmup,
                "train": args.train, "grad_ckpt": args.grad_ckpt, "attn": args.attn, "dtype":
                "bf16" if device == "cuda" else "fp32", "setting": "fixed_input_frames"}
    results = {"model": model if small else f"Qwen2-VL-{args.size} shape, random init", "device": device,
               "settings": settings, "note": "random weights and noise frames: speed and memory, not learning",
               "runs": []}
    t_all = time.perf_counter()
    for k in rates:
        for m in methods:
            spec = {"method": m, "rate": k, "model": model, "device": device, "work": str(work), **settings}
            row, code = run_in_process(ctx, _cell_process, (spec,), args.cell_timeout)
            if row is None:
                row = {"method": m, "rate": k, "error": f"the cell's process ended without a result ({code})"}
            row["label"] = METHOD_LABELS[m]
            results["runs"].append(row)
            if row.get("device", "cpu") != "cpu":
                results["device"] = row["device"]
            shown = {key: row[key] for key in ("step_s", "samples_per_s", "vision_tokens", "peak_mib", "error")
                     if key in row}
            print(f"{m} k={k}: {shown}", flush=True)
    out = Path(args.json) if args.json else work / "bench_fusion.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print()
    print(f"{results['model']} on {results['device']}: {frames} frames of {side} px, batch {args.batch}, "
          f"{args.train}, {warmup} warm-up + {steps} timed steps ({settings['dtype']})")
    print_table(results["runs"])
    print(f"\n{len(results['runs'])} configurations in {time.perf_counter() - t_all:.0f}s; results: {out}")


if __name__ == "__main__":
    main()
