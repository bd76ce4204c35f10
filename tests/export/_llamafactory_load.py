"""Load an export folder with LLaMA-Factory's own data code; print JSON. Runs in .venv-consumers.

    python _llamafactory_load.py DATASET_DIR DATASET_NAME

What runs is llamafactory 0.9.5's: ``data.parser.get_dataset_list`` (reads ``dataset_info.json``),
``data.loader._load_single_dataset`` (``datasets.load_dataset`` of the file, then ``converter.align_dataset``:
the ShareGPT converter's role/turn checks and the ``media_dir`` join of each video path), then for every
aligned example the multimodal plugin's placeholder check (``MMPluginMixin._validate_messages``: the count of
``<video>`` must equal the number of videos, else ValueError) and its video reader
(``_regularize_videos``: PyAV, floor(duration x video_fps) frames, at most video_maxlen).

Two things are not LLaMA-Factory's: llamafactory 0.9.5 pins older torch/transformers/datasets/av than the
project, so it runs --no-deps on the project's versions (scripts/setup_consumers.sh); and ``torchaudio`` (no
wheel for the project's torch) is replaced by an empty module before import: it is used only for audio,
which these samples do not have.
"""
from __future__ import annotations

import importlib.machinery
import json
import os
import sys
import types


def _no_torchaudio() -> None:
    mod = types.ModuleType("torchaudio")
    mod.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
    sys.modules["torchaudio"] = mod


def main(dataset_dir: str, name: str) -> dict:
    os.environ.setdefault("DISABLE_VERSION_CHECK", "1")
    _no_torchaudio()
    from importlib.metadata import version

    from transformers import Seq2SeqTrainingArguments

    from llamafactory.data.loader import _load_single_dataset
    from llamafactory.data.mm_plugin import get_mm_plugin
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.hparams import DataArguments, ModelArguments

    data_args = DataArguments(dataset=name, dataset_dir=dataset_dir, template="empty")
    model_args = ModelArguments(model_name_or_path="unused-no-model-is-loaded",
                                cache_dir=os.environ.get("HF_DATASETS_CACHE"))
    training_args = Seq2SeqTrainingArguments(output_dir=os.path.join(os.getcwd(), "lf_out"), report_to=[])
    attrs = get_dataset_list([name], dataset_dir)
    aligned = _load_single_dataset(attrs[0], model_args, data_args, training_args)
    plugin = get_mm_plugin("base", video_token="<video>")
    accepted, rejected, frames = 0, {}, {}
    for i, ex in enumerate(aligned):
        key = str(i)
        if not ex["_prompt"] or not ex["_response"]:
            rejected[key] = "dropped by the converter (roles/turn count)"
            continue
        videos = ex["_videos"] or []
        try:
            plugin._validate_messages(ex["_prompt"] + ex["_response"], [], videos, [])
            out = plugin._regularize_videos(videos, image_max_pixels=64 * 64, image_min_pixels=16,
                                            video_fps=2.0, video_maxlen=128)
        except Exception as exc:  # noqa: BLE001 -- reported per example
            rejected[key] = f"{type(exc).__name__}: {exc}"
            continue
        accepted += 1
        frames[key] = {"videos": videos, "frames": [len(v) for v in out["videos"]], "durations": out["durations"]}
    return {"llamafactory_version": version("llamafactory"), "examples": len(aligned), "accepted": accepted,
            "rejected": rejected, "frames": frames, "media_dir": data_args.media_dir}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
