"""review: the manual check (MotionBench appendix 9.4) as a queue of human decisions.

Reviewers check "the reasonableness of the question, the correctness of the category, the relevance of the
question to the video, the accuracy of the options, and the uniqueness of the correct answer" and accept,
reject or edit each question.

How decisions enter the table world:

1. ``motionforge review export --out ROOT --to FILE`` lists the pending questions (kept by ``ffilter``, no
   decision yet) with the clip path and a first-frame image written under ``ROOT/review/_media/first_frames``.
   ``FILE`` is JSONL (``.jsonl``) or a plain-text review sheet (``.txt``) meant to be edited by hand.
2. ``motionforge review import FILE --out ROOT`` validates every decision (all or nothing) and appends them,
   per shard, as a new batch file ``ROOT/review/_decisions/shard-KKKKK/<utc time>-<digest>.jsonl``. Files are
   never rewritten; for a question decided twice the later batch wins.
3. The review stage declares those folders as an external input (``Stage.external_inputs``): a shard's input
   fingerprint includes a digest of its batch files, so importing decisions makes exactly the affected review
   shards stale in ``status``, and the next run (or ``run-stage review``) picks them up.

Modes (``review.mode``): ``required`` (paper): only accepted or edited questions go forward; ``optional``:
decisions apply, undecided questions go forward too; ``off``: every question kept by ffilter goes forward
and decisions are ignored.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any, Literal

from schemas._base import STATUS_OK, STATUS_SKIPPED, from_table
from schemas.ffilter_verdicts import ROW_DECISION, FilterVerdict
from schemas.questions import SCHEMA as QUESTIONS_SCHEMA, Question
from schemas.reviews import SCHEMA, Review
from stages.base import Resources, ShardContext, Stage, StageConfig
from stages.shared.motionbench_format import CATEGORY_NAMES, LETTERS
from stages.shared.motionbench_questions import leaked_phrase, normalise
from storage.root import OutputRoot, shard_name

DECISIONS = ("accept", "reject", "edit")
DECISIONS_DIR = ("review", "_decisions")
FRAMES_DIR = ("review", "_media", "first_frames")


class ReviewConfig(StageConfig):
    mode: Literal["required", "optional", "off"] = "required"


PROFILES = {"tiny": {"mode": "optional"}}


# -- decisions -----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Decision:
    question_id: str
    decision: str  # accept | reject | edit
    reviewer: str
    reason: str | None = None
    question: str | None = None  # edit: the new content
    options: tuple[str, ...] | None = None
    answer: str | None = None
    category: str | None = None  # edit: a corrected category code
    decided_at: str | None = None  # ISO time


def check_content(question: str, options: list[str], answer: str) -> tuple[str, list[str], str]:
    """Validate edited content with the qgen rules; returns the normalised (question, options, letter)."""
    q = " ".join((question or "").split())
    if not q:
        raise ValueError("the question is empty")
    opts = [" ".join(str(o or "").split()) for o in options]
    if len(opts) != 4 or any(not o for o in opts):
        raise ValueError(f"needs exactly four non-empty options A-D, got {opts}")
    if len({normalise(o) for o in opts}) != 4:
        raise ValueError(f"options repeat: {opts}")
    letter = (answer or "").strip().upper().strip("().")
    if letter not in LETTERS:
        raise ValueError(f"answer {answer!r} must be one of the letters A, B, C, D")
    for text in [q, *opts]:
        leak = leaked_phrase(text)
        if leak:
            raise ValueError(f"{text!r} says {leak!r}; questions must read as if the video was watched")
    return q, opts, letter


def make_decision(item: dict, original: Question | None, default_reviewer: str | None, where: str) -> Decision | None:
    """One exported item, filled in by a reviewer -> Decision (None when still undecided); ValueError on problems."""
    qid = str(item.get("question_id") or "").strip()
    if not qid:
        raise ValueError(f"{where}: no question_id")
    if original is None:
        raise ValueError(f"{where}: question {qid} is not in this output root's qgen table (wrong --out?)")
    raw = str(item.get("decision") or "").strip().lower()
    if not raw:
        return None
    if raw not in DECISIONS:
        raise ValueError(f"{where}: decision {raw!r} must be accept, reject or edit (or blank to leave it pending)")
    reviewer = str(item.get("reviewer") or default_reviewer or "").strip()
    if not reviewer:
        raise ValueError(f"{where}: no reviewer id (fill 'reviewer' or pass --reviewer)")
    reason = str(item.get("reason") or "").strip() or None
    if raw in ("reject", "edit") and not reason:
        raise ValueError(f"{where}: a {raw} needs a reason")
    options = item.get("options")
    if isinstance(options, dict):
        options = [options.get(l) for l in LETTERS]
    category = str(item.get("category") or "").strip().upper() or None
    if category and category not in CATEGORY_NAMES:
        raise ValueError(f"{where}: category {category!r} must be one of {', '.join(CATEGORY_NAMES)}")
    decided_at = item.get("decided_at") or None
    if decided_at is not None:
        try:
            stamp = dt.datetime.fromisoformat(str(decided_at))
        except ValueError:
            raise ValueError(f"{where}: decided_at {decided_at!r} is not an ISO date-time") from None
        decided_at = (stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.timezone.utc)).isoformat()
    content_given = item.get("question") is not None and options is not None and item.get("answer") is not None
    changed = False
    if content_given:
        q, opts, letter = check_content(item["question"], list(options), str(item["answer"]))
        changed = (normalise(q), [normalise(o) for o in opts], letter) != (
            normalise(original.question or ""), [normalise(o) for o in original.options or []], original.answer)
    cat_changed = category is not None and category != original.category
    if raw == "edit":
        if not content_given:
            raise ValueError(f"{where}: an edit needs the full question, options A-D and answer")
        if not changed and not cat_changed:
            raise ValueError(f"{where}: decision is edit but the question, options, answer and category are unchanged")
        try:
            q, opts, letter = check_content(item["question"], list(options), str(item["answer"]))
        except ValueError as exc:
            raise ValueError(f"{where}: edited question is invalid: {exc}") from None
        return Decision(qid, "edit", reviewer, reason, q, tuple(opts), letter, category if cat_changed else None,
                        decided_at)
    if changed or cat_changed:
        raise ValueError(f"{where}: the question was changed but the decision is {raw}; write 'edit' to keep the change")
    return Decision(qid, raw, reviewer, reason, decided_at=decided_at)


def store_decisions(root: OutputRoot, by_shard: dict[int, list[Decision]], now: dt.datetime | None = None) -> list[str]:
    """Append one batch file per shard; returns the paths written."""
    now = now or dt.datetime.now(dt.timezone.utc)
    stamp = now.strftime("%Y%m%dT%H%M%S%fZ")
    paths = []
    for shard, decisions in sorted(by_shard.items()):
        lines = [json.dumps({**dataclasses.asdict(d), "decided_at": d.decided_at or now.isoformat()},
                            sort_keys=True, ensure_ascii=False) for d in decisions]
        blob = ("\n".join(lines) + "\n").encode()
        name = f"{stamp}-{hashlib.sha256(blob).hexdigest()[:12]}.jsonl"
        path = root.path(*DECISIONS_DIR, shard_name(shard), name)
        root.write_bytes_atomic(path, blob)
        paths.append(path)
    return paths


def _batch_files(root: OutputRoot, shard: int) -> list[str]:
    return [n for n in root.list_dir(root.path(*DECISIONS_DIR, shard_name(shard))) if n.endswith(".jsonl")]


def decision_history(root: OutputRoot, shard: int, cache: dict | None = None) -> list[Decision]:
    """Every decision stored for this shard, oldest batch first (batch names start with their UTC time).
    ``cache`` (kept by a long-running reader) holds parsed batches: batch files are never rewritten."""
    out: list[Decision] = []
    for name in _batch_files(root, shard):
        if cache is not None and (shard, name) in cache:
            out += cache[(shard, name)]
            continue
        batch = []
        for line in root.read_bytes(root.path(*DECISIONS_DIR, shard_name(shard), name)).decode().splitlines():
            if line.strip():
                d = json.loads(line)
                d["options"] = tuple(d["options"]) if d.get("options") else None
                batch.append(Decision(**d))
        if cache is not None:
            cache[(shard, name)] = batch
        out += batch
    return out


def load_decisions(root: OutputRoot, shard: int) -> dict[str, Decision]:
    """question_id -> the latest decision for this shard."""
    return {d.question_id: d for d in decision_history(root, shard)}


def decisions_fingerprint(root: OutputRoot, shard: int) -> dict[str, str]:
    files = _batch_files(root, shard)
    if not files:
        return {}
    return {"review-decisions": "dec-" + hashlib.sha256("|".join(files).encode()).hexdigest()[:16]}


def decisions_fingerprints(root: OutputRoot, shards: list[int]) -> list[dict[str, str]]:
    """:func:`decisions_fingerprint` of each shard, listing only the shards' folders that exist."""
    present = set(root.list_dir(root.path(*DECISIONS_DIR)))
    return [decisions_fingerprint(root, k) if shard_name(k) in present else {} for k in shards]


