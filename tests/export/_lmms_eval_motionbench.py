"""Run lmms-eval's own ``motionbench`` task code on a meta file and a reply set; print JSON.

Runs in .venv-consumers (scripts/setup_consumers.sh), NOT in the project venv. Usage::

    python _lmms_eval_motionbench.py META.jsonl REPLIES.json VIDEO_DIR

It does what lmms-eval's task does with ``_default_template_yaml`` (``dataset_path: text``, ``data_files``
pointed at META, split ``test``): ``datasets.load_dataset("text", ...)``, then the task's
``motionbench_process_docs``, ``motionbench_doc_to_visual`` (with ``MOTIONBENCH_VIDEO_DIR=VIDEO_DIR`` and
auto-download off), ``motionbench_doc_to_text``, ``motionbench_process_results`` on the reply of each doc, and
the three aggregation functions. The per-category accuracies are taken from the lines
``motionbench_aggregate_tracking`` logs (the task's only per-category output).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path


def load_task_utils():
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("lmms_eval is not installed in this interpreter")
    path = Path(list(spec.submodule_search_locations)[0]) / "tasks" / "motionbench" / "utils.py"
    # Loaded by file: importing lmms_eval.tasks would build the whole task registry (all of lmms-eval's deps).
    mod_spec = importlib.util.spec_from_file_location("lmms_eval_motionbench_utils", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod, path


def main(meta: str, replies_path: str, video_dir: str) -> dict:
    os.environ["MOTIONBENCH_VIDEO_DIR"] = video_dir
    os.environ["MOTIONBENCH_AUTO_DOWNLOAD"] = "0"
    import datasets
    from importlib.metadata import version

    utils, path = load_task_utils()
    logged: list[str] = []
    utils.eval_logger.add(lambda m: logged.append(str(m.record["message"])), level="INFO", format="{message}")
    raw = datasets.load_dataset("text", data_files={"test": meta}, split="test",
                                cache_dir=os.environ.get("HF_DATASETS_CACHE"))
    docs = utils.motionbench_process_docs(raw)
    replies = json.loads(Path(replies_path).read_text(encoding="utf-8"))
    acc, answered, tracking = [], [], []
    per_doc = {}
    videos_found = 0
    for doc in docs:
        visual = utils.motionbench_doc_to_visual(doc)
        videos_found += bool(visual and os.path.isfile(visual[0]))
        utils.motionbench_doc_to_text(doc)
        res = utils.motionbench_process_results(doc, [replies.get(doc["id"], "")])
        acc.append(res["motionbench_acc"])
        answered.append(res["motionbench_answered_rate"])
        tracking.append(res["motionbench_tracking"])
        per_doc[doc["id"]] = {"question_type": res["motionbench_tracking"]["question_type"],
                              "score": res["motionbench_tracking"]["score"], "key": doc["key"],
                              "video": visual[0] if visual else None}
    logged.clear()
    overall = utils.motionbench_aggregate_tracking(tracking)
    per_category = {}
    for line in logged:
        m = re.match(r"\[motionbench\] (.+?) - acc: ([0-9.]+), answered_rate: ([0-9.]+), n: (\d+)$", line)
        if m:
            per_category[m.group(1)] = {"acc": float(m.group(2)), "n": int(m.group(4))}
    return {"lmms_eval_version": version("lmms-eval"), "utils_path": str(path), "docs": len(docs),
            "videos_found": videos_found, "overall": overall,
            "motionbench_acc": utils.motionbench_aggregate_acc(acc),
            "per_category_logged": per_category, "per_doc": per_doc, "log": logged}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
