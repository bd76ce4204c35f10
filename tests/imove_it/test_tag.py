"""tag stage: blocklist logic, exactness on synthetic videos with a ground-truth tagger, error rows, tiny RAM++."""
from __future__ import annotations

import dataclasses

import pytest

from schemas._base import from_table
from schemas.tags import SCHEMA, ClipTags
from stages.base import install_expert_override
from stages.runner import run_shard
from stages.imove_it.tag import (DEFAULT_BLOCKLIST_FILE, DEFAULT_CLIP_VOCABULARY_FILE, PROFILES, STAGE, TAGGER_EXPERT,
                        TagConfig, blocked, load_blocklist, read_word_list, split_tags)
from storage.root import OutputRoot
from tests._imove_doubles import ALIAS_TAG, STATIC_TAGS, all_clips, oracle, video_of
from tests._stage_tables import write_stage


def test_shipped_blocklist_has_the_papers_static_categories():
    words = set(read_word_list(DEFAULT_BLOCKLIST_FILE))
    assert {"sky", "cloud", "road", "room", "wall", "floor", "grass"} <= words
    assert not {"person", "dog", "car", "ball"} & words


def test_split_tags_blocklist_head_noun_dedup_and_caps():
    bl = frozenset({"sky", "road"})
    preds = [("Dog", 0.9), ("blue sky", 0.8), ("dog", 0.95), ("road sign", 0.7), ("sky", 0.6), ("cat", 0.3),
             ("bird", 0.5)]
    kept, dropped = split_tags(preds, bl)
    assert [k["tag"] for k in kept] == ["dog", "road sign", "bird", "cat"]
    assert kept[0]["score"] == 0.95  # duplicate after normalising keeps the best score
    assert [d["tag"] for d in dropped] == ["blue sky", "sky"]
    kept, dropped = split_tags(preds, bl, match_head_noun=False, min_score=0.4, max_tags=2)
    assert [k["tag"] for k in kept] == ["dog", "blue sky"]
    assert [d["tag"] for d in dropped] == ["sky"]
    assert blocked("Cloudy  SKY.", bl) and not blocked("skyscraper", bl)


def test_blocklist_file_extra_and_allow(tmp_path):
    f = tmp_path / "block.txt"
    f.write_text("# my list\nsky\nwater  # inline comment\n\n")
    cfg = TagConfig(blocklist_file=str(f), block_extra=("Tree",), block_allow=("water",))
    assert load_blocklist(cfg) == frozenset({"sky", "tree"})
    with pytest.raises(FileNotFoundError, match="blocklist_file"):
        load_blocklist(TagConfig(blocklist_file=str(tmp_path / "missing.txt")))


def _root(tmp_path, clips):
    root = OutputRoot(str(tmp_path / "out"))
    write_stage(root, "scenes", 0, clips)
    return root


