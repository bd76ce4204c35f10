"""iMOVE-IT metrics on planted predictions; every expected number is worked out by hand in the comments."""
from __future__ import annotations

import pytest

from stages.evaluation.imove_it import (
    parse_time_span,
    parse_two_boxes,
    read_charades_sta,
    charades_gt,
    score_captions,
    score_spatial,
    score_temporal,
    temporal_iou,
)

EXACT = 1e-12  # sums of a handful of exact binary fractions; only the last bit can differ


def test_temporal_iou_by_hand():
    assert temporal_iou((2.0, 6.0), (4.0, 8.0)) == pytest.approx(2 / 6, abs=EXACT)  # overlap 4-6, union 2-8
    assert temporal_iou((0.0, 1.0), (1.0, 2.0)) == 0.0  # touching spans share no time
    assert temporal_iou((3.0, 5.0), (0.0, 10.0)) == pytest.approx(0.2, abs=EXACT)
    assert temporal_iou((1.0, 1.0), (1.0, 1.0)) == 0.0  # empty spans


def test_recall_at_iou_and_miou_by_hand():
    gt = {"a": (0.0, 10.0), "b": (0.0, 10.0), "c": (0.0, 10.0), "d": (0.0, 10.0), "e": (2.0, 4.0)}
    pred = {
        "a": (0.0, 10.0),  # IoU 1.0
        "b": (0.0, 6.0),   # IoU 0.6
        "c": (6.0, 10.0),  # IoU 0.4
        "d": (8.0, 10.0),  # IoU 0.2
        "e": None,         # unparseable: IoU 0
    }
    s = score_temporal(gt, pred)
    assert s.recall["R@0.3"] == pytest.approx(3 / 5, abs=EXACT)  # 1.0, 0.6, 0.4
    assert s.recall["R@0.5"] == pytest.approx(2 / 5, abs=EXACT)  # 1.0, 0.6
    assert s.recall["R@0.7"] == pytest.approx(1 / 5, abs=EXACT)  # 1.0
    assert s.miou == pytest.approx((1.0 + 0.6 + 0.4 + 0.2 + 0.0) / 5, abs=EXACT)
    assert s.unparseable == ["e"]
    # IoU exactly at a threshold counts as a hit (Charades-STA: IoU >= m)
    t = score_temporal({"x": (0.0, 10.0)}, {"x": (0.0, 5.0)})
    assert t.recall["R@0.5"] == 1.0 and t.recall["R@0.7"] == 0.0


def test_missing_prediction_is_a_listed_miss():
    s = score_temporal({"a": (0.0, 1.0), "b": (0.0, 1.0)}, {"a": (0.0, 1.0)})
    assert s.unparseable == ["b"] and s.miou == 0.5 and s.recall["R@0.3"] == 0.5


def test_parse_time_span_from_relative_tokens():
    # 300 tokens over a 6 s clip: one token = 0.02 s; <75> = 1.5 s, <150> = 3.0 s
    assert parse_time_span("From <75> to <150>.", 6.0) == pytest.approx((1.5, 3.0), abs=EXACT)
    assert parse_time_span("From <150> to <75>.", 6.0) == pytest.approx((1.5, 3.0), abs=EXACT)  # reversed
    assert parse_time_span("It starts at <75>.", 6.0) is None  # one time: unparseable
    assert parse_time_span("no idea", 6.0) is None and parse_time_span(None, 6.0) is None


def test_box_iou_and_accuracy_by_hand():
    gt = {
        "s1": [(0, 0, 10, 10), (10, 10, 20, 20)],
        "s2": [(0, 0, 10, 10), (0, 0, 10, 10)],
    }
    pred = {
        "s1": [(0, 0, 10, 10), (15, 10, 25, 20)],  # IoU 1; overlap 5x10=50, union 100+100-50=150 -> 1/3
        "s2": [(0, 0, 5, 10)],                     # IoU 50/100 = 0.5; second box missing -> 0, listed
    }
    s = score_spatial(gt, pred)
    assert s.n_boxes == 4 and s.n_samples == 2
    assert s.mean_iou == pytest.approx((1.0 + 1 / 3 + 0.5 + 0.0) / 4, abs=EXACT)
    assert s.acc_at_05 == pytest.approx(2 / 4, abs=EXACT)  # 1.0 and 0.5 reach IoU 0.5
    assert s.unparseable == ["s2"]


