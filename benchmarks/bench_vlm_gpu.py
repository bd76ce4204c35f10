"""VLM expert on a GPU: the production loading path on a full-size random-initialised Qwen2-VL-2B-shaped
model (bf16), caption-like requests (8 frames at ~448 px + a prompt), throughput at batch 1 and 8, and
batch-vs-single equality on the tiny model under CUDA.

    python benchmarks/bench_vlm_gpu.py [--out /tmp/vlm2b] [--frames 8] [--new-tokens 64] [--requests 16]

Random weights: the text is meaningless, the timing is not (generation runs to max_new_tokens because EOS
is suppressed). No network needed: the tokenizer is the tiny in-memory one, the image processor is sized
like Qwen2-VL's defaults for 448-px frames.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def build_full(out: str) -> None:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor, \
        Qwen2VLVideoProcessor

    from experts.llm import build_tiny_qwen_tokenizer
    from experts.vlm import _tiny_vision_ids

    tok = build_tiny_qwen_tokenizer()
    ids = tok.convert_tokens_to_ids
    # Qwen2-VL-2B-Instruct's published shape
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
                         bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        **_tiny_vision_ids(tok),
    )
    with torch.device("cuda"):
        model = Qwen2VLForConditionalGeneration(cfg).to(torch.bfloat16)
    pixels = dict(min_pixels=256 * 28 * 28, max_pixels=448 * 448)
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels),
                            video_processor=Qwen2VLVideoProcessor(**pixels, cap_pixels_per_frame=True),
                            tokenizer=tok, chat_template=tok.chat_template)
    model.generation_config.eos_token_id = None  # random weights: never stop early, so timing is for max tokens
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    proc.save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/vlm2b")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=16)
    args = ap.parse_args()
    import torch

    from experts.base import clear_expert_cache
    from experts.vlm import VlmRequest, VlmSpec, load_vlm

    res: dict = {"device": torch.cuda.get_device_name(0)}
    # 1. tiny model on CUDA: batch of N == N single calls (greedy)
    tiny = load_vlm(VlmSpec(model_id="tiny://qwen2_vl", device="cuda", dtype="fp32", max_new_tokens=12, batch_size=4))
    rng = np.random.default_rng(0)
    reqs = [VlmRequest(text=f"describe {i}", images=tuple(rng.integers(0, 255, (64, 80, 3), np.uint8) for _ in range(2)))
            for i in range(4)]
    batched = [r.text for r in tiny.generate(reqs)]
    single = [tiny.generate([r])[0].text for r in reqs]
    res["tiny_cuda_batch_equals_single"] = batched == single
    clear_expert_cache()

    t0 = time.perf_counter()
    build_full(args.out)
    res["build_and_save_s"] = round(time.perf_counter() - t0, 1)
    torch.cuda.empty_cache()
    for bs in (1, 8):
        clear_expert_cache()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        vlm = load_vlm(VlmSpec(model_id=args.out, device="cuda", dtype="bf16", max_new_tokens=args.new_tokens, batch_size=bs))
        load_s = time.perf_counter() - t0
        frames = [tuple(rng.integers(0, 255, (448, 796, 3), np.uint8) for _ in range(args.frames)) for _ in range(args.requests)]
        reqs = [VlmRequest(text="Describe how the boxed object moves.", images=f) for f in frames]
        vlm.generate(reqs[:bs])  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = vlm.generate(reqs)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        errors = [o.error for o in out if o.error]
        res[f"batch{bs}"] = {"load_s": round(load_s, 1), "requests": len(reqs), "seconds": round(dt, 2),
                             "requests_per_s": round(len(reqs) / dt, 2), "errors": errors[:2],
                             "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