def test_tag_stage_is_exact_on_synthetic_videos(tmp_path):
    o = oracle()
    clips = all_clips(o)
    root = _root(tmp_path, clips)
    install_expert_override(TAGGER_EXPERT, o.tagger())
    cfg = TagConfig(batch_size=4)
    out = run_shard(STAGE, root, cfg, 0)
    assert (out.rows, out.ok, out.error) == (len(clips), len(clips), 0)
    rows = {r.clip_id: r for r in from_table(root.read_shard("tag", 0), ClipTags)}
    assert root.read_shard("tag", 0).schema.equals(SCHEMA, check_metadata=False)
    for c in clips:
        r = rows[c.clip_id]
        v = video_of(o, c.video_path)
        cats = {ob.category for ob, _ in v.objects_at(c.start_frame)}
        assert {t["tag"] for t in r.tags} == cats | {ALIAS_TAG}
        assert [t["score"] for t in r.tags] == sorted((t["score"] for t in r.tags), reverse=True)
        assert {t["tag"] for t in r.dropped_tags} == {t for t, _ in STATIC_TAGS}
        assert (r.width, r.height) == (v.truth.width, v.truth.height)
        assert r.frame_t_s == pytest.approx(c.start_s, abs=1e-6)
        assert (r.start_s, r.end_s, r.start_frame, r.end_frame) == (c.start_s, c.end_s, c.start_frame, c.end_frame)
        assert r.tagger == "ram_plus" and r.expert.startswith("ram_plus:")
    assert o.calls["tag"] == -(-len(clips) // 4)  # batched
    # A completed shard is skipped; a forced re-run gives the same rows.
    assert run_shard(STAGE, root, cfg, 0).action == "skipped-complete"
    run_shard(STAGE, root, cfg, 0, force=True)
    again = {r.clip_id: r for r in from_table(root.read_shard("tag", 0), ClipTags)}
    assert ({k: (r.tags, r.dropped_tags) for k, r in again.items()}
            == {k: (r.tags, r.dropped_tags) for k, r in rows.items()})
    # Allowing "sky" back keeps it (and "blue sky", whose head noun it is) unless listed itself.
    run_shard(STAGE, root, TagConfig(block_allow=("sky",), block_extra=("blue sky",)), 0)
    r = from_table(root.read_shard("tag", 0), ClipTags)[0]
    assert "sky" in {t["tag"] for t in r.tags} and {t["tag"] for t in r.dropped_tags} == {"blue sky"}


def test_unreadable_clip_is_an_error_row_not_a_shard_failure(tmp_path):
    o = oracle()
    good = all_clips(o)[0]
    bad = dataclasses.replace(good, clip_id="bad-clip", video_path=str(tmp_path / "gone.mp4"))
    past_end = dataclasses.replace(good, clip_id="past-end", start_s=100.0, end_s=101.0)
    root = _root(tmp_path, [good, bad, past_end])
    install_expert_override(TAGGER_EXPERT, o.tagger())
    out = run_shard(STAGE, root, TagConfig(), 0)
    assert (out.ok, out.error) == (1, 2)
    rows = {r.clip_id: r for r in from_table(root.read_shard("tag", 0), ClipTags)}
    assert "bad-clip" in rows["bad-clip"].error and "gone.mp4" in rows["bad-clip"].error
    assert "no frame decoded" in rows["past-end"].error
    assert rows["bad-clip"].tags == [] and rows[good.clip_id].tags


@pytest.mark.parametrize("tagger", ["ram_plus", "clip"])
def test_tiny_profile_with_real_tiny_tagger(tmp_path, tagger):
    o = oracle()
    clips = all_clips(o)[:2]
    root = _root(tmp_path, clips)
    cfg = TagConfig.model_validate({**PROFILES["tiny"], "tagger": tagger})
    assert cfg.ram_plus.model_id == "tiny://ram_plus" and cfg.clip.model_id == "tiny://clip"
    out = run_shard(STAGE, root, cfg, 0)
    table = root.read_shard("tag", 0)
    assert table.schema.equals(SCHEMA, check_metadata=False)
    assert out.rows == len(clips) and out.error == 0
    for r in from_table(table, ClipTags):
        assert 0 < len(r.tags) <= 3 and all(not blocked(t["tag"], load_blocklist(cfg)) for t in r.tags)
        assert r.expert == f"{tagger}:tiny://{tagger}" and r.tagger == tagger
        if tagger == "clip":
            assert {t["tag"] for t in r.tags + r.dropped_tags} <= set(read_word_list(DEFAULT_CLIP_VOCABULARY_FILE))


def test_tag_stage_runs_on_a_reference_layout_checkpoint(tmp_path):
    """A checkpoint built from the hand-written reference layout (random values, miniature geometry) loads
    strictly through the production loader and the stage tags with it."""
    import torch

    from experts.ram_plus import TAG_LIST_FILE, TAG_THRESHOLD_FILE
    from experts.ram_plus.tiny import TINY_TAGS
    from tests._ram_plus_layout import TINY, random_official_state_dict

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"model": random_official_state_dict(TINY, seed=11)}, ckpt / "ram_plus_reference_layout.pth")
    (ckpt / TAG_LIST_FILE).write_text("\n".join(TINY_TAGS) + "\n", encoding="utf-8")
    (ckpt / TAG_THRESHOLD_FILE).write_text("\n".join("0.0" for _ in TINY_TAGS) + "\n", encoding="utf-8")
    o = oracle()
    clips = all_clips(o)[:2]
    root = _root(tmp_path, clips)
    cfg = TagConfig.model_validate({"tagger": "ram_plus", "max_tags": 3,
                                    "ram_plus": {"model_id": str(ckpt), "variant": "tiny", "device": "cpu"}})
    out = run_shard(STAGE, root, cfg, 0)
    assert (out.rows, out.ok, out.error) == (len(clips), len(clips), 0)
    for r in from_table(root.read_shard("tag", 0), ClipTags):
        # every tag passes a 0.0 threshold, so the 3 best unblocked ones are kept
        assert len(r.tags) == 3 and {t["tag"] for t in r.tags} <= set(TINY_TAGS)
        assert r.expert == f"ram_plus:{ckpt}"


def test_batched_tiny_ram_plus_matches_per_clip_and_isolates_an_unreadable_clip(tmp_path):
    """Tiny RAM++ through the production loader: 3 clips and an unreadable one in the middle of the first batch,
    tagged one clip per call with inline decoding, then 3 per call decoded 2 clips ahead. Same tags (order
    included) and scores within 1e-4: a batched forward pass may use other matmul kernels / summation orders
    than a single-image one (float32); RAM++ has no cross-image interaction, so nothing else can differ."""
    o = oracle()
    clips = all_clips(o)[:3]
    bad = dataclasses.replace(clips[0], clip_id="unreadable", video_path=str(tmp_path / "gone.mp4"))
    shard = clips[:1] + [bad] + clips[1:]

    def run(where, **kw):
        root = _root(tmp_path / where, shard)
        out = run_shard(STAGE, root, TagConfig.model_validate({**PROFILES["tiny"], **kw}), 0)
        return out, from_table(root.read_shard("tag", 0), ClipTags)

    out1, single = run("single", batch_size=1, prefetch_depth=0)
    out3, batched = run("batched", batch_size=3, prefetch_depth=2)
    for out in (out1, out3):
        assert (out.ok, out.error) == (3, 1)
    assert [r.clip_id for r in batched] == [c.clip_id for c in shard] == [r.clip_id for r in single]
    for a, b in zip(single, batched):
        assert (a.status, a.width, a.height, a.frame_t_s) == (b.status, b.width, b.height, b.frame_t_s)
        for key in ("tags", "dropped_tags"):
            assert [t["tag"] for t in getattr(a, key)] == [t["tag"] for t in getattr(b, key)]
            assert [t["score"] for t in getattr(b, key)] == pytest.approx([t["score"] for t in getattr(a, key)],
                                                                            abs=1e-4)
    assert "gone.mp4" in batched[1].error
    assert TagConfig(prefetch_depth=0).config_hash() == TagConfig().config_hash()
