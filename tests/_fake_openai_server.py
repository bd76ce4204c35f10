"""A real HTTP server on 127.0.0.1 that speaks just enough of the OpenAI chat-completions API for tests.

Each request is answered by a scripted :class:`Reply` (status, body, delay, headers) taken from a list in
order, or from a callable ``script(index, body) -> Reply | None``; unscripted requests get an echo of the
last user text. The server records every request body and header set, and the maximum number of requests
it was handling at the same time (to check client-side concurrency limits).

Used by tests/test_openai_compat.py, tests/test_expert_llm.py, tests/test_expert_vlm.py and by
benchmarks/bench_llm_backend.py (fixed latency).
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


@dataclass
class Reply:
    status: int = 200
    content: str | None = None  # assistant text for a 200; error message otherwise
    raw_body: bytes | None = None  # sent as is, overriding ``content``
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    model: str | None = None


def completion_body(content: str, model: str = "fake-model") -> dict:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def last_user_text(body: dict) -> str:
    for msg in reversed(body.get("messages") or []):
        if msg.get("role") == "user":
            c = msg.get("content")
            if isinstance(c, str):
                return c
            return " ".join(p.get("text", "") for p in c or [] if isinstance(p, dict) and p.get("type") == "text")
    return ""


class FakeOpenAIServer:
    def __init__(
        self,
        script: list[Reply] | Callable[[int, dict], Reply | None] | None = None,
        *,
        latency_s: float = 0.0,
        model: str = "fake-model",
    ) -> None:
        self.script = script
        self.latency_s = latency_s
        self.model = model
        self.requests: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "FakeOpenAIServer":
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real endpoints do

            def log_message(self, fmt: str, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n)
                with outer._lock:
                    index = len(outer.requests)
                    try:
                        body = json.loads(raw)
                    except ValueError:
                        body = {"_unparsable": raw.decode("utf-8", "replace")}
                    outer.requests.append(body)
                    outer.headers.append({k.lower(): v for k, v in self.headers.items()})
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    outer._respond(self, index, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test); nothing to answer
                finally:
                    with outer._lock:
                        outer.in_flight -= 1

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256  # many clients connect at once in the benchmark

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- answering ----------------------------------------------------------------------------------------
    def _reply_for(self, index: int, body: dict) -> Reply:
        reply = None
        if callable(self.script):
            reply = self.script(index, body)
        elif self.script is not None and index < len(self.script):
            reply = self.script[index]
        return reply or Reply(content=f"echo: {last_user_text(body)}")

    def _respond(self, handler: BaseHTTPRequestHandler, index: int, body: dict) -> None:
        reply = self._reply_for(index, body)
        delay = reply.delay_s + self.latency_s
        if delay:
            time.sleep(delay)
        if reply.raw_body is not None:
            data = reply.raw_body
        elif reply.status == 200:
            data = json.dumps(completion_body(reply.content or "", reply.model or self.model)).encode()
        else:
            data = json.dumps({"error": {"message": reply.content or "error", "type": "fake"}}).encode()
        handler.send_response(reply.status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for k, v in reply.headers.items():
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(data)
        handler.wfile.flush()
