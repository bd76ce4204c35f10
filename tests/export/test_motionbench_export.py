"""``motionforge export motionbench``: the release folder read by the tools people score MotionBench with.

* lmms-eval: its REAL ``motionbench`` task code (lmms-eval 0.7.3, ``lmms_eval/tasks/motionbench/utils.py``:
  process_docs, doc_to_visual, doc_to_text, process_results and the aggregations) runs in a subprocess of
  .venv-consumers (scripts/setup_consumers.sh; it cannot share our venv's pins).
* THUDM/MotionBench's ``compute_accuracy``: not on the registry, so it is checked against its DOCUMENTED
  behaviour (shared/design/CONSUMERS.md section 1), re-implemented in tests/export/_motionbench_official.py.

Both must read the export without error and give, category by category, the accuracy ``motionforge eval
score`` gives on the same replies.
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from schemas.questions import Question
from schemas.reviews import Review
from stages.evaluation.motionbench import meta_questions, read_meta, resolve_video, score
from stages.export.motionbench import ANSWER_KEY_FILE, META_FILE, export_release, meta_lines
from stages.motionbench.finalize import FinalizeConfig, build_benchmark
from tests._video_fixtures import make_testsrc, require_ffmpeg
from tests.export import _motionbench_official as official

REPO = Path(__file__).resolve().parents[2]
CONSUMERS_PY = REPO / ".venv-consumers" / "bin" / "python"
CATS = ("MR", "LM", "AO", "RC", "MO", "CM")
FULL = {"MR": "Motion Recognition", "LM": "Location-related Motion", "AO": "Action Order",
        "RC": "Repetition Count", "MO": "Motion-related Objects", "CM": "Camera Motion"}
FPS = 25
# (video, start_s, end_s): the first span starts on a keyframe (stream copy), the second does not (re-encode)
SPANS = [("v0", 1.0, 3.0), ("v0", 3.48, 5.0), ("v1", 0.52, 2.52), ("v2", 2.0, 4.0), ("v3", 1.2, 3.2)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    require_ffmpeg()
    d = tmp_path_factory.mktemp("mbsrc")
    return {v: make_testsrc(d / f"{v}.mp4", width=96, height=64, rate=FPS, duration_s=6.0, gop=FPS)
            for v in ("v0", "v1", "v2", "v3", "synth")}


def _rows(sources, per_clip=7):
    reviewed, i = [], 0
    for c, (vid, s, e) in enumerate(SPANS):
        for _ in range(per_clip):  # several categories per clip: the case the old export lost
            opts = [f"right {i}", f"wrong {i} a", f"wrong {i} b", f"wrong {i} c"]
            reviewed.append(Review(question_id=f"q{i:03d}", clip_id=f"clip{c}", video_id=vid,
                                   video_path=str(sources[vid]), start_s=s, end_s=e, question=f"What happens {i}?",
                                   options=opts, answer="A", category=CATS[i % 6], decision="accept",
                                   review_mode="required"))
            i += 1
    synthetic = [Question(question_id=f"s{k}", clip_id="synthclip", video_id="synth",
                          video_path=str(sources["synth"]), start_s=0.0, end_s=6.0, source="synthetic",
                          question=f"How many times does it jump {k}?", options=["1", "2", "3", "4"], answer="C",
                          category="RC", kind="repetition_count") for k in range(3)]
    return build_benchmark(reviewed, synthetic, FinalizeConfig(seed=3))


@pytest.fixture(scope="module")
def release(sources, tmp_path_factory):
    rows = _rows(sources)
    out = tmp_path_factory.mktemp("release") / "motionbench"
    res = export_release(rows, out)
    return rows, out, res


def _replies(rows, flip_every=5):
    """Deterministic replies: the right letter, except every ``flip_every``-th question (in uid order) gets the
    next letter; written as plain letters, the one form every scorer reads the same way."""
    out = {}
    for n, r in enumerate(sorted(rows, key=lambda r: r.question_id)):
        out[r.question_id] = r.answer if n % flip_every else "ABCD"[("ABCD".index(r.answer) + 1) % 4]
    return out


def _frames(path):
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="gray").astype(np.float32) for f in c.decode(video=0)]


def test_one_question_per_line_exact_category_relative_clip(release):
    rows, out, res = release
    lines = [json.loads(l) for l in (out / META_FILE).read_text().splitlines()]
    assert len(lines) == len(rows) == res.questions == 38 and res.dropped == {}
    by_uid = {r.question_id: r for r in rows}
    key = json.loads((out / ANSWER_KEY_FILE).read_text())
    for ln in lines:
        assert set(ln) == {"key", "video_path", "video_type", "question_type", "qa"}
        assert len(ln["qa"]) == 1 and set(ln["qa"][0]) == {"uid", "question", "answer"}
        r = by_uid[ln["qa"][0]["uid"]]
        assert ln["question_type"] == FULL[r.category] and isinstance(ln["question_type"], str)
        assert ln["key"] == r.key and ln["video_path"] == f"{r.key}.mp4"
        assert not os.path.isabs(ln["video_path"]) and (out / "videos" / ln["video_path"]).is_file()
        assert ln["qa"][0]["answer"] == ("NA" if r.split == "test" else r.answer)
        # the released question text: the stem, then exactly the lines "A. ..." to "D. ..." in order
        stem, *opts = ln["qa"][0]["question"].split("\n")
        assert stem == r.question and opts == [f"{l}. {o}" for l, o in zip("ABCD", r.options)]
        assert ln["video_type"] == ("virtual" if r.source == "synthetic" else "real")
        assert (key.get(r.question_id) == r.answer) if r.split == "test" else r.question_id not in key
    assert {r.split for r in rows} == {"dev", "test"}
    # every category is present in more than one clip, and clips hold several categories
    per_clip = collections.defaultdict(set)
    for ln in lines:
        per_clip[ln["key"]].add(ln["question_type"])
    assert max(len(v) for v in per_clip.values()) >= 5
    assert sorted(p.name for p in (out / "videos").iterdir()) == sorted(f"{k}.mp4" for k in per_clip)


@pytest.mark.parametrize("clip", range(len(SPANS)))
def test_clip_files_start_at_the_clip(release, sources, clip):
    """t=0 of each cut file is the clip's first frame: its frames match the source frames of the span, one
    for one (testsrc draws a different picture on every frame, so an off-by-one start is caught)."""
    rows, out, _ = release
    vid, s, e = SPANS[clip]
    got = _frames(out / "videos" / f"clip{clip}.mp4")
    src = _frames(sources[vid])
    first = round(s * FPS)
    assert len(got) == round((e - s) * FPS)
    for k in (0, len(got) - 1):
        diffs = [float(np.abs(got[k] - src[j]).mean()) for j in range(len(src))]
        # re-encoding (crf 18) changes pixel values a little; the matching source frame is still the closest
        assert int(np.argmin(diffs)) == first + k, (k, diffs[first + k - 1: first + k + 2])


def test_synthetic_whole_video_is_cut_to_its_span(release, sources):
    rows, out, _ = release
    assert len(_frames(out / "videos" / "synthclip.mp4")) == 6 * FPS


def test_official_scorer_documented_behaviour_matches_ours(release):
    rows, out, _ = release
    lines = [json.loads(l) for l in (out / META_FILE).read_text().splitlines()]
    key = json.loads((out / ANSWER_KEY_FILE).read_text())
    replies = _replies(rows)
    answers = official.construct_answer(replies)
    # as released (test answers NA): the scorer scores the dev questions
    theirs = official.compute_accuracy(answers, lines)
    ours = score(meta_questions(read_meta(out / META_FILE)), replies)
    # the scorer holding the key: NA replaced by the letters of test_answers.json
    full = [dict(ln, qa=[dict(q, answer=key.get(q["uid"], q["answer"])) for q in ln["qa"]]) for ln in lines]
    theirs_full = official.compute_accuracy(answers, full)
    ours_full = score(meta_questions(read_meta(out / META_FILE)), replies, key)
    for t, o, n in ((theirs, ours, sum(r.split == "dev" for r in rows)), (theirs_full, ours_full, len(rows))):
        cats = {c: v for c, v in o.per_category.items() if v is not None}
        assert len(cats) == 6 or n < len(rows)
        for c, acc in cats.items():
            # the same counts divided the same way: equal to float rounding of one division
            assert t[c] == pytest.approx(acc, abs=1e-12), c
        assert set(t) - {"acc", "answered_acc", "total_qa_num", "total_answered_num", "right_num"} == set(cats)
        # every question answered: the scorer's acc (right / qa not answered NA) is our overall accuracy
        assert t["right_num"] == o.correct and t["acc"] == pytest.approx(o.overall, abs=1e-12)
        assert t["total_answered_num"] == len(rows)  # answered NA questions count here (not in total_qa_num)
    assert theirs_full["total_qa_num"] == len(rows) and 0 < theirs_full["acc"] < 1


def test_the_documented_scorer_model_crashes_on_the_old_line_layout(release):
    """The re-implemented scorer reproduces the release's crash on a line holding two answered questions (the
    old export's layout), so the test above would have caught it."""
    rows, out, _ = release
    lines = [json.loads(l) for l in (out / META_FILE).read_text().splitlines()]
    dev = [ln for ln in lines if ln["qa"][0]["answer"] != "NA"]
    merged = dict(dev[0], qa=dev[0]["qa"] + dev[1]["qa"])
    answers = {q["uid"]: "A" for q in merged["qa"]}
    with pytest.raises(TypeError, match="unhashable"):
        official.compute_accuracy(answers, [merged])
    assert official.polish_answer("The answer is C.") == "T" and official.polish_answer("(C) x") == "C"


