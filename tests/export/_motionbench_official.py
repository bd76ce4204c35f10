"""THUDM/MotionBench's official scorer as DOCUMENTED in shared/design/CONSUMERS.md section 1 (the package is
not on the registry, so its code cannot be run here). Written from that description, not from its source:

* ``construct_answer`` turns each raw reply into one character with ``polish_answer``: keep the text before
  the first ``)``, the text after ``(`` if there is one, then the first space-separated word, then its first
  character ("" for an empty reply);
* ``compute_accuracy`` walks the meta lines in order; for each qa whose uid is in the answer map, the line's
  ``question_type`` is wrapped in one more list (kept on the line object); an answered ``NA`` qa is then
  skipped and NOT counted in ``total_qa_num``; otherwise every element of the line's ``question_type`` is a
  category (a dict key, so a list element raises ``TypeError: unhashable type: 'list'``) whose total grows by
  one and whose right count grows when the letter equals the answer by exact string equality; every qa not
  skipped adds one to ``total_qa_num``. ``acc`` = right / total_qa_num, ``answered_acc`` = right / answered
  (ZeroDivisionError when either is 0); per-category accuracy = right / total of that category.
"""
from __future__ import annotations

import copy


def polish_answer(reply: str | None) -> str:
    text = (reply or "").strip()
    text = text.split(")")[0].strip()
    if "(" in text:
        text = text.split("(", 1)[1].strip()
    word = text.split(" ")[0]
    return word[:1]


def construct_answer(replies: dict[str, str | None]) -> dict[str, str]:
    return {str(uid): polish_answer(r) for uid, r in replies.items()}


def compute_accuracy(answers: dict[str, str], meta_lines: list[dict]) -> dict:
    lines = copy.deepcopy(meta_lines)
    total = answered = right = 0
    cat_total: dict = {}
    cat_right: dict = {}
    for line in lines:
        for qa in line["qa"]:
            uid = str(qa["uid"])
            if uid in answers:
                answered += 1
                given = answers[uid]
                line["question_type"] = [line["question_type"]]
                if qa["answer"] == "NA":
                    continue
                for cat in line["question_type"]:
                    cat_total[cat] = cat_total.get(cat, 0) + 1  # a list here: TypeError, as in the release
                    if given == qa["answer"]:
                        cat_right[cat] = cat_right.get(cat, 0) + 1
                if given == qa["answer"]:
                    right += 1
            total += 1
    out = {cat: cat_right.get(cat, 0) / n for cat, n in cat_total.items()}
    out.update(acc=right / total, answered_acc=right / answered, total_qa_num=total, total_answered_num=answered,
               right_num=right)
    return out
