"""Hugging Face ``datasets`` reading our Parquet: stage folders with empty shards, and the ``export hf`` folder.

Runs the real ``datasets`` loader (a test dependency of the project, 5.2.0) on what we write; the card's YAML is
read back with ``huggingface_hub``'s own parser.
"""
from __future__ import annotations

import json

import datasets
import pyarrow.parquet as pq
import pytest
from huggingface_hub import DatasetCard

from schemas.motionbench import SCHEMA as MB_SCHEMA
from schemas.questions import SCHEMA as Q_SCHEMA, Question
from schemas.reviews import SCHEMA as R_SCHEMA, Review
from stages.motionbench.finalize import FinalizeConfig, build_benchmark
from storage.root import OutputRoot
from tests._stage_tables import write_stage

CATS = ("MR", "LM", "AO", "RC", "MO", "CM")


def _questions(n, clip="c0", video="v0"):
    return [Question(question_id=f"{clip}-q{i}", clip_id=clip, video_id=video, video_path=f"/videos/{video}.mp4",
                     start_s=0.0, end_s=2.0, source="synthetic", question=f"How many times {i}?",
                     options=["1", "2", "3", "4"], answer="B", category=CATS[i % 6], kind="repetition_count",
                     content_dimensions=["x"] if i % 2 else None)
            for i in range(n)]


def _reviews(n_videos, per_video):
    return [Review(question_id=f"r{v}-{k}", clip_id=f"clip{v}", video_id=f"vid{v}", video_path=f"/videos/vid{v}.mp4",
                   start_s=1.0, end_s=3.0, question=f"What happens {v} {k}?", options=["a", "b", "c", "d"],
                   answer="A", category=CATS[k % 6], decision="accept", review_mode="required")
            for v in range(n_videos) for k in range(per_video)]


@pytest.fixture()
def root(tmp_path):
    """synthqa: shards 0 and 2 with rows, shard 1 empty; review: every shard empty; finalize: dev + test."""
    r = OutputRoot(tmp_path / "root")
    write_stage(r, "synthqa", 0, _questions(3, "c0", "v0"))
    write_stage(r, "synthqa", 1, [], Q_SCHEMA)
    write_stage(r, "synthqa", 2, _questions(4, "c2", "v2"))
    for shard in range(3):
        write_stage(r, "review", shard, [], R_SCHEMA)
    write_stage(r, "finalize", 0, build_benchmark(_reviews(6, 4), _questions(3, "s", "sv"), FinalizeConfig(seed=1)),
                MB_SCHEMA)
    return r


def test_empty_shard_has_no_row_group_and_stage_loads(root, tmp_path):
    for shard in (0, 1, 2):
        md = pq.ParquetFile(root.shard_file("review", shard)).metadata
        assert md.num_rows == 0 and md.num_row_groups == 0
    assert pq.ParquetFile(root.shard_file("synthqa", 1)).metadata.num_row_groups == 0
    assert root.read_shard("synthqa", 1, Q_SCHEMA).num_rows == 0 and root.read_stage("synthqa", Q_SCHEMA).num_rows == 7
    # the stage with an empty shard IN THE MIDDLE and the one where shard 0 is empty both load
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "root" / "synthqa" / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 7 and set(ds.features) >= {"question_id", "options", "category"}
    write_stage(root, "synthqa", 0, [], Q_SCHEMA)  # now the FIRST file has no rows
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "root" / "synthqa" / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf2"))
    assert len(ds) == 4


def test_stage_without_rows_streams_empty(root, tmp_path):
    """A stage with no rows at all: ``datasets`` cannot build a zero-example split (it raises ``Instruction
    "train" corresponds to no data``, datasets 5.2), but it opens and streams, with the stage's columns."""
    it = datasets.load_dataset("parquet", data_files=str(tmp_path / "root" / "review" / "*.parquet"), split="train",
                               streaming=True)
    assert list(it) == []
    assert set(it.features) == set(R_SCHEMA.names)


