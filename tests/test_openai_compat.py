"""OpenAI-compatible client against a real loopback HTTP server, and the response cache."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import traceback
from pathlib import Path

import pytest

from experts.openai_compat import (
    REDACTED,
    ChatCall,
    ChatSpec,
    EndpointAuthError,
    EndpointConfigError,
    EndpointUnreachableError,
    MissingApiKeyError,
    OpenAICompatClient,
    ResponseCacheLike,
    encode_image_data_url,
    scrub,
)
from storage.response_cache import ResponseCache

try:
    from tests._fake_openai_server import FakeOpenAIServer, Reply
except ImportError:  # tests/ on sys.path instead of the repository root
    from _fake_openai_server import FakeOpenAIServer, Reply

SECRET = "sk-test-SUPERSECRET-0123456789abcdef"
ENV = "MOTIONFORGE_TEST_OPENAI_KEY"


@pytest.fixture(autouse=True)
def _api_key(monkeypatch):
    monkeypatch.setenv(ENV, SECRET)


def make_spec(server: FakeOpenAIServer | str, **kw) -> ChatSpec:
    base = server if isinstance(server, str) else server.base_url
    defaults = dict(
        model_id="fake-model", backend="openai", base_url=base, api_key_env=ENV,
        max_retries=3, retry_initial_s=0.01, retry_max_s=0.05, timeout_s=5.0, max_concurrency=4,
    )
    defaults.update(kw)
    return ChatSpec(**defaults)


def call(text: str, **params) -> ChatCall:
    return ChatCall(messages=[{"role": "user", "content": text}], params={"temperature": 0.0, **params})


def run(spec: ChatSpec, calls, cache=None):
    client = OpenAICompatClient(spec, cache)
    try:
        return client.chat(calls)
    finally:
        client.close()


def test_plain_request_payload_and_auth_header():
    with FakeOpenAIServer() as srv:
        [res] = run(make_spec(srv), [call("hello", max_tokens=7)])
    assert res.text == "echo: hello" and res.error is None and res.cached is False
    assert res.model == "fake-model" and res.finish_reason == "stop"
    body = srv.requests[0]
    assert body["model"] == "fake-model" and body["max_tokens"] == 7
    assert body["messages"] == [{"role": "user", "content": "hello"}]
    assert srv.headers[0]["authorization"] == f"Bearer {SECRET}"


def test_429_then_success_honours_retry_after():
    script = [Reply(429, "slow down", headers={"Retry-After": "0.2"}), Reply(content="ok")]
    with FakeOpenAIServer(script) as srv:
        t0 = time.perf_counter()
        [res] = run(make_spec(srv, retry_max_s=1.0), [call("x")])
        elapsed = time.perf_counter() - t0
    assert res.text == "ok" and res.error is None
    assert len(srv.requests) == 2
    assert elapsed >= 0.2  # waited at least what Retry-After asked for


def test_5xx_storm_then_recovery():
    script = [Reply(500, "boom"), Reply(502, "bad gateway"), Reply(503, "overloaded"), Reply(504), Reply(content="back")]
    with FakeOpenAIServer(script) as srv:
        [res] = run(make_spec(srv, max_retries=5), [call("x")])
    assert res.text == "back"
    assert len(srv.requests) == 5


def test_5xx_storm_that_outlasts_retries_is_an_item_error():
    with FakeOpenAIServer(lambda i, b: Reply(503, "overloaded")) as srv:
        [res] = run(make_spec(srv, max_retries=2), [call("x")])
    assert res.text is None
    assert "HTTP 503" in res.error and "overloaded" in res.error and "3 attempts" in res.error
    assert len(srv.requests) == 3


def test_timeout_then_success():
    script = [Reply(content="late", delay_s=1.5), Reply(content="on time")]
    with FakeOpenAIServer(script) as srv:
        t0 = time.perf_counter()
        [res] = run(make_spec(srv, timeout_s=0.3), [call("x")])
        elapsed = time.perf_counter() - t0
    assert res.text == "on time"
    assert len(srv.requests) == 2
    assert elapsed < 1.4  # the client gave up on the slow reply instead of waiting for it


def test_timeout_without_retries_is_a_clear_item_error():
    with FakeOpenAIServer([Reply(content="late", delay_s=1.0)]) as srv:
        [res] = run(make_spec(srv, timeout_s=0.2, max_retries=0), [call("x")])
    assert res.text is None and "timeout_s=0.2" in res.error and "1 attempt" in res.error


def test_bad_item_does_not_fail_the_batch():
    def script(i, body):
        if "bad" in json.dumps(body["messages"]):
            return Reply(400, "context length exceeded")
        return None

    with FakeOpenAIServer(script) as srv:
        res = run(make_spec(srv), [call("a"), call("bad"), call("c")])
    assert [r.text for r in res] == ["echo: a", None, "echo: c"]
    assert "HTTP 400" in res[1].error and "context length exceeded" in res[1].error
    assert len(srv.requests) == 3  # 400 is not retried


def test_malformed_200_body_is_retried():
    with FakeOpenAIServer([Reply(raw_body=b"<html>proxy error</html>"), Reply(content="fine")]) as srv:
        [res] = run(make_spec(srv), [call("x")])
    assert res.text == "fine" and len(srv.requests) == 2


def test_cache_hit_on_rerun_sends_nothing(tmp_path):
    cache = ResponseCache(str(tmp_path))
    assert isinstance(cache, ResponseCacheLike)
    calls = [call("one"), call("two")]
    with FakeOpenAIServer() as srv:
        first = run(make_spec(srv), calls, cache)
        assert len(srv.requests) == 2
        second = run(make_spec(srv), calls, cache)
        assert len(srv.requests) == 2, "a cached request reached the server again"
        third = run(make_spec(srv), [call("one", max_tokens=3)], cache)  # other params: a miss
        assert len(srv.requests) == 3
    assert [r.cached for r in first] == [False, False] and [r.cached for r in second] == [True, True]
    assert [r.text for r in second] == [r.text for r in first] and third[0].cached is False
    files = sorted(Path(tmp_path, "_cache", "llm").rglob("*.json"))
    assert len(files) == 3
    for f in files:
        assert f.parent.name == f.stem[:2] and len(f.stem) == 64


def test_failures_are_not_cached(tmp_path):
    cache = ResponseCache(str(tmp_path))
    with FakeOpenAIServer([Reply(400, "nope")]) as srv:
        [bad] = run(make_spec(srv), [call("x")], cache)
        [good] = run(make_spec(srv), [call("x")], cache)
    assert bad.error and good.text == "echo: x" and len(srv.requests) == 2


def test_cache_hits_need_no_api_key(tmp_path, monkeypatch):
    cache = ResponseCache(str(tmp_path))
    with FakeOpenAIServer() as srv:
        run(make_spec(srv), [call("x")], cache)
        monkeypatch.delenv(ENV)
        [res] = run(make_spec(srv), [call("x")], cache)
        assert res.cached and res.text == "echo: x"
        with pytest.raises(MissingApiKeyError, match=ENV):
            run(make_spec(srv), [call("not cached")], cache)


def test_concurrency_is_bounded():
    with FakeOpenAIServer(latency_s=0.05) as srv:
        res = run(make_spec(srv, max_concurrency=3), [call(f"q{i}") for i in range(18)])
    assert all(r.error is None for r in res)
    assert [r.text for r in res] == [f"echo: q{i}" for i in range(18)]  # order preserved
    assert srv.max_in_flight == 3  # bounded, and actually concurrent


def test_retry_backoff_does_not_hold_a_concurrency_slot():
    # request 0 is rate-limited with a long Retry-After; the other request must not wait for it
    def script(i, body):
        if "slow" in json.dumps(body["messages"]) and i == 0:
            return Reply(429, "later", headers={"Retry-After": "0.5"})
        return None

    with FakeOpenAIServer(script) as srv:
        client = OpenAICompatClient(make_spec(srv, max_concurrency=1, retry_max_s=1.0))
        try:
            t0 = time.perf_counter()
            res = client.chat([call("slow"), call("fast")])
        finally:
            client.close()
    assert [r.text for r in res] == ["echo: slow", "echo: fast"]
    order = [b["messages"][0]["content"] for b in srv.requests]
    assert order == ["slow", "fast", "slow"]
    assert time.perf_counter() - t0 >= 0.5


def test_missing_api_key_is_reported(monkeypatch):
    monkeypatch.delenv(ENV)
    with FakeOpenAIServer() as srv:
        with pytest.raises(MissingApiKeyError) as ei:
            run(make_spec(srv), [call("x")])
    assert ENV in str(ei.value) and "api_key_env=None" in str(ei.value)
    assert srv.requests == []


def test_endpoint_without_key():
    with FakeOpenAIServer() as srv:
        [res] = run(make_spec(srv, api_key_env=None), [call("x")])
    assert res.text == "echo: x" and "authorization" not in srv.headers[0]


def test_unreachable_base_url_raises_after_retries():
    srv = FakeOpenAIServer().start()
    dead = srv.base_url
    srv.stop()
    with pytest.raises(EndpointUnreachableError) as ei:
        run(make_spec(dead, max_retries=1), [call("a"), call("b")])
    msg = str(ei.value)
    assert dead in msg and "base_url" in msg and SECRET not in msg


def test_404_is_a_configuration_error():
    with FakeOpenAIServer(lambda i, b: Reply(404, "model 'fake-model' does not exist")) as srv:
        with pytest.raises(EndpointConfigError, match="model_id"):
            run(make_spec(srv), [call("x")])


def test_api_key_never_leaks(tmp_path, caplog):
    """Servers that echo the Authorization header back must not make the key visible anywhere."""

    def script(i, body):
        text = json.dumps(body["messages"])
        echoed = f"invalid request with header Authorization: Bearer {SECRET} (key {SECRET})"
        if "auth" in text:
            return Reply(401, echoed)
        if "retry" in text and i < 3:
            return Reply(503, echoed)
        if "bad" in text:
            return Reply(400, echoed)
        return None

    cache = ResponseCache(str(tmp_path))
    caplog.set_level(logging.DEBUG)
    with FakeOpenAIServer(script) as srv:
        res = run(make_spec(srv, max_retries=4), [call("retry"), call("bad"), call("fine")], cache)
        assert res[0].text == "echo: retry" and res[2].text == "echo: fine"
        assert res[1].error and SECRET not in res[1].error and REDACTED in res[1].error
        with pytest.raises(EndpointAuthError) as ei:
            run(make_spec(srv), [call("auth")], cache)
    assert srv.headers[0]["authorization"] == f"Bearer {SECRET}"  # the key was really in use
    exc_text = "".join(traceback.format_exception(ei.value))
    assert SECRET not in exc_text and ENV in exc_text
    assert any("attempt" in r.getMessage() for r in caplog.records)  # retries were logged ...
    for r in caplog.records:
        assert SECRET not in r.getMessage()  # ... without the key
    for f in Path(tmp_path).rglob("*"):
        if f.is_file():
            assert SECRET not in f.read_text()


def test_chat_from_inside_a_running_event_loop():
    import asyncio

    with FakeOpenAIServer() as srv:
        client = OpenAICompatClient(make_spec(srv))
        try:
            async def main():
                direct = await client.achat([call("a")])
                blocking = client.chat([call("b")])  # private loop thread: no "loop already running"
                return direct + blocking

            res = asyncio.run(main())
        finally:
            client.close()
    assert [r.text for r in res] == ["echo: a", "echo: b"]


# -------------------------------------------------------------------------------------------------------
# helpers
# -------------------------------------------------------------------------------------------------------
def test_scrub():
    text = f"key={SECRET} header='Authorization: Bearer abc.def' other sk-live_ABCDEFGH12"
    out = scrub(text, [SECRET])
    assert SECRET not in out and "abc.def" not in out and "sk-live" not in out and out.count(REDACTED) == 3


def test_encode_image_data_url_roundtrip():
    import base64
    import io

    import numpy as np
    from PIL import Image

    img = np.zeros((40, 60, 3), np.uint8)
    img[:, :30] = 255
    url = encode_image_data_url(img, max_side_px=30)
    assert url.startswith("data:image/jpeg;base64,")
    back = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert back.format == "JPEG" and back.size == (30, 20)
    assert encode_image_data_url(np.ones((8, 8), np.float32)).startswith("data:image/jpeg")
    with pytest.raises(ValueError, match="shape"):
        encode_image_data_url(np.zeros((4, 4, 2), np.uint8))


# -------------------------------------------------------------------------------------------------------
# storage.response_cache
# -------------------------------------------------------------------------------------------------------
def test_request_key_is_canonical_and_hashes_images():
    img = "data:image/jpeg;base64," + "A" * 5000
    m1 = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": img}}, {"type": "text", "text": "hi"}]}]
    m2 = [{"content": [{"image_url": {"url": img}, "type": "image_url"}, {"text": "hi", "type": "text"}], "role": "user"}]
    k = ResponseCache.request_key("gpt-4o", m1, {"temperature": 0, "max_tokens": 5})
    assert k == ResponseCache.request_key("gpt-4o", m2, {"max_tokens": 5, "temperature": 0})
    assert len(k) == 64 and int(k, 16) >= 0
    assert k != ResponseCache.request_key("gpt-4o-mini", m1, {"temperature": 0, "max_tokens": 5})
    assert k != ResponseCache.request_key("gpt-4o", m1, {"temperature": 0, "max_tokens": 6})
    other = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": img + "B"}}, {"type": "text", "text": "hi"}]}]
    assert k != ResponseCache.request_key("gpt-4o", other, {"temperature": 0, "max_tokens": 5})


def test_cache_roundtrip_layout_and_inline_data(tmp_path):
    cache = ResponseCache(str(tmp_path / "out"))
    key = cache.request_key("m", [{"role": "user", "content": "x"}], {})
    assert cache.get(key) is None and key not in cache
    cache.put(key, {"text": "y", "request": {"image": "data:image/png;base64," + "Q" * 1000}})
    path = tmp_path / "out" / "_cache" / "llm" / key[:2] / f"{key}.json"
    assert path.is_file() and "Q" * 100 not in path.read_text()
    assert cache.get(key)["text"] == "y" and key in cache
    path.write_text("{torn")
    assert cache.get(key) is None  # a torn file is a miss, not a crash
    with pytest.raises(ValueError):
        cache.path_for("../../etc/passwd")


def test_cache_concurrent_writers(tmp_path):
    cache = ResponseCache(str(tmp_path))
    key = cache.request_key("m", [], {"n": 1})
    errors = []

    def writer(n):
        try:
            for j in range(30):
                cache.put(key, {"text": "same", "writer": n, "j": j})
                got = cache.get(key)
                assert got is not None and got["text"] == "same"
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    leftovers = [p for p in Path(tmp_path).rglob("*") if p.is_file() and p.suffix != ".json"]
    assert leftovers == []  # no temp files left behind


def test_cache_on_fsspec_memory_filesystem():
    cache = ResponseCache("memory://mf-cache-test")
    key = cache.request_key("m", [{"role": "user", "content": "z"}], {})
    cache.put(key, {"text": "mem"})
    assert cache.get(key) == {"text": "mem"}