def _consumers_python():
    if not CONSUMERS_PY.exists():
        pytest.fail(f"{CONSUMERS_PY} missing: run scripts/setup_consumers.sh (scripts/setup.sh calls it)")
    return str(CONSUMERS_PY)


def run_lmms_eval(meta: Path, replies: dict, video_dir: Path, tmp: Path) -> dict:
    rp = tmp / "replies_lmms.json"
    rp.write_text(json.dumps(replies))
    env = dict(os.environ, HF_DATASETS_CACHE=str(tmp / "hf_cache"), HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)  # only lmms-eval and the libraries, not our code
    proc = subprocess.run([_consumers_python(), str(Path(__file__).with_name("_lmms_eval_motionbench.py")),
                           str(meta), str(rp), str(video_dir)], capture_output=True, text=True, env=env,
                          timeout=600, cwd=str(tmp))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_lmms_eval_task_code_reads_every_category_and_matches_ours(release, tmp_path):
    rows, out, _ = release
    key = json.loads((out / ANSWER_KEY_FILE).read_text())
    # a copy of the folder elsewhere, sources gone from view: the clips travel with it
    moved = tmp_path / "elsewhere" / "mb"
    shutil.copytree(out, moved)
    meta_full = tmp_path / "meta_with_answers.jsonl"  # what a scorer holding the test key reads
    lines = [json.loads(l) for l in (moved / META_FILE).read_text().splitlines()]
    meta_full.write_text("".join(json.dumps(dict(ln, qa=[dict(q, answer=key.get(q["uid"], q["answer"]))
                                                         for q in ln["qa"]])) + "\n" for ln in lines))
    replies = _replies(rows)
    for meta, answer_key, n in ((moved / META_FILE, None, sum(r.split == "dev" for r in rows)),
                                (meta_full, None, len(rows))):
        got = run_lmms_eval(meta, replies, moved / "videos", tmp_path)
        ours = score(meta_questions(read_meta(meta)), replies, answer_key)
        assert got["lmms_eval_version"] == "0.7.3"
        assert got["docs"] == n == ours.scored and got["videos_found"] == n
        assert all(Path(d["video"]).parent == moved / "videos" for d in got["per_doc"].values())
        assert got["overall"] == pytest.approx(ours.overall, abs=1e-12)
        # per category: lmms-eval logs 3 decimals; its per-doc rows give the exact figure
        exact = collections.defaultdict(list)
        for uid, d in got["per_doc"].items():
            exact[d["question_type"]].append(d["score"])
        cats = {c: v for c, v in ours.per_category.items() if v is not None}
        assert set(got["per_category_logged"]) == set(exact) == set(cats)
        for c, acc in cats.items():
            assert sum(exact[c]) / len(exact[c]) == pytest.approx(acc, abs=1e-12), c
            assert got["per_category_logged"][c]["acc"] == pytest.approx(acc, abs=0.0005 + 1e-9), c
            assert got["per_category_logged"][c]["n"] == ours.per_category_counts[c][1]
    assert len(cats) == 6


