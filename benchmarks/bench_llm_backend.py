"""Throughput of the OpenAI-compatible backend against a loopback server with fixed latency.

Default: 256 requests, 200 ms server latency, concurrency 32. Ideal wall time = n * latency / concurrency
(1.6 s); efficiency = ideal / actual, target >= 0.8 (issue 3). The server runs in a child process so it does
not share the client's interpreter lock. ``--server asyncio`` (default) is an aiohttp.web server that sleeps
``latency`` per request without holding a thread; ``--server threads`` is the tests' scripted
ThreadingHTTPServer (a thread per connection, whose own overhead then shows up in the result).

    .venv/bin/python benchmarks/bench_llm_backend.py [--requests 256] [--latency 0.2] [--concurrency 32]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experts.llm import LlmRequest, LlmSpec, load_llm  # noqa: E402
from tests._fake_openai_server import FakeOpenAIServer, completion_body, last_user_text  # noqa: E402


def _serve_threads(latency_s: float, conn) -> None:
    srv = FakeOpenAIServer(latency_s=latency_s).start()
    conn.send(srv.base_url)
    conn.recv()  # block until the parent is done
    conn.send(srv.max_in_flight)
    srv.stop()


def _serve_asyncio(latency_s: float, conn) -> None:
    import asyncio

    from aiohttp import web

    state = {"in_flight": 0, "max": 0}

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        state["in_flight"] += 1
        state["max"] = max(state["max"], state["in_flight"])
        try:
            await asyncio.sleep(latency_s)
        finally:
            state["in_flight"] -= 1
        return web.json_response(completion_body("echo: " + last_user_text(body), body.get("model", "m")))

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", completions)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=512)
        await site.start()
        port = runner.addresses[0][1]
        conn.send(f"http://127.0.0.1:{port}/v1")
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until the parent is done
        conn.send(state["max"])
        await runner.cleanup()

    asyncio.run(main())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--server", choices=["asyncio", "threads"], default="asyncio")
    args = ap.parse_args()

    parent, child = mp.Pipe()
    target = _serve_asyncio if args.server == "asyncio" else _serve_threads
    proc = mp.get_context("spawn").Process(target=target, args=(args.latency, child), daemon=True)
    proc.start()
    base_url = parent.recv()
    spec = LlmSpec(
        model_id="fake-model", backend="openai", base_url=base_url, api_key_env=None,
        max_concurrency=args.concurrency, timeout_s=30, max_retries=2,
    )
    llm = load_llm(spec)  # no cache: every request must reach the server
    ideal = args.requests * args.latency / args.concurrency
    walls, cpus = [], []
    try:
        for rep in range(args.repeats):
            reqs = [LlmRequest(prompt=f"rep {rep} request {i}") for i in range(args.requests)]
            c0, t0 = time.process_time(), time.perf_counter()
            out = llm.generate(reqs)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            errors = [r.error for r in out if r.error]
            if errors:
                raise SystemExit(f"{len(errors)} requests failed, first: {errors[0]}")
            walls.append(wall)
            cpus.append(cpu)
            print(f"run {rep + 1}: {args.requests} requests in {wall:.3f} s  efficiency {ideal / wall:.3f}  "
                  f"client CPU {1000 * cpu / args.requests:.2f} ms/request")
    finally:
        llm.close()
        parent.send("done")
        max_in_flight = parent.recv()
        proc.join(timeout=10)
    best, med = min(walls), statistics.median(walls)
    print(
        f"server={args.server} requests={args.requests} latency={args.latency}s concurrency={args.concurrency} "
        f"ideal={ideal:.3f}s best={best:.3f}s median={med:.3f}s "
        f"efficiency(best)={ideal / best:.3f} efficiency(median)={ideal / med:.3f} "
        f"client CPU={1000 * statistics.median(cpus) / args.requests:.2f}ms/request "
        f"server max in flight={max_in_flight} target>=0.8"
    )


if __name__ == "__main__":
    main()
