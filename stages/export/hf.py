"""A Hugging Face dataset folder of a run's stage tables: ``datasets.load_dataset(DIR)`` (and ``name=STAGE``)
opens it, and ``huggingface_hub`` can push it as is.

Layout::

    DIR/README.md                                    dataset card: YAML front matter + provenance text
    DIR/data/<stage>/<split>-00000-of-0000N.parquet  one config per stage that has rows, N files per split

* Configs: one per stage with at least one row (config name = stage name). Splits: ``finalize`` (the
  benchmark) has ``dev`` and ``test`` from its ``split`` column, with test answers hidden (``NA``) unless
  asked otherwise (a pushed card would publish the held-out key); every other stage is one ``train`` split.
* A stage with no rows is listed in the card but is not a config: ``datasets`` cannot build a split with
  zero examples (``Instruction "train" corresponds to no data``, datasets 5.2).
* The YAML front matter (written with ``datasets``' own ``MetadataConfigs`` / ``DatasetInfosDict``) declares
  each config's data files, features (from the stage's Arrow schema) and split sizes, plus ``license``,
  ``pretty_name``, ``tags`` and ``task_categories``; the default config is ``tasks`` (iMOVE-IT), else
  ``finalize``, else the first stage.
* Parquet files are written without a zero-row row group (``datasets`` takes the first row group's size as
  its batch size), in row groups of ``ROW_GROUP_ROWS`` rows (fewer when that many rows are over
  ``ROW_GROUP_BYTES``), and a split moves to its next file once a file reaches ``max_file_bytes`` (500 MB by
  default, as ``push_to_hub`` shards): the card names each split's files by a glob, as ``push_to_hub`` does.
* A stage is read one shard at a time (:meth:`storage.root.OutputRoot.iter_stage`) and written as it is read:
  the export holds a few shards and one row group per split, never a whole stage (the track table of a
  million-video root is tens of GB; ``benchmarks/bench_reads_at_scale.py``).
"""
from __future__ import annotations

import collections
import dataclasses
import datetime as _dt
import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.shared.motionbench_format import NA
from storage.root import table_blocks

CARD = "README.md"
ROW_GROUP_ROWS = 1000  # rows per row group (the batch ``datasets`` writes tabular rows in)
ROW_GROUP_BYTES = 64 * 2**20  # a row group is cut earlier when its rows hold this much in memory
MAX_FILE_BYTES = 500 * 10**6  # a split's next file starts once a file is this large (push_to_hub's default)
DATA = "data"
EXPORT_MARK = "<!-- motionforge export hf -->"
DEFAULT_ORDER = ("tasks", "finalize")


@dataclasses.dataclass(frozen=True)
class ConfigExport:
    name: str
    splits: dict[str, int]  # split -> rows
    status: dict[str, int]  # status -> rows (all splits)


@dataclasses.dataclass(frozen=True)
class HfExport:
    folder: Path
    configs: list[ConfigExport]
    empty_stages: list[str]
    default: str | None


def split_tables(stage: str, table: pa.Table, hide_test_answers: bool = True) -> dict[str, pa.Table]:
    """split name -> rows of one stage (see the module docstring)."""
    if stage == "finalize" and "split" in table.column_names:
        out = {}
        for split in sorted(set(table["split"].to_pylist())):
            part = table.filter(pc.equal(table["split"], split))
            if split == "test" and hide_test_answers and "answer" in part.column_names:
                i = part.schema.get_field_index("answer")
                part = part.set_column(i, part.schema.field(i), pa.array([NA] * part.num_rows, pa.string()))
            out[split] = part
        return out
    return {"train": table}