# -- the stage -----------------------------------------------------------------------------------------------
def review_rows(questions: list[Question], decisions_ffilter: dict[str, FilterVerdict],
                decisions: dict[str, Decision], mode: str) -> list[Review]:
    rows = []
    for q in questions:
        f = decisions_ffilter.get(q.question_id)
        if f is None or f.status != STATUS_OK:
            continue  # dropped or failed in ffilter: its reason lives in the ffilter table
        d = decisions.get(q.question_id) if mode != "off" else None
        base = dict(question_id=q.question_id, clip_id=q.clip_id, video_id=q.video_id, video_path=q.video_path,
                    clip_path=q.clip_path, start_s=q.start_s, end_s=q.end_s, question=q.question,
                    options=list(q.options or []), answer=q.answer, category=q.category, review_mode=mode)
        if d is None:
            if mode == "required":
                rows.append(Review(**base, decision="pending", status=STATUS_SKIPPED,
                                   error="awaiting review (review.mode=required): `motionforge review export`, "
                                         "decide, then `motionforge review import`"))
            else:
                rows.append(Review(**base, decision="pending"))
            continue
        at = dt.datetime.fromisoformat(d.decided_at) if d.decided_at else None
        common = dict(decision=d.decision, reviewer=d.reviewer, reason=d.reason, decided_at=at)
        if d.decision == "reject":
            rows.append(Review(**base, **common, status=STATUS_SKIPPED,
                               error=f"rejected by reviewer {d.reviewer}: {d.reason}"))
        elif d.decision == "edit":
            base.update(question=d.question, options=list(d.options or ()), answer=d.answer,
                        category=d.category or q.category)
            rows.append(Review(**base, **common, edited=True))
        else:
            rows.append(Review(**base, **common))
    return rows