def test_resolve_from_copied_folder(release, tmp_path):
    rows, out, _ = release
    moved = tmp_path / "copy"
    shutil.copytree(out, moved)
    for q in meta_questions(read_meta(moved / META_FILE)):
        assert Path(resolve_video(q.video_path, moved / "videos")).parent == moved / "videos"
        assert q.start_s is None and q.end_s is None  # the file is the clip


def test_bad_clip_is_reported_and_its_questions_left_out(sources, tmp_path):
    rows = _rows(sources)
    bad_key = rows[0].key
    rows = [r if r.key != bad_key else r.__class__(**{**r.__dict__, "video_path": str(tmp_path / "gone.mp4")})
            for r in rows]
    res = export_release(rows, tmp_path / "out")
    n_bad = sum(r.key == bad_key for r in rows)
    assert len(res.dropped) == n_bad > 0 and res.questions == len(rows) - n_bad
    err = json.loads((tmp_path / "out" / "export_errors.json").read_text())
    assert f"{bad_key}.mp4" in err["clips"] and "gone.mp4" in err["clips"][f"{bad_key}.mp4"]
    assert sorted(err["questions_left_out"]) == sorted(res.dropped)
    uids = {json.loads(l)["qa"][0]["uid"] for l in (tmp_path / "out" / META_FILE).read_text().splitlines()}
    assert uids.isdisjoint(res.dropped)


