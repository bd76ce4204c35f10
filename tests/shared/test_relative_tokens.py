"""Relative spatiotemporal tokens: exact values, round trips within half a step, edges, rotated frames."""
from __future__ import annotations

import random

import pytest

from stages.shared.relative_tokens import (N_SPACE, N_TIME, dequantize_box, dequantize_time, format_box, format_time,
                                          parse_boxes, parse_times, quantize_box, quantize_time)


def test_paper_formula_values():
    assert quantize_time(0.0, 10.0) == 0
    assert quantize_time(10.0, 10.0) == N_TIME == 300
    assert quantize_time(5.0, 10.0) == 150
    assert quantize_time(1.0, 3.0) == 100
    assert quantize_time(0.05, 3.0) == 5  # 0.05/3*300 = 5.0
    assert quantize_time(0.0249, 3.0) == 2  # 2.49 -> 2
    assert quantize_time(0.025, 3.0) == 3  # 2.5 -> 3 (half up, not banker's rounding)
    assert quantize_box((0, 0, 640, 272), 640, 272) == (0, 0, N_SPACE, N_SPACE)
    assert quantize_box((320, 68, 480, 204), 640, 272) == (500, 250, 750, 750)


def test_clamped_outside_the_frame_and_clip():
    assert quantize_time(-0.1, 10.0) == 0 and quantize_time(10.4, 10.0) == 300
    assert quantize_box((-3, -1, 641, 300), 640, 272) == (0, 0, 1000, 1000)
    with pytest.raises(ValueError):
        quantize_time(1.0, 0.0)


def test_round_trip_within_half_a_step():
    rng = random.Random(0)
    for _ in range(2000):
        T = rng.uniform(0.5, 120)
        t = rng.uniform(0, T)
        assert abs(dequantize_time(quantize_time(t, T), T) - t) <= T / (2 * N_TIME) + 1e-9
        W, H = rng.randint(16, 4000), rng.randint(16, 4000)
        box = sorted([rng.uniform(0, W), rng.uniform(0, W)]), sorted([rng.uniform(0, H), rng.uniform(0, H)])
        b = (box[0][0], box[1][0], box[0][1], box[1][1])
        back = dequantize_box(quantize_box(b, W, H), W, H)
        for v, w, ext in zip(b, back, (W, H, W, H)):
            assert abs(v - w) <= ext / (2 * N_SPACE) + 1e-9
    # quantise(dequantise(q)) is the identity on tokens
    for q in range(N_TIME + 1):
        assert quantize_time(dequantize_time(q, 7.3), 7.3) == q


def test_rotated_video_uses_display_size():
    # a 1920x1080 stream with rotation 90 is shown as 1080x1920; boxes live in that displayed frame
    W, H = 1080, 1920
    q = quantize_box((540, 960, 1080, 1920), W, H)
    assert q == (500, 500, 1000, 1000)
    assert dequantize_box(q, W, H) == (540.0, 960.0, 1080.0, 1920.0)


def test_text_forms_parse_back():
    text = f"The car moves from {format_time(12)} to {format_time(300)}, from {format_box((1, 2, 3, 4))} to {format_box((0, 0, 1000, 1000))}."
    assert parse_times(text) == [12, 300]
    assert parse_boxes(text) == [(1, 2, 3, 4), (0, 0, 1000, 1000)]


def test_dedicated_token_form_round_trips_and_leaves_times_alone():
    from stages.shared.relative_tokens import (boxes_to_coord_tokens, coord_token_vocabulary, coord_tokens_to_boxes,
                                              format_coord_token, time_token_vocabulary)

    text = "from <0> to <300>: [0, 5, 999, 1000] then [12, 34, 56, 78]; 7 balls, [1, 2] is not a box"
    tok = boxes_to_coord_tokens(text)
    assert tok == ("from <0> to <300>: [<c0>, <c5>, <c999>, <c1000>] then [<c12>, <c34>, <c56>, <c78>]; "
                   "7 balls, [1, 2] is not a box")
    assert coord_tokens_to_boxes(tok) == text
    assert parse_times(tok) == [0, 300] and parse_boxes(coord_tokens_to_boxes(tok)) == [(0, 5, 999, 1000), (12, 34, 56, 78)]
    assert len(time_token_vocabulary()) == N_TIME + 1 and time_token_vocabulary()[150] == "<150>"
    assert len(coord_token_vocabulary()) == N_SPACE + 1 and coord_token_vocabulary()[7] == format_coord_token(7) == "<c7>"
