"""ffilter: first frames prefetched and clips judged a model batch at a time give the same rows as one at a time."""
from __future__ import annotations

import numpy as np

from experts.vlm import VlmSpec
from schemas.questions import Question
from stages.motionbench import ffilter
from tests._mb_doubles import ScriptedVlm

LETTERS = "ABCD"


def _questions() -> list[Question]:
    qs = []
    for c in range(5):
        for k in range(2):
            qs.append(Question(question_id=f"q{c}{k}", clip_id=f"c{c}", video_id="v", video_path=f"/v{c}.mp4",
                               start_s=0.0, end_s=1.0, source="generated", question=f"which letter? ({c}, {k})",
                               options=["a", "b", "c", "d"], answer=LETTERS[(c + k) % 4], category="MR"))
    return qs


def _frame_of(q: Question) -> np.ndarray:
    if q.clip_id == "c2":
        raise OSError("clip c2 is gone")
    return np.full((8, 8, 3), int(q.clip_id[1:]), np.uint8)


def _judge(offset: int, sizes: list[int]) -> ScriptedVlm:
    """Answers from the one image it sees: the letter of the frame's pixel value (+ offset)."""
    def answer(req):
        (img,) = req.images
        return LETTERS[(int(img[0, 0, 0]) + offset) % 4]

    vlm = ScriptedVlm(answer)
    generate = vlm.generate

    def counted(requests):
        sizes.append(len(requests))
        return generate(requests)

    vlm.generate = counted
    return vlm


def test_batched_prefetched_judging_matches_one_clip_at_a_time():
    """Batch 1 with inline decoding versus batches of 3 questions with frames decoded 2 clips ahead; clip c2
    (in the middle) cannot be read. The judges answer from each request alone, so rows must be equal."""
    def run(batch_size, depth):
        sizes: list[int] = []
        cfg = ffilter.FfilterConfig(judges=tuple(ffilter.Judge(name=n, vlm=VlmSpec(model_id=n, batch_size=batch_size))
                                                 for n in ("j1", "j2")), prefetch_depth=depth)
        judges = {"j1": _judge(0, sizes), "j2": _judge(1, sizes)}
        return ffilter.filter_questions(_questions(), judges, cfg, _frame_of), sizes

    one, sizes1 = run(1, 0)
    three, sizes3 = run(3, 2)
    assert one == three
    assert max(sizes1) == 2 and max(sizes3) == 4  # whole clips (2 questions each) until the batch is full
    qs = _questions()
    assert [r.question_id for r in three if r.row_kind == "decision"] == [q.question_id for q in qs]
    errors = [r for r in three if r.status == "error"]
    assert [r.question_id for r in errors] == ["q20", "q21"] and all("clip c2 is gone" in r.error for r in errors)
    # every other question has both judges' verdicts: j1 is right exactly when (c + k) % 4 == c % 4, i.e. k == 0
    for q in qs:
        if q.clip_id == "c2":
            continue
        mine = [r for r in three if r.question_id == q.question_id]
        assert [r.row_kind for r in mine] == ["verdict", "verdict", "decision"]
        assert mine[0].correct == (q.question_id.endswith("0"))
    assert ffilter.FfilterConfig(prefetch_depth=0).config_hash() == ffilter.FfilterConfig().config_hash()
