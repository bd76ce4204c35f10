"""Vision-language model expert: tiny Qwen2-VL / Qwen2.5-VL / InternVL through the production loading path, and the
OpenAI-compatible backend against a loopback server."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from experts.base import clear_expert_cache
from experts.vlm import (
    VlmRequest,
    VlmResponse,
    VlmSpec,
    build_tiny_internvl,
    build_tiny_qwen2_5_vl,
    build_tiny_qwen2_vl,
    load_vlm,
)
from storage.response_cache import ResponseCache

try:
    from tests._fake_openai_server import FakeOpenAIServer, Reply
except ImportError:  # tests/ on sys.path instead of the repository root
    from _fake_openai_server import FakeOpenAIServer, Reply

ENV = "MOTIONFORGE_TEST_VLM_KEY"
BUILDERS = {"qwen2_vl": build_tiny_qwen2_vl, "qwen2_5_vl": build_tiny_qwen2_5_vl, "internvl": build_tiny_internvl}


def _img(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiny_vlm(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    BUILDERS[request.param](out)  # build + save_pretrained (model and processor) ...
    vlm = load_vlm(VlmSpec(model_id=str(out), max_new_tokens=5, batch_size=8, device="cpu"))  # ... load it back
    assert type(vlm._backend.model).__name__.lower().replace("_", "").startswith(request.param.replace("_", ""))
    return vlm


def _requests(rng):
    frames = tuple(_img(rng, 40, 48) for _ in range(4))
    return [
        VlmRequest("Describe the appearance of the object.", images=(_img(rng, 48, 64),)),
        VlmRequest("How does the object move?", images=frames, as_video=True),
        VlmRequest("Compare.", images=(_img(rng, 30, 90), rng.random((20, 20))), system="Be brief."),
        VlmRequest("Odd number of frames.", images=frames[:3], as_video=True, max_new_tokens=3),
        VlmRequest("No image at all."),
    ]


def test_tiny_vlm_types_and_batch_equals_singles(tiny_vlm):
    reqs = _requests(np.random.default_rng(0))
    batch = tiny_vlm.generate(reqs)
    assert len(batch) == len(reqs) and all(isinstance(r, VlmResponse) for r in batch)
    assert all(r.error is None and isinstance(r.text, str) and not r.cached for r in batch), batch
    assert all(r.model == tiny_vlm.spec.model_id for r in batch)
    singles = [tiny_vlm.generate([r])[0] for r in reqs]
    assert [r.text for r in batch] == [r.text for r in singles]
    assert tiny_vlm.generate(reqs) == batch  # greedy: deterministic


def test_tiny_vlm_sees_the_pixels(tiny_vlm):
    rng = np.random.default_rng(1)
    a, b = _img(rng, 56, 56), _img(rng, 56, 56)
    prompt = "What is shown?"
    ra, rb = tiny_vlm.generate([VlmRequest(prompt, images=(a,)), VlmRequest(prompt, images=(b,))])
    # logits of a random model still depend on the image; identical text would mean the image was dropped
    video = tiny_vlm.generate([VlmRequest(prompt, images=(a, a, b, b), as_video=True)])[0]
    assert ra.error is None and rb.error is None and video.error is None
    assert len({ra.text, rb.text, video.text}) >= 2


def test_bad_item_is_an_error_row_not_an_exception(tiny_vlm):
    rng = np.random.default_rng(2)
    res = tiny_vlm.generate([
        VlmRequest("ok", images=(_img(rng, 32, 32),)),
        VlmRequest("bad", images=(np.zeros((4, 4, 2), np.uint8),)),
        VlmRequest("bad video", images=(_img(rng, 32, 32), _img(rng, 40, 32)), as_video=True),
    ])
    assert res[0].error is None and isinstance(res[0].text, str)
    assert res[1].text is None and "shape (4, 4, 2)" in res[1].error
    assert res[2].text is None and "one size" in res[2].error


def test_tiny_scheme_builds_once_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("MOTIONFORGE_TINY_CACHE", str(tmp_path))
    # an earlier test in this process may hold tiny://qwen2_vl in the expert cache: that one was built elsewhere
    clear_expert_cache()
    try:
        vlm = load_vlm(VlmSpec(model_id="tiny://qwen2_vl", max_new_tokens=3, device="cpu"))
        [r] = vlm.generate([VlmRequest("hi", images=(np.zeros((28, 28, 3), np.uint8),))])
    finally:
        clear_expert_cache()  # the next test builds its own: nothing it loads depends on this test's folder
    assert r.error is None
    saved = {p.name for p in (tmp_path / "qwen2_vl").iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= saved


# ------------------------------------------------------------------ OpenAI-compatible backend ----------
@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(ENV, "sk-vlm-test-key-111111")


def openai_vlm(srv, cache=None, **kw):
    spec = dict(model_id="gpt-4o", backend="openai", base_url=srv.base_url, api_key_env=ENV, max_retries=2,
                retry_initial_s=0.01, retry_max_s=0.02, timeout_s=5.0, max_concurrency=4)
    spec.update(kw)
    return load_vlm(VlmSpec(**spec), cache)


def _decode(url: str) -> Image.Image:
    assert url.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def test_openai_images_and_video_frames(key):
    rng = np.random.default_rng(3)
    with FakeOpenAIServer() as srv:
        vlm = openai_vlm(srv, max_image_side_px=32)
        try:
            res = vlm.generate([
                VlmRequest("What is this?", images=(_img(rng, 48, 64),), system="sys"),
                VlmRequest("How does it move?", images=tuple(_img(rng, 24, 24) for _ in range(3)), as_video=True),
                VlmRequest("bad", images=(np.zeros((3, 3, 2)),)),
            ])
        finally:
            vlm.close()
    assert res[0].text == "echo: What is this?" and res[1].error is None
    assert res[2].text is None and "shape" in res[2].error
    assert len(srv.requests) == 2  # the unreadable item never went out
    # requests run concurrently: find each by content, not by arrival order
    img_msg = next(r["messages"] for r in srv.requests if r["messages"][0]["role"] == "system")
    vid_msg = next(r["messages"] for r in srv.requests if r["messages"][0]["role"] == "user")
    assert img_msg[0] == {"role": "system", "content": "sys"}
    parts = img_msg[1]["content"]
    assert [p["type"] for p in parts] == ["image_url", "text"]
    assert _decode(parts[0]["image_url"]["url"]).size == (32, 24)  # downscaled to max_image_side_px
    vparts = vid_msg[0]["content"]
    assert [p["type"] for p in vparts] == ["text", "image_url", "image_url", "image_url", "text"]
    assert "3 images are frames of one video" in vparts[0]["text"]


def _moving_square(n: int, h: int, w: int) -> tuple[np.ndarray, ...]:
    """Smooth frames (a horizontal gradient) with a white 8x8 square moving 5 px right per frame."""
    base = np.repeat(np.linspace(40, 160, w, dtype=np.float32)[None, :, None], 3, axis=2)
    frames = []
    for i in range(n):
        f = np.repeat(base, h, axis=0)
        f[10:18, 4 + 5 * i:12 + 5 * i] = 255
        frames.append(f.astype(np.uint8))
    return tuple(frames)


def _read_mp4(url: str, tmp_path) -> tuple[float, list[np.ndarray]]:
    """An MP4 data URL read as vLLM's OpenAI server reads a video by default (OpenCV): its rate and frames (RGB)."""
    import cv2

    assert url.startswith("data:video/mp4;base64,")
    path = tmp_path / "sent.mp4"
    path.write_bytes(base64.b64decode(url.split(",", 1)[1]))
    cap = cv2.VideoCapture(str(path))
    fps, frames = cap.get(cv2.CAP_PROP_FPS), []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(bgr[:, :, ::-1])
    cap.release()
    return fps, frames