def process(ctx: ShardContext) -> list[Review]:
    cfg: ReviewConfig = ctx.config
    questions = ctx.read_records("qgen", Question)
    verdicts = ctx.read_records("ffilter", FilterVerdict, only_ok=False)
    decided = {v.question_id: v for v in verdicts if v.row_kind == ROW_DECISION}
    return review_rows(questions, decided, load_decisions(ctx.root, ctx.shard), cfg.mode)


STAGE = Stage(
    name="review", schema=SCHEMA, inputs=("qgen", "ffilter"), config_cls=ReviewConfig, process=process,
    resources=Resources(cpus=0.25), branch="motionbench", external_inputs=decisions_fingerprint,
    external_inputs_of=decisions_fingerprints,
    expert=lambda cfg: ("human-review", None),
    description="manual check queue: accept / reject / edit (9.4)",
)


# -- the queue (used by the CLI) ----------------------------------------------------------------------------
def questions_by_shard(root: OutputRoot) -> dict[int, list[Question]]:
    out = {}
    for s in root.completed_shards("qgen"):
        out[s] = from_table(root.read_shard("qgen", s, QUESTIONS_SCHEMA), Question)
    return out


def pending_items(root: OutputRoot, include_decided: bool = False) -> list[dict]:
    """Questions kept by ffilter that have no decision yet, as export items (first frames written)."""
    from schemas.ffilter_verdicts import SCHEMA as FF_SCHEMA

    items = []
    filtered = set(root.completed_shards("ffilter"))  # listed once, not once per qgen shard
    for shard, questions in questions_by_shard(root).items():
        if shard not in filtered:
            continue
        ff = from_table(root.read_shard("ffilter", shard, FF_SCHEMA), FilterVerdict)
        kept = {v.question_id for v in ff if v.row_kind == ROW_DECISION and v.status == STATUS_OK}
        decided = load_decisions(root, shard)
        for q in questions:
            if q.status != STATUS_OK or q.question_id not in kept:
                continue
            if q.question_id in decided and not include_decided:
                continue
            items.append(export_item(q, decided.get(q.question_id)))
    return items


