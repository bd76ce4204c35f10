"""End-to-end GPU benchmark: videos per GPU-hour for each stage and each branch, GPU utilisation, peak memory.

What runs: the ``paper`` profile's pipeline over generated 720p videos of 10-60 s (shots of FFmpeg's test
sources, hard cuts between them, made with PyAV: no ffmpeg program needed), every stage through the production
runner (``stages.runner.run_shard``, no Prefect: orchestration is measured by bench_orchestration.py), one shard
after another on one GPU.

Models, full size, random weights (no hub needed):

* the chat stages run in-process (``--backend transformers`` or ``vllm``) on random checkpoints of the
  published shapes: Qwen2-VL-7B-Instruct for caption / check / describe / the first-frame judges (the paper
  profile's InternVL2-40B, Qwen2-VL-72B and GPT-4o are endpoints; ``--vlm-shape 72b`` builds the 72B shape,
  which needs ~150 GB in bf16), Qwen2.5-7B-Instruct for qgen (GPT-4o's architecture is not public). The
  tokenizer is the in-memory tiny one (vocabulary padded to the real size); EOS is disabled so unconstrained
  replies run to max_new_tokens (an upper bound), while JSON-constrained ones stop when the grammar ends.
  With ``--backend vllm`` the VLM's engine (shared by its four stages) and the LLM's live side by side in this
  process, each within its share of GPU memory (``--vllm-shares``, default 0.45 and 0.3).
* the vision experts, likewise random and full size, in their released layouts and loaded through the
  stages' own loaders (:func:`build_vision`): RAM++ Swin-L at 384 px with the released 4,585-tag vocabulary,
  Grounding DINO with the Swin-B backbone of ``IDEA-Research/grounding-dino-base`` (BERT-base text encoder,
  900 queries, 800-1333 px inputs), SAM 2.1 Hiera-L (the sam2 package's ``sam2.1_hiera_l.yaml``), and CLIP
  ViT-B/32 with QuickGELU (the OpenAI release's architecture). Random scores would decide how much data flows,
  so the filters that read them are fixed instead (:func:`random_volume`): every clip keeps its top
  ``--instances`` tags and at most ``--instances`` instances, and the track filter passes every track. With
  ``--vision-weights released`` the paper profile's own checkpoints are used (they must resolve locally: HF
  cache or $MOTIONFORGE_WEIGHTS), with the paper's thresholds.

Reported per stage: wall seconds, videos per GPU-hour (videos / stage hours), GPU utilisation (mean and p90
of nvidia-smi samples every 0.5 s while the stage ran), peak GPU memory (torch.cuda.max_memory_allocated),
rows ok / error; per branch: videos per GPU-hour over the branch's stages plus the common ones (ingest,
scenes). Results go to stdout and --json.

    python benchmarks/bench_e2e_gpu.py --videos 16 [--backend transformers|vllm] [--shard-size 4] [--json out.json]

The image stages run their batched, prefetched paths: ``--batch-size`` clips per RAM++ / Grounding DINO call
and per CLIP call of trackfilter (their crops in one forward pass), first frames and track frames decoded on a
prefetch thread while the models work (``stages.shared.prefetch``); the chat stages get the same batch size.

``--stages`` runs a subset (its inputs must be there from an earlier run in the same ``--dir``) and ``--set
stage.field=value`` (JSON values) overrides any stage setting, e.g. to check the full-size vision path on a CPU
with few frames: ``--device cpu --videos 1 --stages ingest,scenes,tag,detect,track,trackfilter --set
track.max_frames=4``. Results are written to --json after every stage, so a run stopped by a time limit keeps
what it measured.

Smoke mode, to check the script runs end to end without a GPU: ``--device cpu --tiny`` takes the ``tiny``
profile's random miniatures of the same architectures (``tiny://``), 2 small videos of 3-6 s, and hides any
GPU (CUDA_VISIBLE_DEVICES=""); its "videos per hour" are CPU figures of the miniatures, not a throughput claim.

    python benchmarks/bench_e2e_gpu.py --device cpu --tiny --videos 2 --shard-size 1

On a lent GPU machine, ``benchmarks/device/gpu_checks.sh`` runs it with the other GPU checks in one call.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_chat_backends, however this script is started

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
}  # qgen's LLM: Qwen2.5-7B-Instruct, bench_chat_backends' "7b" shape
VOCAB = 152064


# FFmpeg's test sources (name, options beyond size and rate): shots of these, hard cuts between them.
SOURCES = (("testsrc2", ""), ("smptehdbars", ""), ("mandelbrot", ""), ("life", ":mold=10:ratio=0.1"), ("cellauto", ""),
           ("rgbtestsrc", ""))
FPS = 25


def make_videos(folder: Path, n: int, seed: int = 0, size: tuple[int, int] = (1280, 720),
                duration_s: tuple[float, float] = (10, 60), shot_s: tuple[float, float] = (2, 12)) -> list[Path]:
    """H.264 videos (720p, 10-60 s by default) of shots of 2-12 s from different test sources, hard cuts between
    them, 25 fps. Written with PyAV (its FFmpeg's lavfi sources and libx264), so no ffmpeg program is needed."""
    import random
    from fractions import Fraction

    import av
    import av.filter

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
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
            shots.append((rng.choice(SOURCES), max(d, 0.5)))
            t += d
        tmp = p.with_name(p.name + ".part.mp4")
        with av.open(str(tmp), "w") as container:
            stream = container.add_stream("libx264", rate=FPS)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"preset": "veryfast", "crf": "23"}
            rate = Fraction(1, FPS)
            pts = 0
            for (name, extra), d in shots:
                graph = av.filter.Graph()
                src = graph.add(name, f"s={w}x{h}:r={FPS}{extra}")
                fmt = graph.add("format", "yuv420p")
                sink = graph.add("buffersink")
                src.link_to(fmt)
                fmt.link_to(sink)
                graph.configure()
                for _ in range(max(1, round(d * FPS))):
                    frame = sink.pull()
                    frame.pts, frame.time_base = pts, rate
                    pts += 1
                    container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        os.replace(tmp, p)
    return out


