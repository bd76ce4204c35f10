"""`motionforge review serve` in a real browser: headless Debian Chromium driven by Playwright.

A reviewer accepts, rejects (a reason is required) and edits with the keyboard; two reviewers work at once
and every decision reaches the store; the player stays inside the clip's seconds and loops; the explorer
draws the track's box where the track table says. Screenshots go to $MOTIONFORGE_SCREENSHOTS when set.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from dashboards.server import create_app
from stages.motionbench import review
from tests._video_fixtures import require_ffmpeg
from tests.dashboards._browser import browser, live_server, require_browser
from tests.dashboards._roots import CLIP_END_S, CLIP_START_S, MB_QUESTIONS, imove_root, motionbench_root

WAIT_MS = 60_000  # generous: a loaded CI machine can be slow to decode and render, and nothing here races it


@pytest.fixture(autouse=True)
def _needs():
    require_ffmpeg()
    require_browser()


def _shot(page, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("MOTIONFORGE_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / name), full_page=True)


def _current(page) -> str:
    page.wait_for_function("() => document.body.dataset.question", timeout=WAIT_MS)
    return page.evaluate("() => document.body.dataset.question")


def _moved_on(page, qid: str) -> str:
    page.wait_for_function("q => document.body.dataset.question !== q || document.body.dataset.state === 'done'",
                           arg=qid, timeout=WAIT_MS)
    return page.evaluate("() => document.body.dataset.question")


def _latest(root) -> dict[str, review.Decision]:
    return review.load_decisions(root, 0)


def test_reviewer_accepts_rejects_and_edits(tmp_path):
    root, by_id = motionbench_root(tmp_path)
    with live_server(create_app(root.url)) as url, browser() as b:
        page = b.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{url}/review?reviewer=ann")
        first = _current(page)
        page.wait_for_function("() => document.getElementById('first-frame').complete && "
                               "document.getElementById('first-frame').naturalWidth > 0", timeout=WAIT_MS)
        page.wait_for_function("() => player.video.readyState >= 2", timeout=WAIT_MS)
        assert page.locator("#question").inner_text() == by_id[first][0]
        assert page.locator("#judges").inner_text().count("fake-j") == 2
        _shot(page, "review_page.png", tmp_path)

        # accept with the "a" key: stored, and the next question comes up at once
        page.keyboard.press("a")
        second = _moved_on(page, first)
        assert second != first and _latest(root)[first].decision == "accept" and _latest(root)[first].reviewer == "ann"

        # reject needs a reason: Enter on an empty reason stores nothing
        page.keyboard.press("r")
        page.wait_for_selector("#reject-form:not([hidden])")
        assert page.locator("#reject-reason").is_visible() and not page.locator("#accept").is_visible()
        page.keyboard.press("Enter")
        page.wait_for_function("() => document.getElementById('message').classList.contains('error')")
        assert "reason" in page.locator("#message").inner_text()
        assert second not in _latest(root)
        page.fill("#reject-reason", "two options are both right")
        page.keyboard.press("Enter")
        third = _moved_on(page, second)
        d = _latest(root)[second]
        assert (d.decision, d.reason, d.reviewer) == ("reject", "two options are both right", "ann")

        # edit: blanking an option is refused by the server's validation, and nothing is stored
        page.keyboard.press("e")
        page.wait_for_selector("#edit-form:not([hidden])")
        page.fill("#edit-options input[data-letter='D']", "")
        page.fill("#edit-reason", "option D was wrong")
        page.locator("#edit-question").press("Control+Enter")
        page.wait_for_function("() => document.getElementById('message').textContent.includes('Not recorded')")
        assert "four non-empty options" in page.locator("#message").inner_text()
        _shot(page, "review_edit_refused.png", tmp_path)
        assert third not in _latest(root)
        page.fill("#edit-question", "What does the person do before sitting?")
        page.fill("#edit-options input[data-letter='D']", "Nod")
        page.select_option("#edit-answer", "D")
        page.select_option("#edit-category", "MR")
        page.locator("#edit-reason").press("Control+Enter")
        _moved_on(page, third)
        d = _latest(root)[third]
        assert (d.decision, d.question, d.answer, d.category, d.reason) == (
            "edit", "What does the person do before sitting?", "D", "MR", "option D was wrong")
        assert d.options[3] == "Nod"

        page.wait_for_function("() => document.body.dataset.state === 'done'", timeout=WAIT_MS)
        page.wait_for_function("() => (document.getElementById('progress-total') || {}).textContent"
                               " && document.getElementById('progress-total').textContent.startsWith('3 / 3')",
                               timeout=WAIT_MS)
    # the dropped question never came up; exactly the three decisions are stored
    assert len(review.decision_history(root, 0)) == 3
    assert next(q for q, e in by_id.items() if e is MB_QUESTIONS[3]) not in _latest(root)


def test_two_reviewers_at_once_lose_nothing(tmp_path):
    root, by_id = motionbench_root(tmp_path, extra=9)
    pending = {q for q, e in by_id.items() if e is not MB_QUESTIONS[3]}
    with live_server(create_app(root.url)) as url, browser() as b:
        pages = {}
        for who in ("ann", "bob"):
            ctx = b.new_context(viewport={"width": 1280, "height": 900})
            pages[who] = ctx.new_page()
            pages[who].goto(f"{url}/review?reviewer={who}")
        shown = {who: _current(p) for who, p in pages.items()}
        assert shown["ann"] != shown["bob"]  # each has claimed a different question
        seen: dict[str, list[str]] = {"ann": [], "bob": []}
        while not all(p.evaluate("() => document.body.dataset.state === 'done'") for p in pages.values()):
            # both press "a" before either waits: their requests are in flight together
            active = [w for w, p in pages.items() if not p.evaluate("() => document.body.dataset.state === 'done'")]
            for who in active:
                seen[who].append(shown[who])
                pages[who].keyboard.press("a")
            for who in active:
                shown[who] = _moved_on(pages[who], shown[who])
        stored = review.decision_history(root, 0)
        assert {(d.question_id, d.reviewer) for d in stored} == {(q, w) for w, qs in seen.items() for q in qs}
        assert {d.question_id for d in stored} == pending and len(stored) == len(pending)
        assert seen["ann"] and seen["bob"]

        # both look at the same question and disagree: the page shows a conflict
        q = seen["ann"][0]
        for who, keys in (("ann", ["r"]), ("bob", ["a"])):
            p = pages[who]
            p.goto(f"{url}/review/{q}?reviewer={who}")
            p.wait_for_function("q => document.body.dataset.question === q", arg=q, timeout=WAIT_MS)
            if keys == ["r"]:
                p.keyboard.press("r")
                p.fill("#reject-reason", "the ball never bounces")
                p.keyboard.press("Enter")
            else:
                p.keyboard.press("a")
            p.wait_for_function("() => document.getElementById('message').textContent.includes('recorded')",
                                timeout=WAIT_MS)
        bob = pages["bob"]
        bob.wait_for_selector("#conflict:not([hidden])", timeout=WAIT_MS)
        bob.wait_for_function("q => document.querySelector(`#conflicts a[href='/review/${q}']`)", arg=q, timeout=WAIT_MS)
        assert "ann reject vs bob accept" in bob.locator("#conflicts").inner_text()
        _shot(bob, "review_conflict.png", tmp_path)


def test_player_stays_in_the_clip_and_loops(tmp_path):
    root, by_id = motionbench_root(tmp_path)
    with live_server(create_app(root.url)) as url, browser() as b:
        page = b.new_page()
        page.goto(f"{url}/review?reviewer=ann")
        _current(page)
        page.wait_for_function(f"() => player.video.currentTime >= {CLIP_START_S} && !player.video.paused",
                               timeout=WAIT_MS)
        samples = [page.evaluate("() => player.video.currentTime")]
        # sample until the player went round the 1 s clip twice, however slowly this machine plays it
        # The source runs to 6 s: without the loop the time would pass 2 s and keep going. The page sends it
        # back on the first animation frame past the end, so it can be a frame or so over; 1 s of slack keeps
        # the test from depending on how fast a loaded machine renders while still catching a missing loop.
        while page.evaluate("() => player.loops") < 3:
            samples.append(page.evaluate("() => player.video.currentTime"))
            assert CLIP_START_S - 1e-3 <= samples[-1] < CLIP_END_S + 1.0, samples[-5:]
            page.wait_for_timeout(50)
            assert len(samples) < 2000, f"no loops after {len(samples)} samples: {samples[-5:]}"
        assert any(b < a for a, b in zip(samples, samples[1:])), "time never went back to the clip start"

        # frame stepping and speed
        page.keyboard.press("Space")
        page.wait_for_function("() => player.video.paused")
        page.evaluate(f"() => {{ player.video.currentTime = {CLIP_START_S} + 0.5; }}")
        page.wait_for_function("() => !player.video.seeking")
        before = page.evaluate("() => player.video.currentTime")
        page.keyboard.press(".")
        page.wait_for_function(f"() => !player.video.seeking && player.video.currentTime > {before}")
        after = page.evaluate("() => player.video.currentTime")
        assert after - before == pytest.approx(1 / 25, abs=1e-3)  # one frame at the clip's 25 fps (exact seek)
        page.keyboard.press(",")
        page.wait_for_function(f"() => !player.video.seeking && player.video.currentTime < {after}")
        assert page.evaluate("() => player.video.currentTime") == pytest.approx(before, abs=1e-3)
        page.keyboard.press("]")
        assert page.evaluate("() => player.video.playbackRate") == 1.5
        page.select_option("select[data-act=speed]", "0.25")
        assert page.evaluate("() => player.video.playbackRate") == 0.25


def test_explorer_draws_the_tracks_box(tmp_path):
    root, info = imove_root(tmp_path)
    kept, track = info["kept"]
    fps = track.track_fps
    with live_server(create_app(root.url)) as url, browser() as b:
        page = b.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{url}/explore/imove")
        page.wait_for_function("() => document.body.dataset.count === '2'", timeout=WAIT_MS)
        # filter by drop reason: only the instance trackfilter dropped stays
        reason = page.locator("#f-reason option").nth(1).get_attribute("value")
        page.select_option("#f-reason", reason)
        page.wait_for_function("() => document.body.dataset.count === '1'", timeout=WAIT_MS)
        assert info["dropped"][0].instance_id[:12] in page.locator("#instances").inner_text()
        page.select_option("#f-reason", "")
        page.wait_for_function("() => document.body.dataset.count === '2'", timeout=WAIT_MS)

        page.locator(f"#instances tr[data-id='{kept.instance_id}']").click()
        page.wait_for_function(f"() => document.body.dataset.instance === '{kept.instance_id}' && "
                               "player.video.readyState >= 2", timeout=WAIT_MS)
        facts = page.locator("#facts").inner_text()
        assert "accepted: the caption matches the motion" in facts and "moves across the frame" in facts
        assert page.locator("#samples h4").count() == 3
        for frame in (5, 40):
            page.evaluate(f"() => {{ player.video.dataset.userPaused = '1'; player.video.pause(); "
                          f"player.video.currentTime = {frame / fps + 0.001}; }}")
            page.wait_for_function(f"() => !player.video.seeking && overlayState.frame_index === {frame}",
                                   timeout=WAIT_MS)
            state = page.evaluate("() => ({s: overlayState, w: player.video.clientWidth, h: player.video.clientHeight})")
            want = track.points[frame]["box_xyxy_px"]
            assert state["s"]["box_px"] == want
            sx, sy = state["w"] / track.width, state["h"] / track.height
            # canvas geometry: the source box scaled to the displayed video (float math, 1e-6 px)
            assert state["s"]["box_canvas"] == pytest.approx([want[0] * sx, want[1] * sy, want[2] * sx, want[3] * sy],
                                                             abs=1e-6)
            # pixels: the stroke is on the box's left edge, the inside is left clear
            x1, y1, x2, y2 = state["s"]["box_canvas"]
            px = page.evaluate(f"""() => {{
                const c = document.getElementById('overlay').getContext('2d');
                return [Array.from(c.getImageData({round(x1)}, {round((y1 + y2) / 2)}, 1, 1).data),
                        Array.from(c.getImageData({round((x1 + x2) / 2)}, {round((y1 + y2) / 2)}, 1, 1).data)];
            }}""")
            assert px[0] == [255, 0, 255, 255] and px[1][3] == 0
            # and the box sits on the drawn object: the video's pixel at the box centre has the object's colour
            obj = next(o for o in info["truth"].objects if o.category == kept.label)
            shot = page.locator("#video").screenshot()
            from io import BytesIO

            from PIL import Image

            img = Image.open(BytesIO(shot)).convert("RGB")
            cx, cy = (x1 + x2) / 2 * img.width / state["w"], (y1 + y2) / 2 * img.height / state["h"]
            got = img.getpixel((int(cx), int(cy)))
            # H.264 at crf 18 and the browser's YUV->RGB conversion move a flat colour by a few levels
            assert max(abs(g - w) for g, w in zip(got, obj.rgb)) < 40, (got, obj.rgb)
        _shot(page, "explorer_imove.png", tmp_path)
        page.goto(f"{url}/report")
        assert "iMOVE-IT statistics" in page.locator("body").inner_text()
        _shot(page, "report.png", tmp_path)


def test_explorer_lists_a_page_at_a_time(tmp_path, monkeypatch):
    """The explorer asks for a page of instances (a large root has millions) and "show more" appends the next;
    one row per page here stands in for 500."""
    import dashboards.server as server

    root, info = imove_root(tmp_path)
    monkeypatch.setattr(server, "PAGE_ROWS", 1)
    with live_server(create_app(root.url)) as url, browser() as b:
        page = b.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{url}/explore/imove")
        page.wait_for_function("() => document.body.dataset.count === '1' && document.body.dataset.total === '2'",
                               timeout=WAIT_MS)
        assert page.locator("#shown").inner_text() == "1 of 2" and page.locator("#more").is_visible()
        page.locator("#more").click()
        page.wait_for_function("() => document.body.dataset.count === '2'", timeout=WAIT_MS)
        ids = page.locator("#instances tr[data-id]").evaluate_all("rows => rows.map(r => r.dataset.id)")
        assert sorted(ids) == sorted([info["kept"][0].instance_id, info["dropped"][0].instance_id])
        assert page.locator("#shown").inner_text() == "2 of 2" and not page.locator("#more").is_visible()
        _shot(page, "explorer_imove_paged.png", tmp_path)


def test_motionbench_explorer_by_category_with_the_clip(tmp_path):
    root, by_id = motionbench_root(tmp_path)
    with live_server(create_app(root.url)) as url, browser() as b:
        page = b.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"{url}/explore/motionbench")
        page.wait_for_function(f"() => document.body.dataset.count === '{len(by_id)}'", timeout=WAIT_MS)
        page.select_option("#f-category", "RC")
        page.wait_for_function("() => document.body.dataset.count === '1'", timeout=WAIT_MS)
        page.locator("#questions tr[data-i]").first.click()
        page.wait_for_function(f"() => player.video.currentTime >= {CLIP_START_S} && !player.video.paused",
                               timeout=WAIT_MS)
        assert page.locator("#question").inner_text() == MB_QUESTIONS[0][0]
        assert page.locator("#split").inner_text().startswith("split: (not split yet)")
        t = page.evaluate("() => player.video.currentTime")
        assert CLIP_START_S - 1e-3 <= t < CLIP_END_S + 1.0  # same slack as the review player's test
        _shot(page, "explorer_motionbench.png", tmp_path)