def export_item(q: Question, decided: Decision | None = None) -> dict:
    """``clip_path`` is the file to watch; ``start_s``/``end_s`` are the span within that file."""
    start, end = (0.0, q.end_s - q.start_s) if q.clip_path else (q.start_s, q.end_s)
    return {
        "question_id": q.question_id, "clip_id": q.clip_id, "clip_path": q.clip_path or q.video_path,
        "start_s": round(start, 3), "end_s": round(end, 3), "first_frame": None,
        "category": q.category, "question": q.question,
        "options": {l: o for l, o in zip(LETTERS, q.options or [])}, "answer": q.answer,
        "decision": decided.decision if decided else "", "reviewer": decided.reviewer if decided else "",
        "reason": (decided.reason or "") if decided else "",
    }


def write_first_frames(root: OutputRoot, items: list[dict], frame_of) -> None:
    """Write each clip's first frame once (JPEG) and set ``first_frame`` on the items."""
    from PIL import Image

    done: dict[str, str | None] = {}
    for it in items:
        cid = it["clip_id"]
        if cid not in done:
            path = root.path(*FRAMES_DIR, f"{cid}.jpg")
            if not root.exists(path):
                try:
                    img = frame_of(it)
                except Exception:  # noqa: BLE001 -- a missing image must not block the whole queue
                    done[cid] = None
                    continue
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="JPEG", quality=90)
                root.write_bytes_atomic(path, buf.getvalue())
            done[cid] = root.uri(*FRAMES_DIR, f"{cid}.jpg")
        it["first_frame"] = done[cid]


# -- file formats --------------------------------------------------------------------------------------------
SHEET_HEADER = """\
# motionforge MotionBench review sheet (MotionBench appendix 9.4).
# For every question check: is it reasonable, is the category right, is it about this video, are the
# options accurate, is exactly one answer correct? Then fill in
#   decision: accept | reject | edit      (leave blank to keep it pending)
#   reviewer: your id                     (or pass --reviewer on import)
#   reason:   why (required for reject and edit)
# To edit, change the Q / A-D / answer / category lines and write "decision: edit".
# Lines starting with # are ignored. Keep the "=== question <id>" lines as they are.
"""


def write_sheet(items: list[dict]) -> str:
    out = [SHEET_HEADER]
    for it in items:
        cat = it.get("category") or ""
        out += [
            f"=== question {it['question_id']}",
            f"clip: {it['clip_path']}  [{it['start_s']:.2f} s - {it['end_s']:.2f} s]",
            f"first frame: {it.get('first_frame') or '(not available)'}",
            f"category: {cat}" + (f"  ({CATEGORY_NAMES[cat]})" if cat in CATEGORY_NAMES else ""),
            f"Q: {it['question']}",
            *(f"{l}. {it['options'].get(l, '')}" for l in LETTERS),
            f"answer: {it['answer']}",
            f"decision: {it.get('decision') or ''}",
            f"reviewer: {it.get('reviewer') or ''}",
            f"reason: {it.get('reason') or ''}",
            "",
        ]
    return "\n".join(out)


_SHEET_KEYS = {"q": "question", "question": "question", "answer": "answer", "decision": "decision",
               "reviewer": "reviewer", "reason": "reason", "category": "category"}