def video_minutes(videos: list[Path]) -> float:
    import av

    total = 0.0
    for v in videos:
        with av.open(str(v)) as c:
            s = c.streams.video[0]
            total += float(s.duration * s.time_base) if s.duration else float(c.duration or 0) / 1e6
    return round(total / 60, 2)


def _tokenizer():
    from experts.llm import build_tiny_qwen_tokenizer

    return build_tiny_qwen_tokenizer()


def build_vlm(out: Path, shape: str, device: str = "cuda") -> None:
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
    with torch.device(device):
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
    if device == "cuda":
        torch.cuda.empty_cache()


def build_llm(out: Path, device: str = "cuda") -> None:
    import torch
    from bench_chat_backends import config as qwen2_5_config  # the published Qwen2.5 shapes, in one place
    from transformers import Qwen2ForCausalLM

    if (out / "config.json").exists():
        return
    tok = _tokenizer()
    cfg = qwen2_5_config("7b", tok)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


# Random weights give arbitrary scores, so the filters that read them would decide at random how much data reaches
# the later stages (often all of it or none). With random vision weights these fix the volume instead: the top
# ``k`` tags of each clip (every RAM++ threshold set to 0 in the vocabulary written beside the checkpoint), at
# most one box per tag and ``k`` instances per clip, any CLIP score, and every track kept by the track filter.
def random_volume(k: int) -> dict:
    return {
        "tag": {"max_tags": k},
        "detect": {"box_threshold": 0.0, "text_threshold": 0.0, "max_boxes_per_tag": 1, "max_instances_per_clip": k,
                   "min_clip_score": -1.0, "max_area_ratio": 1.0, "min_box_side_px": 1.0},
        "trackfilter": {"min_clip_score": -1.0, "max_area_ratio": None, "min_visible_fraction": None},
    }


def _done(folder: Path) -> bool:
    return (folder / ".complete").exists()


def _complete(folder: Path) -> None:
    (folder / ".complete").write_text("ok")


def build_ram_plus(out: Path) -> Path:
    """RAM++ Swin-L at 384 px, the released state-dict layout (``{"model": state_dict}``) and file name, with the
    released tag list beside it and every threshold at 0 (see :func:`random_volume`)."""
    import shutil

    import torch

    from experts.ram_plus.loading import PACKAGED_VOCAB_DIR
    from experts.ram_plus.model import RamPlusConfig, build_ram_plus_model
    from experts.ram_plus.spec import DEFAULT_CHECKPOINT_FILE, TAG_LIST_FILE, TAG_THRESHOLD_FILE

    if not _done(out):
        out.mkdir(parents=True, exist_ok=True)
        model = build_ram_plus_model(RamPlusConfig.for_variant("swin_l", 384))
        model.init_random_weights(torch.Generator().manual_seed(0))
        torch.save({"model": model.state_dict()}, out / DEFAULT_CHECKPOINT_FILE)
        shutil.copy(PACKAGED_VOCAB_DIR / TAG_LIST_FILE, out / TAG_LIST_FILE)
        n = len((out / TAG_LIST_FILE).read_text(encoding="utf-8").splitlines())
        (out / TAG_THRESHOLD_FILE).write_text("0.0\n" * n, encoding="utf-8")
        _complete(out)
    return out