def test_export_hf_folder_loads_every_config(root, tmp_path):
    from stages.export.hf import export_hf

    res = export_hf(root, tmp_path / "hf_ds", license_id="cc-by-4.0", pretty_name="unit run")
    out = tmp_path / "hf_ds"
    assert [c.name for c in res.configs] == ["synthqa", "finalize"] and res.empty_stages == ["review"]
    assert res.default == "finalize"
    assert sorted(datasets.get_dataset_config_names(str(out))) == ["finalize", "synthqa"]
    default = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "c0"))
    fin = datasets.load_dataset(str(out), "finalize", cache_dir=str(tmp_path / "c1"))
    assert set(default) == set(fin) == {"dev", "test"}
    table = root.read_stage("finalize")
    n_split = {s: table["split"].to_pylist().count(s) for s in ("dev", "test")}
    assert {k: len(v) for k, v in fin.items()} == n_split and min(n_split.values()) > 0
    assert set(fin["test"]["answer"]) == {"NA"} and set(fin["dev"]["answer"]) <= set("ABCD")
    assert fin["dev"].features["options"] == datasets.List(datasets.Value("string"))
    by_id = {r["question_id"]: r for r in table.to_pylist()}
    for r in fin["dev"]:
        src = by_id[r["question_id"]]
        assert {k: r[k] for k in ("question", "options", "answer", "category")} == \
               {k: src[k] for k in ("question", "options", "answer", "category")}
    sq = datasets.load_dataset(str(out), "synthqa", split="train", cache_dir=str(tmp_path / "c2"))
    assert len(sq) == 7 and sorted(sq["question_id"]) == sorted(root.read_stage("synthqa")["question_id"].to_pylist())
    assert sq.features["logic_dimension"] == datasets.Value("int32")
    # the card: YAML front matter parsed by huggingface_hub
    card = DatasetCard.load(out / "README.md")
    assert card.data.license == "cc-by-4.0" and card.data.pretty_name == "unit run"
    cfgs = {c["config_name"]: c for c in card.data.configs}
    assert cfgs["finalize"].get("default") is True and "review" not in cfgs
    infos = {i["config_name"]: i for i in card.data.dataset_info}
    assert {s["name"]: s["num_examples"] for s in infos["finalize"]["splits"]} == n_split
    assert {f["name"] for f in infos["synthqa"]["features"]} == set(Q_SCHEMA.names)
    assert "`review`" in card.text and "Licence" in card.text and "_manifest.json" in card.text
    # keeping the answers is explicit; re-exporting into the same folder replaces it
    export_hf(root, out, hide_test_answers=False)
    fin = datasets.load_dataset(str(out), "finalize", split="test", cache_dir=str(tmp_path / "c3"))
    assert set(fin["answer"]) <= set("ABCD")