def test_meta_lines_skip_rows_not_ok(sources):
    import dataclasses

    rows = _rows(sources)
    rows[0] = dataclasses.replace(rows[0], status="error", error="x")
    lines, _ = meta_lines(rows)
    assert len(lines) == len(rows) - 1


def test_cli_export_motionbench(sources, tmp_path):
    from storage.root import OutputRoot
    from tests._cli import invoke
    from tests._stage_tables import write_stage

    rows = _rows(sources)
    root = OutputRoot(tmp_path / "root")
    write_stage(root, "finalize", 0, rows)
    res = invoke("export", "motionbench", "--out", str(tmp_path / "root"), "--to", str(tmp_path / "mb"))
    assert f"{len(rows)} questions over {len(SPANS) + 1} clips" in " ".join(res.output.split())
    assert len((tmp_path / "mb" / META_FILE).read_text().splitlines()) == len(rows)
    assert len(list((tmp_path / "mb" / "videos").glob("*.mp4"))) == len(SPANS) + 1


def test_re_export_replaces_the_folder_content(sources, tmp_path):
    rows = _rows(sources)
    export_release(rows, tmp_path / "mb")
    keep = {rows[0].key}
    res = export_release([r for r in rows if r.key in keep], tmp_path / "mb")
    assert sorted(p.name for p in (tmp_path / "mb" / "videos").iterdir()) == [f"{k}.mp4" for k in keep]
    assert len((tmp_path / "mb" / META_FILE).read_text().splitlines()) == res.questions


def test_eval_run_reads_the_copied_release_folder(release, tmp_path):
    """Our own evaluator on a copied release: it finds the clips in DIR/videos without --videos, and every
    question gets frames (a tiny random Qwen2-VL; only the data path matters here)."""
    from tests._cli import invoke

    rows, out, _ = release
    moved = tmp_path / "copy"
    shutil.copytree(out, moved)
    resp = tmp_path / "replies.json"
    invoke("eval", "run", "--model", "tiny://qwen2_vl", "--meta", str(moved / META_FILE), "--limit", "4",
           "--num-frames", "2", "--short-side", "32", "--responses", str(resp), "--json")
    replies = json.loads(resp.read_text())
    assert len(replies) == 4 and all(v is not None for v in replies.values())
    assert not resp.with_suffix(".errors.json").exists()