# Grounding DINO base (IDEA-Research/grounding-dino-base's config.json): Swin-B at 384 px with window 12; the text
# encoder, transformer and heads are GroundingDinoConfig's defaults (BERT-base, d_model 256, 6 + 6 layers, 900
# queries), which are the release's too.
GROUNDING_DINO_BASE_SWIN = dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=12,
                                image_size=384, out_features=["stage2", "stage3", "stage4"])
BERT_BASE_VOCAB = 30522


def build_grounding_dino_base(out: Path) -> Path:
    """Grounding DINO base with its processor (800-1333 px, the release's); the tokenizer is a word-piece
    vocabulary of BERT-base's size (common words, letters and ``##`` letter pieces, padded with unused tokens)."""
    import torch
    from transformers import BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoImageProcessor, \
        GroundingDinoProcessor, SwinConfig

    from experts.grounding_dino import _TINY_WORDS, build_grounding_dino

    if not _done(out):
        letters = "abcdefghijklmnopqrstuvwxyz"
        tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "-", "'"]
        tokens += list(dict.fromkeys(w for w in _TINY_WORDS if w not in tokens))
        tokens += [c for c in letters if c not in tokens] + [f"##{c}" for c in letters]
        tokens += [f"[unused{i}]" for i in range(BERT_BASE_VOCAB - len(tokens))]
        tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)
        config = GroundingDinoConfig(backbone_config=SwinConfig(**GROUNDING_DINO_BASE_SWIN),
                                     text_config=BertConfig(vocab_size=BERT_BASE_VOCAB))
        torch.manual_seed(0)
        model = build_grounding_dino(config, "grounding_dino")
        model.save_pretrained(out)
        GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(), tokenizer=tokenizer).save_pretrained(out)
        _complete(out)
    return out


def build_sam2_1_large(out: Path) -> Path:
    """SAM 2.1 Hiera-L from the sam2 package's own config, saved as the release's ``{"model": state_dict}`` under
    the release's file name (from which the tracker's loader infers the config)."""
    import torch

    from experts.samurai.tracker import build_sam2_model
    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES

    config, fname = HF_MODEL_ID_TO_FILENAMES["facebook/sam2.1-hiera-large"]
    if not _done(out):
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        model = build_sam2_model(config, ckpt_path=None, device="cpu")
        torch.save({"model": model.state_dict()}, out / fname)
        _complete(out)
    return out / fname


CLIP_ARCH = "ViT-B-32-quickgelu"  # the OpenAI ViT-B/32 release's architecture (QuickGELU) in open_clip's names


def build_clip_b32(out: Path) -> Path:
    """open_clip ViT-B/32 (QuickGELU) as a local safetensors checkpoint, loaded with ``arch=CLIP_ARCH``."""
    import torch
    from safetensors.torch import save_file

    from experts.clip import build_clip

    ckpt = out / "open_clip_model.safetensors"
    if not _done(out):
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        model = build_clip(CLIP_ARCH)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
        _complete(out)
    return ckpt


def build_vision(folder: Path, instances: int) -> dict:
    """The four random full-size vision checkpoints (built once under ``folder``) and the pipeline overrides that
    point the iMOVE-IT stages at them, with :func:`random_volume`'s filters."""
    ram = build_ram_plus(folder / "ram_plus_swin_l_384")
    gd = build_grounding_dino_base(folder / "grounding_dino_base")
    sam = build_sam2_1_large(folder / "sam2.1_hiera_large")
    clip = {"model_id": str(build_clip_b32(folder / "clip_vit_b_32")), "arch": CLIP_ARCH}
    vol = random_volume(instances)
    return {
        "tag": {"tagger": "ram_plus", "ram_plus": {"model_id": str(ram)}, **vol["tag"]},
        "detect": {"detector": {"model_id": str(gd), "architecture": "grounding_dino"}, "clip": clip, **vol["detect"]},
        "track": {"tracker": {"model_id": str(sam)}},
        "trackfilter": {"clip": clip, **vol["trackfilter"]},
    }


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


