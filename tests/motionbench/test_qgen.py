"""qgen: the validator (planted invalid set), the category map, the prompt file, repair re-asks, error rows."""
from __future__ import annotations

import json

import pytest

from experts.llm import LlmRequest
from schemas.descriptions import Description
from stages.motionbench.qgen import (
    GeneratedQuestions,
    InvalidQuestion,
    category_for,
    load_prompt,
    parse_reply,
    render_prompt,
    rows_for_reply,
    validate_question,
)
from stages.shared.motionbench_questions import CATEGORIES, question_id
from tests._mb_doubles import question_json, reply, scripted_llm

OPTS = ["He waves his left hand", "He claps twice", "He turns around", "He sits down"]

VALID = [
    question_json("What does the man do after standing up?", OPTS, "B", "1.1", 3),
    question_json("How many times does the dog jump?", ["Once", "Twice", "Three times", "Four times"], "C", "3.1", 2),
    question_json("Which way does the camera pan?", ["Left", "Right", "Up", "Down"], "Left", "4.1", 1),
    question_json("Where does the ball end up?", ["(A) On the table", "(B) Under the chair", "(C) In the box",
                                                   "(D) On the floor"], "(D)", "2.1", 1),
]

PLANTED_INVALID = {
    "three options": question_json("What does he do?", OPTS[:3], "A"),
    "five options": question_json("What does he do?", OPTS + ["He jumps"], "A"),
    "duplicated options": question_json("What does he do?", [OPTS[0], OPTS[1], OPTS[0], OPTS[3]], "B"),
    "duplicated modulo case/punctuation": question_json("What does he do?", ["He waves.", "he waves", "He runs", "He sits"], "C"),
    "empty option": question_json("What does he do?", [OPTS[0], " ", OPTS[2], OPTS[3]], "A"),
    "answer letter out of range": question_json("What does he do?", OPTS, "E"),
    "answer text not an option": question_json("What does he do?", OPTS, "He dances"),
    "leak in question": question_json("Based on the description, what does he do?", OPTS, "A"),
    "leak in option": question_json("What does he do?", [OPTS[0], "As described, he claps", OPTS[2], OPTS[3]], "A"),
    "leak: caption": question_json("According to the caption, what happens first?", OPTS, "A"),
    "leak in explanation": question_json("What does he do?", OPTS, "A", explanation="the text says he waves"),
    "unknown content dimension": question_json("What does he do?", OPTS, "A", content="6.1"),
    "unknown logic dimension": question_json("What does he do?", OPTS, "A", logic=5),
    "empty question": question_json("   ", OPTS, "A"),
    "missing answer": {k: v for k, v in question_json("What does he do?", OPTS, "A").items() if k != "answer"},
}

MALFORMED_REPLIES = [
    "Sure! Here are the questions: question 1 ...",
    '{"questions": [{"question": "What does he do?", "options": ["a", "b"',
    '{"items": []}',
    '{"questions": []}',
    "",
]


def test_valid_questions_pass_and_are_normalised():
    for item in VALID:
        q = validate_question(item)
        assert len(q.options) == 4 and q.answer in "ABCD"
    assert validate_question(VALID[2]).answer == "A"  # answer given as option text
    q = validate_question(VALID[3])
    assert q.options[0] == "On the table" and q.answer == "D"  # letter prefixes stripped


# The rule each planted case must fail on: a case rejected through another rule (by accident) fails its test.
EXPECTED_REASON = {
    "three options": r"has 3 options; it needs exactly 4",
    "five options": r"has 5 options; it needs exactly 4",
    "duplicated options": r"repeats an option",
    "duplicated modulo case/punctuation": r"repeats an option",
    "empty option": r"has an empty option",
    "answer letter out of range": r"answer 'E' is not one of the options' letters",
    "answer text not an option": r"answer 'He dances' is not one of the options' letters",
    "leak in question": r"the question says 'description'",
    "leak in option": r"the option B says 'As described'",
    "leak: caption": r"the question says 'caption'",
    "leak in explanation": r"the explanation says 'the text'",
    "unknown content dimension": r"content_dimensions \['6\.1'\] must be codes",
    "unknown logic dimension": r"logic_dimension 5 must be one of",
    "empty question": r"the question text is empty",
    "missing answer": r"Field required",
}


def test_planted_cases_differ_from_a_valid_question_in_one_rule():
    validate_question(question_json("What does he do?", OPTS, "A"))  # the base every planted case changes
    assert set(EXPECTED_REASON) == set(PLANTED_INVALID)


@pytest.mark.parametrize("name", sorted(PLANTED_INVALID))
def test_planted_invalid_questions_are_rejected(name):
    with pytest.raises(ValueError, match=EXPECTED_REASON[name]):
        validate_question(PLANTED_INVALID[name])