def test_openai_video_as_one_mp4(key, tmp_path):
    """endpoint_video="mp4": a frame list goes as one video_url part (for vLLM / SGLang servers, which decode it as a
    video), an H.264 MP4 at the spec's video_fps, read back with OpenCV (vLLM's default video reader): every frame in
    order at that rate, an odd height cropped to even, the motion where it was, and an odd count padded with the
    last frame (Qwen-VL's rule, which the servers apply). A single frame stays an image, and frames of different
    sizes fail their own item."""
    frames = _moving_square(5, 41, 50)
    rng = np.random.default_rng(5)
    with FakeOpenAIServer() as srv:
        vlm = openai_vlm(srv, endpoint_video="mp4", video_fps=3.0)
        small = openai_vlm(srv, endpoint_video="mp4", max_image_side_px=24)
        try:
            res = vlm.generate([VlmRequest("How does it move?", images=frames, as_video=True),
                                VlmRequest("One frame.", images=frames[:1], as_video=True),
                                VlmRequest("Bad.", images=(frames[0], _img(rng, 20, 20)), as_video=True)])
            [shrunk] = small.generate([VlmRequest("Smaller.", images=frames, as_video=True)])
        finally:
            vlm.close()
            small.close()
    assert res[0].error is None and res[1].error is None and shrunk.error is None
    assert res[2].text is None and "one size" in res[2].error
    sent = {r["messages"][0]["content"][-1]["text"]: r["messages"][0]["content"] for r in srv.requests}
    assert sorted(sent) == ["How does it move?", "One frame.", "Smaller."]  # the bad item never went out
    parts = sent["How does it move?"]
    assert [p["type"] for p in parts] == ["video_url", "text"]  # no "frames of one video" line: it is a video
    fps, got = _read_mp4(parts[0]["video_url"]["url"], tmp_path)
    assert fps == 3.0 and len(got) == 6 and got[0].shape == (40, 50, 3)  # 5 frames and a repeat of the last
    for sent_frame, read in zip(frames + frames[-1:], got):
        # H.264 at crf 18 on smooth frames: a few levels of error on average, far below the square's contrast
        assert np.abs(read.astype(int) - sent_frame[:40].astype(int)).mean() < 4
    assert [int(np.argmax(f[14].mean(axis=1) > 230)) for f in got] == [4, 9, 14, 19, 24, 24]  # the square's left edge
    assert [p["type"] for p in sent["One frame."]] == ["image_url", "text"]
    _, got = _read_mp4(sent["Smaller."][0]["video_url"]["url"], tmp_path)
    assert len(got) == 6 and got[0].shape == (20, 24, 3)  # max_image_side_px: 50x41 -> 24x20