def parse_sets(items: list[str]) -> dict:
    """``stage.field.sub=value`` (value as JSON, else a string) -> nested overrides."""
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--set takes stage.field=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *path, last = key.split(".")
        d = out
        for part in path:
            d = d.setdefault(part, {})
        d[last] = value
    return out


def deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def pipeline_config(args, vlm_dir: Path | None, llm_dir: Path | None, vision: dict | None):
    from flows.config import load_pipeline_config

    # the image stages' batched paths: clips per RAM++ / Grounding DINO call, clips per CLIP call in trackfilter
    overrides: dict = {"ingest": {"shard_size": args.shard_size},
                       **{n: {"batch_size": args.batch_size} for n in ("tag", "detect", "trackfilter")}}
    if args.tiny:  # the tiny profile's own miniatures (tiny://), with this run's batch size
        chat_bs = {"batch_size": args.batch_size}
        overrides.update({"caption": {"vlm": chat_bs}, "check": {"vlm": chat_bs}, "describe": {"vlm": chat_bs},
                          "qgen": {"llm": chat_bs}})
        return load_pipeline_config("tiny", overrides=deep_merge(overrides, parse_sets(args.set)))
    if vision:
        overrides = deep_merge(overrides, vision)
    # in-process vLLM: one engine per model, living side by side in this process (caption, check, describe and the
    # judges share the VLM's; qgen has the LLM's), each within its share of the GPU (vLLM's default, 0.9, would
    # leave the second engine nothing)
    vlm_engine, llm_engine = ({"vllm_engine": {"gpu_memory_utilization": share}} if args.backend == "vllm" else {}
                              for share in vllm_shares(args.vllm_shares))
    if vlm_dir is not None:
        chat = {"backend": args.backend, "device": args.device, "dtype": "bf16", "batch_size": args.batch_size}
        vlm = {"model_id": str(vlm_dir), **chat, **vlm_engine}
        judges = [{"name": f"judge-{i}", "vlm": {**vlm, "max_new_tokens": 16}} for i in range(args.judges)]
        overrides.update({"caption": {"vlm": vlm}, "check": {"vlm": vlm}, "describe": {"vlm": vlm},
                          "ffilter": {"judges": judges}})
    if llm_dir is not None:
        overrides["qgen"] = {"llm": {"model_id": str(llm_dir), "backend": args.backend, "device": args.device,
                                     "dtype": "bf16", "batch_size": args.batch_size, "max_new_tokens": 2048,
                                     **llm_engine}}
    return load_pipeline_config("paper", overrides=deep_merge(overrides, parse_sets(args.set)))