def test_export_hf_refuses_a_foreign_folder(root, tmp_path):
    from stages.export.hf import export_hf

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        export_hf(root, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_cli_export_hf(root, tmp_path):
    from tests._cli import invoke

    res = invoke("export", "hf", "--out", str(tmp_path / "root"), "--to", str(tmp_path / "ds"), "--license", "mit")
    assert "2 configs (default finalize)" in " ".join(res.output.split())
    summary = json.loads((tmp_path / "ds" / "export_summary.json").read_text())
    assert summary["empty_stages"] == ["review"]
    assert len(datasets.load_dataset(str(tmp_path / "ds"), "synthqa", split="train", cache_dir=str(tmp_path / "c"))) == 7


def test_export_hf_streams_shards_into_several_files_per_split(tmp_path, monkeypatch):
    """A stage of many shards is written shard by shard (never read whole) into row groups of ROW_GROUP_ROWS
    rows and a split's next file once a file is max_file_bytes; ``datasets`` loads every row, in shard order,
    from the card's globs. Small sizes here stand in for 1000 rows and 500 MB."""
    import stages.export.hf as hf

    r = OutputRoot(tmp_path / "root")
    for shard in range(12):
        write_stage(r, "synthqa", shard, _questions(7, f"c{shard}", f"v{shard}"))
    write_stage(r, "finalize", 0, build_benchmark(_reviews(40, 5), _questions(3, "s", "sv"), FinalizeConfig(seed=1)),
                MB_SCHEMA)
    monkeypatch.setattr(hf, "ROW_GROUP_ROWS", 10)

    def whole(self, stage, schema=None):
        raise AssertionError(f"export read all of {stage} at once")

    monkeypatch.setattr(OutputRoot, "read_stage", whole)
    out = tmp_path / "ds"
    res = hf.export_hf(r, out, max_file_bytes=6_000)
    monkeypatch.undo()
    files = sorted((out / "data" / "synthqa").iterdir())
    n = len(files)
    assert n > 1 and [f.name for f in files] == [f"train-{i:05d}-of-{n:05d}.parquet" for i in range(n)]
    groups = [pq.ParquetFile(f).metadata.row_group(g).num_rows for f in files
              for g in range(pq.ParquetFile(f).metadata.num_row_groups)]
    assert sum(groups) == 84 and all(g == 10 for g in groups[:-1]) and 0 < groups[-1] <= 10, groups
    for f in files[:-1]:  # each file is cut after the row group that takes it past 6 kB, not later
        md = pq.ParquetFile(f).metadata
        last = md.row_group(md.num_row_groups - 1).column(0)
        assert f.stat().st_size >= 6_000 and min(o for o in (last.dictionary_page_offset, last.data_page_offset)
                                                 if o is not None) < 6_000
    want = r.read_stage("synthqa")["question_id"].to_pylist()
    sq = datasets.load_dataset(str(out), "synthqa", split="train", cache_dir=str(tmp_path / "c"))
    assert sq["question_id"] == want
    fin = datasets.load_dataset(str(out), "finalize", cache_dir=str(tmp_path / "c2"))
    table = r.read_stage("finalize")
    n_split = {s: table["split"].to_pylist().count(s) for s in ("dev", "test")}
    assert {k: len(v) for k, v in fin.items()} == n_split == {s: res.configs[-1].splits[s] for s in ("dev", "test")}
    assert len(list((out / "data" / "finalize").glob("test-*.parquet"))) > 1 and set(fin["test"]["answer"]) == {"NA"}
    card = DatasetCard.load(out / "README.md")
    paths = {c["config_name"]: c["data_files"] for c in card.data.configs}
    assert paths["synthqa"] == [{"split": "train", "path": "data/synthqa/train-*.parquet"}]


def test_export_hf_casts_shards_of_an_older_schema_and_names_one_it_cannot(tmp_path):
    """Shards written by different versions: the first shard's columns are the config's; later shards whose
    types differ are cast to them (consecutive shards of one schema go through as one table); a shard that
    cannot be cast stops the export with its number. ``datasets`` loads the cast rows in shard order."""
    import pyarrow as pa

    from stages.export.hf import export_hf

    r = OutputRoot(tmp_path / "root")

    def put(shard: int, n: pa.Array) -> None:
        table = pa.table({"status": ["ok"] * len(n), "error": pa.array([None] * len(n), pa.string()), "n": n})
        r.makedirs(r.stage_dir("tag"))
        pq.write_table(table, r.shard_file("tag", shard))
        r.write_marker("tag", shard, {"stage": "tag", "shard": shard, "rows": len(n), "ok": len(n), "error": 0,
                                      "skipped": 0, "config_hash": "x", "inputs": {}, "fingerprint": f"f{shard}"})

    put(0, pa.array([1, 2], pa.int64()))
    put(1, pa.array([3], pa.int64()))
    put(2, pa.array([4, 5], pa.int32()))  # an older writer's narrower type
    put(3, pa.array([6], pa.int32()))
    put(4, pa.array([7], pa.int64()))
    out = tmp_path / "ds"
    res = export_hf(r, out, stages=["tag"])
    assert res.configs[0].splits == {"train": 7}
    got = datasets.load_dataset(str(out), "tag", split="train", cache_dir=str(tmp_path / "c"))
    assert got["n"] == [1, 2, 3, 4, 5, 6, 7] and got.features["n"].dtype == "int64"
    put(5, pa.array(["eight"], pa.string()))
    with pytest.raises(ValueError, match=r"stage 'tag': shard 5's columns differ from the first shard's"):
        export_hf(r, tmp_path / "ds2", stages=["tag"])