def test_openai_video_form_is_in_the_config_hash_only_when_set():
    """Configs written before endpoint_video existed dump and hash as before; "mp4" changes what the model is sent,
    so it changes a stage's config hash."""
    from stages.imove_it.check import CheckConfig

    base = CheckConfig()
    assert "endpoint_video" not in base.model_dump()["vlm"]
    mp4 = CheckConfig(vlm=base.vlm.model_copy(update={"endpoint_video": "mp4"}))
    assert CheckConfig.model_validate(mp4.model_dump()) == mp4 and mp4.config_hash() != base.config_hash()
    assert CheckConfig(vlm=base.vlm.model_copy(update={"endpoint_video": "images"})).config_hash() == base.config_hash()


def test_openai_json_schema_and_cache(key, tmp_path):
    schema = {"title": "Verdict", "type": "object", "properties": {"correct": {"type": "boolean"}}, "required": ["correct"]}
    cache = ResponseCache(str(tmp_path))
    img = np.full((20, 20, 3), 128, np.uint8)
    req = VlmRequest("Is the caption right?", images=(img,), json_schema=schema)
    with FakeOpenAIServer([Reply(content='{"correct": true}')]) as srv:
        for expected_cached in (False, True):
            vlm = openai_vlm(srv, cache, supports_json_schema=True)
            try:
                [r] = vlm.generate([req])
            finally:
                vlm.close()
            assert r.text == '{"correct": true}' and r.cached is expected_cached
        assert len(srv.requests) == 1
    assert srv.requests[0]["response_format"]["json_schema"]["schema"] == schema
    stored = list(tmp_path.rglob("*.json"))
    assert len(stored) == 1 and "base64" not in stored[0].read_text()  # pixels are not kept in the cache