def vllm_shares(text: str) -> tuple[float, float]:
    """``--vllm-shares VLM,LLM``: each engine's gpu_memory_utilization; together at most 0.9, so the vision
    models loaded beside them keep room."""
    try:
        vlm, llm = (float(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"--vllm-shares takes two fractions, VLM,LLM (got {text!r})") from None
    if min(vlm, llm) <= 0 or vlm + llm > 0.9:
        raise SystemExit(f"--vllm-shares: each above 0 and together at most 0.9 (got {text!r})")
    return vlm, llm


def plan_inputs(video_dir: Path, root, shard_size: int, extensions: list[str]) -> int:
    """Shard the input videos as ``motionforge run`` does (the ingest stage's plan, recorded in the root)."""
    from stages.ingest import list_inputs, make_plan
    from storage.manifest import read_plan, record_plan

    plan = make_plan(list_inputs(str(video_dir), extensions), shard_size, read_plan(root))
    plan["input"] = str(video_dir)
    record_plan(root, plan)
    return len(plan["shards"])


CHAT_VLM = ("caption", "check", "describe", "ffilter")
VISION = ("tag", "detect", "track", "trackfilter")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=4)
    ap.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    ap.add_argument("--vllm-shares", default="0.45,0.3", metavar="VLM,LLM",
                    help="with --backend vllm: the VLM's and the LLM's engine shares of GPU memory")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--judges", type=int, default=2, help="first-frame judges (all the same random VLM shape)")
    ap.add_argument("--vlm-shape", choices=["7b", "72b"], default="7b")
    ap.add_argument("--vision-weights", choices=["random", "released"], default="random",
                    help="random full-size vision checkpoints built here, or the paper profile's released ones")
    ap.add_argument("--instances", type=int, default=4, help="with random vision weights: tags and instances per clip")
    ap.add_argument("--stages", default=None, help="comma-separated subset of the stages (default: all)")
    ap.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                    help="override a stage setting (value as JSON); repeatable")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "motionforge-e2e-gpu")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny profile's miniatures and small videos (smoke mode)")
    args = ap.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA: every expert resolves to the CPU

    import torch

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench_e2e_gpu needs a CUDA GPU (or run the smoke mode: --device cpu --tiny)")
    from experts.base import clear_expert_cache
    from stages.registry import available_stages, get_stage, order
    from stages.runner import InputsNotReadyError, plan_shards, run_shard
    from storage.manifest import record_stage_config
    from storage.root import OutputRoot

    names = order(available_stages())
    chosen = names if not args.stages else [n for n in names if n in set(args.stages.split(","))]
    unknown = set(args.stages.split(",")) - set(names) if args.stages else set()
    if unknown:
        raise SystemExit(f"unknown stage(s) {sorted(unknown)}; stages: {', '.join(names)}")
    t0 = time.perf_counter()
    vlm_dir = llm_dir = vision = None
    if args.tiny:
        video_dir = args.dir / "videos-tiny"
        videos = make_videos(video_dir, args.videos, size=(320, 240), duration_s=(3, 6), shot_s=(1, 3))
    else:
        video_dir = args.dir / "videos"
        videos = make_videos(video_dir, args.videos)
        if any(n in chosen for n in CHAT_VLM):
            vlm_dir = args.dir / f"qwen2_vl_{args.vlm_shape}"
            build_vlm(vlm_dir, f"qwen2_vl_{args.vlm_shape}", args.device)
        if "qgen" in chosen:
            llm_dir = args.dir / "qwen2_5_7b"
            build_llm(llm_dir, args.device)
        if args.vision_weights == "random" and any(n in chosen for n in VISION):
            vision = build_vision(args.dir / "vision", args.instances)
    print(f"inputs and random checkpoints ready in {time.perf_counter() - t0:.0f}s ({args.dir})", flush=True)

    pc = pipeline_config(args, vlm_dir, llm_dir, vision)
    cfg = pc.model_dump(mode="json")
    out = args.dir / (f"root-tiny-{args.device}" if args.tiny else f"root-{args.backend}-{args.device}")
    root = OutputRoot(str(out))
    plan_inputs(video_dir, root, args.shard_size, list(pc.ingest.extensions))
    for n in names:
        record_stage_config(root, n, pc.stage_config(n).config_hash(), cfg[n], list(get_stage(n).inputs))
    res: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "backend": args.backend,
                 "profile": "tiny" if args.tiny else "paper",
                 "vision_weights": None if args.tiny else args.vision_weights,
                 "instances_per_clip": args.instances if not args.tiny and args.vision_weights == "random" else None,
                 "videos": len(videos), "video_minutes": video_minutes(videos), "batch_size": args.batch_size,
                 "overrides": parse_sets(args.set), "stages": {}}

    def save() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(res, indent=1))

    with GpuSampler() as gpu:
        for n in chosen:
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
            except Exception as exc:  # noqa: BLE001 -- e.g. released vision weights not local: report and go on
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
            save()
            print(f"{n:12s} {row['seconds']:9.1f}s  videos/GPU-h {row['videos_per_gpu_hour']!s:>9}  util mean "
                  f"{row['gpu_util_mean']!s:>5}%  p90 {row['gpu_util_p90']!s:>5}%  peak {row['peak_gpu_gib']:6.1f} GiB"
                  f"  ok {ok} err {err}" + (f"  [{note}]" if note else ""), flush=True)
    for branch, stages in BRANCHES.items():
        rows = [res["stages"].get(s) for s in COMMON + stages]
        if any(r is None or "note" in r for r in rows):
            res[f"{branch}_videos_per_gpu_hour"] = None
            continue
        hours = sum(r["seconds"] for r in rows) / 3600
        res[f"{branch}_videos_per_gpu_hour"] = round(len(videos) / hours, 1)
    save()
    print(json.dumps({k: v for k, v in res.items() if k != "stages"}, indent=1))


if __name__ == "__main__":
    main()