class _SplitFiles:
    """One split of one config, written as its shards arrive: row groups of ROW_GROUP_ROWS rows, and the next
    file after the row group that takes a file to ``max_file_bytes``; :meth:`close` names the files
    ``<split>-<i>-of-<n>.parquet``."""

    def __init__(self, folder: Path, split: str, schema: pa.Schema, max_file_bytes: int):
        self.folder, self.split, self.schema, self.max_file_bytes = folder, split, schema, max_file_bytes
        self.parts: list[Path] = []
        self.buffer: list[pa.Table] = []
        self.buffered_rows = self.buffered_bytes = 0
        self.rows = self.nbytes = 0
        self._writer: pq.ParquetWriter | None = None

    def add(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self.rows += table.num_rows
        self.nbytes += table.nbytes
        self.buffer.append(table)
        self.buffered_rows += table.num_rows
        self.buffered_bytes += table.nbytes
        if self.buffered_rows >= ROW_GROUP_ROWS or self.buffered_bytes >= ROW_GROUP_BYTES:
            self._flush(everything=self.buffered_bytes >= ROW_GROUP_BYTES)

    def _flush(self, everything: bool) -> None:
        """Write the buffered rows as row groups of ROW_GROUP_ROWS (and the shorter rest, if ``everything``)."""
        table = pa.concat_tables(self.buffer).combine_chunks()
        n = table.num_rows if everything else table.num_rows - table.num_rows % ROW_GROUP_ROWS
        for start in range(0, n, ROW_GROUP_ROWS):
            if self._writer is None:
                self.parts.append(self.folder / f".{self.split}-{len(self.parts):05d}.parquet.part")
                self.parts[-1].parent.mkdir(parents=True, exist_ok=True)
                self._writer = pq.ParquetWriter(self.parts[-1], self.schema, compression="zstd")
            group = table.slice(start, min(ROW_GROUP_ROWS, n - start))
            self._writer.write_table(group, row_group_size=group.num_rows)
            if self.parts[-1].stat().st_size >= self.max_file_bytes:  # each row group is on disk once written
                self._writer.close()
                self._writer = None
        rest = table.slice(n)
        self.buffer = [rest] if rest.num_rows else []
        self.buffered_rows, self.buffered_bytes = rest.num_rows, rest.nbytes if rest.num_rows else 0

    def close(self) -> list[str]:
        """The files' names (relative to the config's folder), final."""
        if self.buffer:
            self._flush(everything=True)
        if self._writer is not None:
            self._writer.close()
        names = []
        for i, part in enumerate(self.parts):
            name = f"{self.split}-{i:05d}-of-{len(self.parts):05d}.parquet"
            os.replace(part, part.with_name(name))
            names.append(name)
        return names


def _check_target(to: Path) -> None:
    if not to.exists():
        return
    if not to.is_dir():
        raise ValueError(f"{to} exists and is not a folder")
    entries = [p.name for p in to.iterdir()]
    card = to / CARD
    ours = card.is_file() and EXPORT_MARK in card.read_text(encoding="utf-8", errors="replace")
    if entries and not ours:
        raise ValueError(f"{to} is not empty and not an earlier `motionforge export hf` folder; pick a new folder")


def _provenance(manifest: dict, stage: str) -> dict:
    m = (manifest or {}).get("stages", {}).get(stage, {})
    return {k: m.get(k) for k in ("config_hash", "inputs", "updated_at")}


def _card_body(source: str, configs: list[ConfigExport], empty: list[str], manifest: dict, experts: dict,
               hide_test_answers: bool, license_id: str, pretty_name: str) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    lines = [EXPORT_MARK, f"# {pretty_name}", "",
             f"Stage tables of a motionforge run (source root `{source}`), exported {now}.", "",
             "```python", "import datasets",
             "ds = datasets.load_dataset(\"path/to/this/folder\", \"<config>\")", "```", "",
             "## Configs", "", "| config | splits (rows) | status | expert(s) | stage config hash | updated |",
             "|---|---|---|---|---|---|"]
    for c in configs:
        p = _provenance(manifest, c.name)
        lines.append(f"| {c.name} | {', '.join(f'{s} ({n})' for s, n in c.splits.items())} | "
                     f"{', '.join(f'{k} {v}' for k, v in sorted(c.status.items()))} | "
                     f"{', '.join(sorted(experts.get(c.name, []))) or '-'} | {p['config_hash'] or '-'} | "
                     f"{p['updated_at'] or '-'} |")
    if empty:
        lines += ["", "Stages that ran but wrote no rows (no config: `datasets` cannot build an empty split): "
                  + ", ".join(f"`{s}`" for s in empty) + "."]
    lines += ["", "## Provenance", "",
              "Every row keeps its stage's provenance columns (`stage`, `expert`, `expert_revision`, `config_hash`, "
              "`created_at`, `status`, `error`). Each stage's full configuration is in the source root's "
              "`_manifest.json`; its inputs:", ""]
    for c in configs:
        inputs = _provenance(manifest, c.name)["inputs"] or []
        lines.append(f"- `{c.name}` <- {', '.join(f'`{i}`' for i in inputs) or 'the input videos'}")
    if any(c.name == "finalize" for c in configs):
        lines += ["", "The `finalize` config is the MotionBench-style benchmark; "
                  + ("its `test` split has `answer` = `NA` (the key is kept out of this folder)."
                     if hide_test_answers else "its `test` split INCLUDES the answers.")]
    lines += ["", "## Licence", "",
              f"Declared licence: `{license_id}`. Videos are not part of this folder: `video_path` / `clip_path` "
              "columns name files on the producing machine, and the source videos' own licences apply to them "
              "and to anything derived from them (captions, boxes, questions).", ""]
    return "\n".join(lines)


def export_hf(root, to: str | Path, *, stages: Iterable[str] | None = None, hide_test_answers: bool = True,
              license_id: str = "other", pretty_name: str = "motionforge run",
              max_file_bytes: int = MAX_FILE_BYTES) -> HfExport:
    """Write the dataset folder for ``root`` (an :class:`storage.root.OutputRoot`)."""
    from datasets import Features
    from datasets.info import DatasetInfo, DatasetInfosDict
    from datasets.splits import SplitDict, SplitInfo
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard, DatasetCardData

    from stages.registry import STAGE_MODULES

    to = Path(to)
    _check_target(to)
    wanted = list(stages) if stages else [s for s in STAGE_MODULES if root.completed_shards(s)]
    unknown = [s for s in wanted if s not in STAGE_MODULES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are: {', '.join(STAGE_MODULES)}")
    tmp = to.with_name(f".{to.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    configs: list[ConfigExport] = []
    empty: list[str] = []
    experts: dict[str, set] = collections.defaultdict(set)
    meta_configs: dict[str, dict] = {}
    infos: dict[str, DatasetInfo] = {}
    for stage in wanted:
        if not root.completed_shards(stage):
            raise ValueError(f"stage {stage!r} has no completed shards under {root.url}")
        folder = tmp / DATA / stage
        schema = None
        writers: dict[str, _SplitFiles] = {}
        status: collections.Counter = collections.Counter()
        # consecutive shards of one schema handled as one table of about a row group (storage.root.table_blocks):
        # the casts, counts and splits below cost per call, not per row; the files written are the same
        for block, table in table_blocks(root.iter_stage(stage), max_rows=ROW_GROUP_ROWS, promote=False):
            table = table.replace_schema_metadata(None)  # (schemas are compared without it)
            if schema is None:
                schema = table.schema
            elif not table.schema.equals(schema):
                try:
                    table = table.cast(schema)
                except (pa.ArrowInvalid, ValueError) as exc:
                    raise ValueError(f"stage {stage!r}: shard {block[0]}'s columns differ from the first shard's and "
                                     f"cannot be cast to them ({exc}); re-run the stage with --force") from exc
            if not table.num_rows:
                continue
            if "expert" in table.column_names:
                experts[stage].update(x for x in pc.unique(table["expert"]).to_pylist() if x)
            if "status" in table.column_names:
                status.update({d["values"]: d["counts"] for d in pc.value_counts(table["status"]).to_pylist()})
            for split, part in split_tables(stage, table, hide_test_answers).items():
                if split not in writers:
                    writers[split] = _SplitFiles(folder, split, schema, max_file_bytes)
                writers[split].add(part)
        if not writers:
            empty.append(stage)
            continue
        split_dict = SplitDict()
        files = []
        for split in sorted(writers):
            w = writers[split]
            w.close()
            files.append({"split": split, "path": f"{DATA}/{stage}/{split}-*.parquet"})
            split_dict.add(SplitInfo(name=split, num_bytes=w.nbytes, num_examples=w.rows))
        configs.append(ConfigExport(stage, {s: writers[s].rows for s in sorted(writers)}, dict(status)))
        meta_configs[stage] = {"data_files": files}
        infos[stage] = DatasetInfo(features=Features.from_arrow_schema(schema), splits=split_dict)
    if not meta_configs:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"no rows in any of the stages {wanted} under {root.url}: nothing to export")
    default = next((d for d in DEFAULT_ORDER if d in meta_configs), next(iter(meta_configs), None))
    if default is not None:
        meta_configs[default]["default"] = True
    card_data = DatasetCardData(license=license_id, pretty_name=pretty_name,
                                tags=["motionforge", "video", "motion"],
                                task_categories=["video-text-to-text", "visual-question-answering"])
    MetadataConfigs(meta_configs).to_dataset_card_data(card_data)
    DatasetInfosDict(infos).to_dataset_card_data(card_data)
    manifest = root.read_json(root.path("_manifest.json"), default={})
    body = _card_body(root.url, configs, empty, manifest, experts, hide_test_answers, license_id, pretty_name)
    tmp.mkdir(parents=True, exist_ok=True)
    DatasetCard(f"---\n{card_data.to_yaml()}\n---\n{body}").save(tmp / CARD)
    (tmp / "export_summary.json").write_text(json.dumps(
        {"configs": [dataclasses.asdict(c) for c in configs], "empty_stages": empty, "default": default},
        indent=1) + "\n", encoding="utf-8")
    if to.exists():
        shutil.rmtree(to)
    os.replace(tmp, to)
    return HfExport(folder=to, configs=configs, empty_stages=empty, default=default)