def parse_sheet(text: str) -> list[tuple[str, dict]]:
    """(where, item) per question block of a review sheet. A line with no field name continues the question,
    option or reason above it (hand edits often wrap long lines)."""
    items: list[tuple[str, dict]] = []
    cur: dict | None = None
    last: tuple[str, str | None] | None = None
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("#"):
            continue
        if line.startswith("=== question "):
            cur = {"question_id": line[len("=== question "):].strip(), "options": {}}
            items.append((f"line {n}", cur))
            last = None
            continue
        if cur is None or not line.strip():
            continue
        m = re.match(r"^([A-D])[.)]\s?(.*)$", line)
        if m:
            cur["options"][m.group(1)] = m.group(2).strip()
            last = ("options", m.group(1))
            continue
        key, sep, value = line.partition(":")
        k = key.strip().lower()
        if sep and k in ("clip", "first frame"):
            last = None
            continue
        if sep and k in _SHEET_KEYS:
            value = value.strip()
            if k == "category":
                value = value.split()[0] if value else ""
            cur[_SHEET_KEYS[k]] = value
            last = (_SHEET_KEYS[k], None)
            continue
        if last is not None and (last[0] in ("question", "reason") or last[0] == "options"):
            if last[0] == "options":
                cur["options"][last[1]] = f"{cur['options'][last[1]]} {line.strip()}".strip()
            else:
                cur[last[0]] = f"{cur.get(last[0], '')} {line.strip()}".strip()
            continue
        raise ValueError(f"line {n}: {line.strip()[:60]!r} is not a field (known: Q, A.-D., answer, category, "
                         "decision, reviewer, reason); a wrapped line must follow Q, an option or reason")
    return items


def check_queue_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in (".txt", ".md", ".jsonl", ".json"):
        raise ValueError(f"review file {path}: use .jsonl (machine) or .txt (hand-editable sheet)")
    return path


def write_queue(path: str | Path, items: list[dict]) -> None:
    path = check_queue_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".txt", ".md"):
        path.write_text(write_sheet(items), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")


def read_queue(path: str | Path) -> list[tuple[str, dict]]:
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".txt", ".md"):
        return [(f"{path}:{w}", it) for w, it in parse_sheet(text)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from None
    return out


def import_decisions(root: OutputRoot, path: str | Path, default_reviewer: str | None = None
                     ) -> tuple[dict[int, list[Decision]], int, list[str]]:
    """Validate every item of a filled-in review file; returns (decisions by shard, undecided count, problems).
    Nothing is stored here; the caller stores only when there are no problems."""
    return validate_items(root, read_queue(path), default_reviewer)


def question_index(root: OutputRoot) -> dict[str, tuple[int, Question]]:
    """question_id -> (shard, question) for every question qgen wrote without error."""
    index: dict[str, tuple[int, Question]] = {}
    for shard, qs in questions_by_shard(root).items():
        for q in qs:
            if q.status == STATUS_OK:
                index[q.question_id] = (shard, q)
    return index


def validate_items(root: OutputRoot, items: list[tuple[str, dict]], default_reviewer: str | None = None,
                   index: dict[str, tuple[int, Question]] | None = None
                   ) -> tuple[dict[int, list[Decision]], int, list[str]]:
    """``(where, item)`` pairs (a review file's lines, or a reviewer's request in ``motionforge review serve``)
    -> (decisions by shard, undecided count, problems), all with the same rules. Stores nothing."""
    index = question_index(root) if index is None else index
    by_shard: dict[int, list[Decision]] = {}
    problems: list[str] = []
    undecided = 0
    seen: set[str] = set()
    for where, item in items:
        qid = str(item.get("question_id") or "").strip()
        try:
            d = make_decision(item, index.get(qid, (None, None))[1], default_reviewer, where)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if d is None:
            undecided += 1
            continue
        if qid in seen:
            problems.append(f"{where}: question {qid} is decided twice in this file")
            continue
        seen.add(qid)
        by_shard.setdefault(index[qid][0], []).append(d)
    return by_shard, undecided, problems


def first_frame_of_item(item: dict[str, Any]):
    from experts.video import first_frame

    return first_frame(item["clip_path"], float(item["start_s"]))