def test_parse_two_boxes_dequantises_to_pixels():
    # 0-1000 scale on a 200x100 frame: x * 0.2 px, y * 0.1 px
    boxes = parse_two_boxes("At <10>: [100, 200, 500, 1000]. At <20>: [0, 0, 1000, 500].", 200, 100)
    assert boxes == [pytest.approx((20.0, 20.0, 100.0, 100.0)), pytest.approx((0.0, 0.0, 200.0, 50.0))]
    assert parse_two_boxes("somewhere", 200, 100) == []


def test_charades_sta_reader_and_scoring(tmp_path):
    p = tmp_path / "charades_sta_test.txt"
    p.write_text("3MSZA 24.3 30.4##person turn a light on.\n3MSZA 0.0 6.0##person opens the door.\n\n"
                 "AB12C 1 3##a person is sitting.\n", encoding="utf-8")
    qs = read_charades_sta(p)
    assert [(q.video_id, q.start_s, q.end_s, q.sentence) for q in qs] == [
        ("3MSZA", 24.3, 30.4, "person turn a light on."), ("3MSZA", 0.0, 6.0, "person opens the door."),
        ("AB12C", 1.0, 3.0, "a person is sitting.")]
    assert len({q.query_id for q in qs}) == 3  # two sentences of one video stay apart
    gt = charades_gt(qs)
    ids = [q.query_id for q in qs]
    s = score_temporal(gt, {ids[0]: (24.3, 30.4), ids[1]: (3.0, 6.0)})  # IoU 1, 0.5, missing
    assert s.recall["R@0.5"] == pytest.approx(2 / 3, abs=EXACT) and s.unparseable == [ids[2]]
    bad = tmp_path / "bad.txt"
    bad.write_text("3MSZA 24.3##no end\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 1"):
        read_charades_sta(bad)


def test_caption_metrics_use_the_coco_scorer_without_java():
    """BLEU / ROUGE-L / CIDEr come from pycocoevalcap's own scorers (checked against a direct call);
    a perfect caption scores BLEU-1 = ROUGE-L = 1 and an empty one is a listed miss."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge

    refs = {"a": ["the red car moves to the left"], "b": ["a dog jumps over the fence"]}
    preds = {"a": "the red car moves to the left", "b": "a cat jumps over the wall"}
    s = score_captions(refs, preds, use_java=False)
    assert s.metrics["BLEU-1"] == pytest.approx(Bleu(4).compute_score(
        {k: v for k, v in refs.items()}, {k: [v] for k, v in preds.items()}, verbose=0)[0][0], abs=1e-9)
    assert s.metrics["ROUGE-L"] == pytest.approx(Rouge().compute_score(refs, {k: [v] for k, v in preds.items()})[0])
    assert "METEOR" in s.skipped and "SPICE" in s.skipped and s.unparseable == []
    perfect = score_captions({"a": refs["a"]}, {"a": refs["a"][0]}, use_java=False)
    assert perfect.metrics["BLEU-1"] == pytest.approx(1.0) and perfect.metrics["ROUGE-L"] == pytest.approx(1.0)
    empty = score_captions(refs, {"a": preds["a"]}, use_java=False)
    assert empty.unparseable == ["b"] and empty.metrics["ROUGE-L"] < s.metrics["ROUGE-L"]


def test_caption_metrics_with_java_add_meteor_and_the_ptb_tokenizer():
    from stages.evaluation.imove_it import java_works

    if not java_works():
        pytest.skip("no working Java runtime: METEOR and the PTB tokenizer are skipped (and reported as skipped)")
    refs = {"a": ["The red car moves to the left."], "b": ["A dog jumps over the fence."]}
    s = score_captions(refs, {"a": "The red car moves to the left.", "b": None}, use_java=True)  # one jar run
    assert "METEOR" in s.metrics and "METEOR" not in s.skipped and s.unparseable == ["b"]
    # one perfect and one empty caption: METEOR (mean over captions) lands between the two
    assert 0.3 < s.metrics["METEOR"] < 0.7
