"""MotionBench scoring: letter extraction, hand-computed accuracies (multi-question videos, NA), the CLI."""
from __future__ import annotations

import json

import pytest

from stages.evaluation.motionbench import meta_questions, read_meta, score
from stages.shared.motionbench_format import CATEGORY_NAMES, extract_letter, format_question, parse_question, prompt_for


@pytest.mark.parametrize("reply,letter", [
    ("B", "B"), ("b", "B"), ("(B) He waves", "B"), ("B.", "B"), ("B) He waves", "B"), ("B. He waves", "B"),
    ("Answer: B", "B"), ("The answer is B.", "B"), ("answer: c", "C"), ("The correct option is (D).", "D"),
    ("A", "A"), ("(A)", "A"), ("A. The man", "A"), ("The answer is A.", "A"), ("  D  ", "D"),
    ("I think it is C", "C"),
])
def test_letters_extracted(reply, letter):
    assert extract_letter(reply) == letter


@pytest.mark.parametrize("reply", [
    "", None, "I cannot tell from the video.", "A or B", "B and C", "a man walks in", "A man walks in",
    "Answer: B, or maybe the answer is C", "E", "(E) none",
])
def test_no_single_option_means_unanswered(reply):
    assert extract_letter(reply) is None


def test_format_and_parse_question_round_trip():
    text = format_question("What  does he do?", ["Waves", "Claps", "Sits", "Runs"])
    assert text == "What does he do?\nA. Waves\nB. Claps\nC. Sits\nD. Runs"
    assert parse_question(text) == ("What does he do?", ["Waves", "Claps", "Sits", "Runs"])
    assert prompt_for(text).endswith("Answer with the option's letter from the given choices directly.")
    with pytest.raises(ValueError):
        parse_question("What?\nA. x\nB. y\nC. z")


def _q(stem):
    return format_question(stem, ["w", "x", "y", "z"])


# Three videos; v1 has three questions (two MR, one AO: qa-level question_type), v2 has two with the
# video-level question_type only, v3 is a test video with NA answers.
META = [
    {"key": "v1", "video_path": "v1.mp4", "video_type": "real", "question_type": "Motion Recognition",
     "qa": [{"uid": "1", "question": _q("q1"), "answer": "A", "question_type": "Motion Recognition"},
            {"uid": "2", "question": _q("q2"), "answer": "B", "question_type": "Motion Recognition"},
            {"uid": "3", "question": _q("q3"), "answer": "C", "question_type": "Action Order"}]},
    {"key": "v2", "video_path": "v2.mp4", "video_type": "real", "question_type": "Camera Motion",
     "qa": [{"uid": "4", "question": _q("q4"), "answer": "D"},
            {"uid": "5", "question": _q("q5"), "answer": "A"}]},
    {"key": "v3", "video_path": "v3.mp4", "video_type": "virtual", "question_type": ["Repetition Count"],
     "qa": [{"uid": "6", "question": _q("q6"), "answer": "NA"},
            {"uid": "7", "question": _q("q7"), "answer": "NA"}]},
]
RESPONSES = {"1": "A", "2": "The answer is C.", "3": "(C) y", "4": "d", "5": "I am not sure", "6": "B", "7": "C"}


def test_hand_computed_scores():
    qs = meta_questions(META)
    s = score(qs, RESPONSES)
    # scored: uids 1-5; correct: 1, 3, 4 -> 3/5; unanswered: uid 5; NA: 6, 7
    assert (s.scored, s.correct, s.unanswered, s.not_scored, s.missing) == (5, 3, 1, 2, 0)
    assert s.overall == pytest.approx(0.6)
    assert s.per_category["Motion Recognition"] == pytest.approx(0.5)  # 1 right of uids 1, 2
    assert s.per_category["Action Order"] == pytest.approx(1.0)
    assert s.per_category["Camera Motion"] == pytest.approx(0.5)
    assert s.per_category["Repetition Count"] is None
    assert set(s.per_category) >= set(CATEGORY_NAMES.values())
    # the input was not mutated (the released scorer wraps question_type once per qa)
    assert META[0]["question_type"] == "Motion Recognition"


def test_answer_key_scores_na_questions_and_missing_replies_count_wrong():
    s = score(meta_questions(META), {k: v for k, v in RESPONSES.items() if k != "4"}, {"6": "B", "7": "D"})
    # scored 7: correct 1, 3, 6 -> 3/7; unanswered: 4 (missing) and 5
    assert (s.scored, s.correct, s.unanswered, s.missing, s.not_scored) == (7, 3, 2, 1, 0)
    assert s.per_category["Repetition Count"] == pytest.approx(0.5)
    assert s.overall == pytest.approx(3 / 7)


def test_duplicate_uid_rejected():
    bad = [META[0], {**META[1], "qa": [{"uid": "1", "question": _q("x"), "answer": "A"}]}]
    with pytest.raises(ValueError, match="twice"):
        meta_questions(bad)


def test_eval_score_cli(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    meta = tmp_path / "video_info.meta.jsonl"
    meta.write_text("".join(json.dumps(v) + "\n" for v in META))
    resp = tmp_path / "resp.json"
    resp.write_text(json.dumps(RESPONSES))
    key = tmp_path / "key.json"
    key.write_text(json.dumps({"6": "B", "7": "D"}))
    assert len(read_meta(meta)) == 3
    r = CliRunner().invoke(app, ["eval", "score", "--meta", str(meta), "--responses", str(resp), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["overall"] == pytest.approx(0.6) and out["scored"] == 5 and out["unanswered"] == 1
    assert out["per_category"]["Motion Recognition"] == pytest.approx(0.5)
    r = CliRunner().invoke(app, ["eval", "score", "--meta", str(meta), "--responses", str(resp), "--answers",
                                 str(key), "--json"])
    assert json.loads(r.stdout)["scored"] == 7
    r = CliRunner().invoke(app, ["eval", "score", "--meta", str(meta), "--responses", str(resp)])
    assert r.exit_code == 0 and "Motion Recognition" in r.stdout