def test_whole_planted_set_rejected_100_percent():
    rejected = 0
    for item in PLANTED_INVALID.values():
        try:
            validate_question(item)
        except ValueError:
            rejected += 1
    for text in MALFORMED_REPLIES:
        with pytest.raises(ValueError):
            parse_reply(text)
        rejected += 1
    assert rejected == len(PLANTED_INVALID) + len(MALFORMED_REPLIES)


def test_duplicate_question_in_reply_is_rejected():
    dup = question_json("What does the man do after standing up?", OPTS, "A", "1.1", 3)
    with pytest.raises(ValueError, match="same question"):
        GeneratedQuestions.model_validate({"questions": [VALID[0], dup]})
    parsed = parse_reply(reply(VALID[0], {**dup, "question": "what does the man do after standing up"}))
    assert not isinstance(parsed[0], InvalidQuestion) and isinstance(parsed[1], InvalidQuestion)
    assert "duplicate" in parsed[1].reason


def test_mixed_reply_keeps_valid_and_names_invalid():
    parsed = parse_reply(reply(VALID[0], PLANTED_INVALID["three options"], VALID[1]))
    kinds = [type(p).__name__ for p in parsed]
    assert kinds == ["GeneratedQuestion", "InvalidQuestion", "GeneratedQuestion"]
    assert "4" in parsed[1].reason


def test_bare_list_reply_accepted():
    parsed = parse_reply(json.dumps(VALID[:2]))
    assert len(parsed) == 2 and all(not isinstance(p, InvalidQuestion) for p in parsed)


@pytest.mark.parametrize("content,logic,expected", [
    (["4.1"], 3, "CM"), (["1.1", "4.1"], 2, "CM"), (["1.1"], 2, "RC"), (["3.1"], 3, "AO"), (["1.4"], 1, "LM"),
    (["2.1"], 1, "LM"), (["3.2"], 4, "LM"), (["2.2"], 1, "MO"), (["5.2"], 4, "MO"), (["1.1"], 1, "MR"),
    (["1.2"], 4, "MR"), (["1.3"], 1, "MR"), (["3.1"], 1, "MR"),
])
def test_category_map(content, logic, expected):
    assert category_for(content, logic) == expected
    assert expected in CATEGORIES


def test_prompt_file_is_versioned_and_renders():
    template, version = load_prompt("qgen_prompt.v1.txt")
    assert version.startswith("qgen_prompt.v1@") and len(version.split("@")[1]) == 8
    text = render_prompt(template, "A man stands by a door.", "The man waves, then sits down.", 6)
    assert "The man waves, then sits down." in text and "about 6 questions" in text
    assert "#" not in text.splitlines()[0]
    for must in ("Content Dimension".upper(), "QUESTION LOGIC DIMENSION", "4.1 camera movement", "Order ambiguity"):
        assert must in text


def _desc(clip_id="c1"):
    return Description(clip_id=clip_id, video_id="v1", video_path="/v.mp4", start_s=0.0, end_s=3.0,
                       dynamic_description="The man waves, then sits down.", source="human")


def test_repair_reask_then_success_through_generate_json():
    def answer(messages, attempt):
        if attempt == 0:
            return reply(PLANTED_INVALID["duplicated options"], VALID[0])
        assert "could not be used" in messages[-1]["content"]  # the re-ask carries the reason
        return reply(VALID[0], VALID[1])

    llm, backend = scripted_llm(answer)
    [res] = llm.generate_json([LlmRequest(prompt="p")], GeneratedQuestions, repair_retries=2)
    assert res.error is None and res.attempts == 2
    rows = rows_for_reply(_desc(), res.value, res.raw, res.error, res.attempts, "v")
    assert [r.status for r in rows] == ["ok", "ok"]
    assert rows[0].question_id == question_id("c1", VALID[0]["question"])
    assert rows[1].category == "RC" and rows[0].category == "AO"


def test_still_invalid_after_repairs_becomes_error_rows_with_reasons():
    llm, backend = scripted_llm(lambda m, a: reply(VALID[0], PLANTED_INVALID["leak in question"]))
    [res] = llm.generate_json([LlmRequest(prompt="p")], GeneratedQuestions, repair_retries=1)
    assert res.value is None and res.attempts == 2
    rows = rows_for_reply(_desc(), res.value, res.raw, res.error, res.attempts, "v")
    assert [r.status for r in rows] == ["ok", "error"]
    assert "description" in rows[1].error and "question 2" in rows[1].error and "c1" in rows[1].error

    llm, _ = scripted_llm(lambda m, a: "no JSON here")
    [res] = llm.generate_json([LlmRequest(prompt="p")], GeneratedQuestions, repair_retries=2)
    rows = rows_for_reply(_desc(), res.value, res.raw, res.error, res.attempts, "v")
    assert len(rows) == 1 and rows[0].status == "error" and "not valid JSON" in rows[0].error
    assert "3 attempt" in rows[0].error


def test_question_id_is_stable_under_formatting():
    assert question_id("c1", "What does he do?") == question_id("c1", "what does he do")
    assert question_id("c1", "What does he do?") != question_id("c2", "What does he do?")
