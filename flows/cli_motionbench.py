"""MotionBench commands: import human descriptions, the review queue, the official export, evaluation.

    motionforge import descriptions FILE --out ROOT
    motionforge review export --out ROOT --to FILE(.jsonl|.txt) [--all]
    motionforge review import FILE --out ROOT [--reviewer ID]
    motionforge review serve --out ROOT [--host 127.0.0.1] [--port 8765] [--token T]
    motionforge export motionbench --out ROOT --to DIR
    motionforge eval score --meta META --responses RESP.json [--answers KEY] [--json]
    motionforge eval run --model SPEC | --checkpoint DIR [--merge] --meta META --videos DIR [--num-frames N | --fps F] [--text-only | --first-frame]

Wiring only: the logic is in stages.motionbench.describe / stages.motionbench.review /
stages.export.motionbench / stages.evaluation.motionbench, and the review web server in dashboards.server.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from flows.cli_groups import eval_app, export_app, import_app, review_app

console = Console(stderr=True)


def _fail(msg: str) -> None:
    console.print(f"[red]{msg}[/]", soft_wrap=True)
    raise typer.Exit(1)


# -- model specs for eval run ------------------------------------------------------------------------------
def parse_model_spec(spec: str, base_url: str | None = None, api_key_env: str | None = None):
    """``openai:<model>`` (an OpenAI-compatible endpoint), a ``.json``/``.yaml`` file of VlmSpec fields, or a
    transformers model id / local path / ``tiny://qwen2_vl``."""
    from experts.vlm import VlmSpec

    if spec.endswith((".json", ".yaml", ".yml")) and Path(spec).is_file():
        from flows.config import read_config_file

        return VlmSpec.model_validate(read_config_file(spec))
    extra = {}
    if base_url:
        extra["base_url"] = base_url
    if api_key_env is not None:
        extra["api_key_env"] = api_key_env or None
    if spec.startswith("openai:"):
        return VlmSpec(model_id=spec[len("openai:"):], backend="openai", max_new_tokens=16, **extra)
    return VlmSpec(model_id=spec, backend="transformers", max_new_tokens=16, **extra)


def _print_score(result: dict) -> None:
    from rich.table import Table

    t = Table(title="MotionBench accuracy")
    t.add_column("category")
    t.add_column("accuracy", justify="right")
    t.add_column("correct / scored", justify="right")
    for name, acc in result["per_category"].items():
        c = result["per_category_counts"][name]
        t.add_row(name, "-" if acc is None else f"{acc:.3f}", f"{c['correct']} / {c['scored']}")
    overall = result["overall"]
    t.add_row("[bold]overall[/]", "-" if overall is None else f"[bold]{overall:.3f}[/]",
              f"{result['correct']} / {result['scored']}")
    Console().print(t)
    Console().print(f"scored {result['scored']}, unanswered {result['unanswered']} "
                    f"(missing from responses {result['missing']}), not scored (NA) {result['not_scored']}")


def score_files(meta: Path, responses: Path, answers: Path | None) -> dict:
    from stages.evaluation.motionbench import meta_questions, read_answer_key, read_meta, score

    try:
        resp = json.loads(Path(responses).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{responses}: not JSON ({exc.msg}); expected an object uid -> reply") from None
    if not isinstance(resp, dict):
        raise ValueError(f"{responses}: expected a JSON object mapping uid -> reply, got {type(resp).__name__}")
    key = read_answer_key(answers) if answers else None
    return score(meta_questions(read_meta(meta)), {str(k): v for k, v in resp.items()}, key).as_dict()


def register(app: typer.Typer) -> None:
    @import_app.command("descriptions")
    def _import_descriptions(
        file: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSONL: clip_id or video_path "
                                    "[+ start_s/end_s], dynamic_description, first_frame_description, annotator"),
        out: str = typer.Option(..., "--out", "-o", help="output root"),
    ):
        """Store human dynamic descriptions; `describe` uses them instead of the VLM for those clips."""
        from stages.motionbench.describe import read_import_file, store_import
        from storage.root import OutputRoot

        try:
            items = read_import_file(file)
        except ValueError as exc:
            _fail(str(exc))
        if not items:
            _fail(f"{file} holds no descriptions")
        path = store_import(OutputRoot(out), items)
        console.print(f"stored {len(items)} human descriptions as {path}; describe shards are now stale: "
                      f"motionforge run-stage describe --out {out} (then qgen, ffilter, review, finalize)")

    @review_app.command("export")
    def _review_export(
        out: str = typer.Option(..., "--out", "-o", help="output root"),
        to: Path = typer.Option(..., "--to", help=".jsonl (machine) or .txt (hand-editable review sheet)"),
        include_decided: bool = typer.Option(False, "--all", help="also list questions already decided"),
    ):
        """Write the questions waiting for review, with clip paths and first-frame images."""
        from stages.motionbench.review import check_queue_path, first_frame_of_item, pending_items, write_first_frames, write_queue
        from storage.root import OutputRoot

        try:
            check_queue_path(to)
        except ValueError as exc:
            _fail(str(exc))
        root = OutputRoot(out)
        items = pending_items(root, include_decided)
        write_first_frames(root, items, first_frame_of_item)
        write_queue(to, items)
        missing = sum(1 for it in items if it["first_frame"] is None)
        console.print(f"{len(items)} question(s) to review -> {to}"
                      + (f" ({missing} without a first-frame image: video unreadable)" if missing else ""))
        if items:
            console.print(f"then: motionforge review import {to} --out {out} --reviewer YOUR_ID")

    @review_app.command("import")
    def _review_import(
        file: Path = typer.Argument(..., exists=True, dir_okay=False, help="a filled-in export (.jsonl or .txt)"),
        out: str = typer.Option(..., "--out", "-o", help="output root"),
        reviewer: Optional[str] = typer.Option(None, "--reviewer", help="reviewer id for items that name none"),
    ):
        """Record accept / reject / edit decisions (all or nothing); review shards they touch become stale."""
        from stages.motionbench.review import import_decisions, store_decisions
        from storage.root import OutputRoot

        root = OutputRoot(out)
        try:
            by_shard, undecided, problems = import_decisions(root, file, reviewer)
        except ValueError as exc:
            _fail(str(exc))
        if problems:
            _fail(f"{len(problems)} problem(s); nothing was imported. Fix the file and import it again:\n  "
                  + "\n  ".join(problems[:30]))
        n = sum(len(v) for v in by_shard.values())
        if n == 0:
            console.print(f"no decisions in {file} ({undecided} question(s) still blank)")
            return
        store_decisions(root, by_shard)
        counts: dict[str, int] = {}
        for ds in by_shard.values():
            for d in ds:
                counts[d.decision] = counts.get(d.decision, 0) + 1
        console.print(f"recorded {n} decision(s) {counts} in {len(by_shard)} shard(s); {undecided} left pending. "
                      f"Apply them: motionforge run-stage review --out {out} && motionforge run-stage finalize --out {out}")

    @review_app.command("serve")
    def _review_serve(
        out: str = typer.Option(..., "--out", "-o", help="output root"),
        host: str = typer.Option("127.0.0.1", "--host", help="address to bind; anything but loopback needs a token"),
        port: int = typer.Option(8765, "--port"),
        token: Optional[str] = typer.Option(None, "--token", envvar="MOTIONFORGE_REVIEW_TOKEN",
                                            help="access token (default: none on 127.0.0.1, a random one elsewhere)"),
    ):
        """Review in the browser (accept / reject / edit, several reviewers at once) and explore the dataset."""
        from dashboards.server import serve
        from storage.root import OutputRoot

        if not OutputRoot(out).completed_shards("qgen") and not OutputRoot(out).stages_present():
            _fail(f"{out}: no stage tables here (wrong --out?)")
        serve(out, host=host, port=port, token=token)

    @export_app.command("motionbench")
    def _export_motionbench(
        out: str = typer.Option(..., "--out", "-o", help="output root of a pipeline run"),
        to: Path = typer.Option(..., "--to", help="release folder: video_info.meta.jsonl, test_answers.json, videos/"),
        workers: Optional[int] = typer.Option(None, "--workers", min=1,
                                              help="clips cut at once (default: one per core)"),
    ):
        """The benchmark as a release folder: one question per meta line (exact category; the official scorer
        and lmms-eval read it), test answers NA plus the answer key, and each clip cut into videos/."""
        from schemas._base import from_table
        from schemas.motionbench import SCHEMA, BenchmarkQuestion
        from stages.export.motionbench import export_release
        from storage.root import OutputRoot

        root = OutputRoot(out)
        if not root.is_local:
            _fail(f"{out}: the MotionBench export cuts clips with ffmpeg and needs a local output root")
        try:
            table = root.read_stage("finalize", SCHEMA)
        except FileNotFoundError as exc:
            _fail(f"{exc}; run the pipeline through finalize first")
        rows = from_table(table, BenchmarkQuestion)
        if not rows:
            _fail(f"{out}: finalize has no questions (is review required and nothing accepted yet?)")
        res = export_release(rows, to, workers=workers)
        console.print(f"{res.questions} questions over {res.clips} clips (dev {res.dev}, test {res.test}) -> "
                      f"{res.meta}; clips -> {res.videos}; test answer key -> {res.answer_key}")
        if res.dropped:
            console.print(f"[yellow]{len(res.dropped)} question(s) left out: their clip could not be written "
                          f"(reasons in {Path(to) / 'export_errors.json'})[/]")
        if res.questions == 0:
            raise typer.Exit(1)

    @eval_app.command("score")
    def _eval_score(
        meta: Path = typer.Option(..., "--meta", exists=True, dir_okay=False, help="video_info.meta.jsonl"),
        responses: Path = typer.Option(..., "--responses", exists=True, dir_okay=False, help="JSON uid -> raw reply"),
        answers: Optional[Path] = typer.Option(None, "--answers", exists=True, dir_okay=False,
                                               help="answer key (uid -> letter) for NA questions"),
        as_json: bool = typer.Option(False, "--json", help="print JSON"),
    ):
        """Accuracy per category, overall, number scored and unanswered."""
        try:
            result = score_files(meta, responses, answers)
        except (ValueError, OSError) as exc:
            _fail(str(exc))
        if as_json:
            print(json.dumps(result, indent=1))
        else:
            _print_score(result)

    @eval_app.command("run")
    def _eval_run(
        model: Optional[str] = typer.Option(None, "--model", help="tiny://qwen2_vl, an HF id / local path, "
                                            "openai:<model>, or a .json/.yaml VlmSpec file"),
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", file_okay=False, help="instead of --model: a "
                                                  "`motionforge train` run's final/ or checkpoint-N/ folder"),
        merge: bool = typer.Option(False, "--merge", help="with --checkpoint: merge the LoRA adapter first"),
        meta: Path = typer.Option(..., "--meta", exists=True, dir_okay=False),
        videos: Optional[Path] = typer.Option(None, "--videos", help="folder holding the benchmark videos"),
        num_frames: Optional[int] = typer.Option(None, "--num-frames", help="N uniform frames per video (default 16)"),
        fps: Optional[float] = typer.Option(None, "--fps", help="sample at this frame rate instead"),
        text_only: bool = typer.Option(False, "--text-only", help="no frames: the text-only baseline"),
        first_frame_only: bool = typer.Option(False, "--first-frame", help="only the first frame"),
        responses_out: Optional[Path] = typer.Option(None, "--responses", help="where to write uid -> reply JSON"),
        answers: Optional[Path] = typer.Option(None, "--answers", exists=True, dir_okay=False),
        base_url: Optional[str] = typer.Option(None, "--base-url", help="OpenAI-compatible endpoint"),
        api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="env var holding the key ('' for none)"),
        batch_size: int = typer.Option(8, "--batch-size"),
        short_side: Optional[int] = typer.Option(448, "--short-side", help="resize frames to this short side"),
        limit: Optional[int] = typer.Option(None, "--limit", help="only the first N questions"),
        as_json: bool = typer.Option(False, "--json"),
    ):
        """Run a VLM over the benchmark, write its replies, then score them."""
        from rich.progress import Progress

        from experts.vlm import load_vlm
        from stages.evaluation.motionbench import build_inputs, meta_questions, read_meta, resolve_video, run_model

        if text_only and first_frame_only:
            _fail("--text-only and --first-frame exclude each other")
        if num_frames is not None and fps is not None:
            _fail("give --num-frames or --fps, not both")
        if (model is None) == (checkpoint is None):
            _fail("give --model or --checkpoint (exactly one)")
        if videos is None and (meta.parent / "videos").is_dir():
            videos = meta.parent / "videos"  # the release folder written by `export motionbench`
        questions = meta_questions(read_meta(meta))[:limit]
        inputs = build_inputs(questions, videos, text_only)
        if checkpoint is not None:
            from experts.vlm import VlmSpec, vlm_from_loaded
            from stages.training.evaluate import load_checkpoint

            ck_model, ck_processor, ck_cfg = load_checkpoint(checkpoint, merge=merge)
            vlm = vlm_from_loaded(ck_model, ck_processor, VlmSpec(model_id=ck_cfg.model.model_id, max_new_tokens=16),
                                  name=str(checkpoint))
            model = f"{Path(checkpoint).parent.name}_{Path(checkpoint).name}"
        else:
            vlm = load_vlm(parse_model_spec(model, base_url, api_key_env))
        n = 1 if first_frame_only else (None if fps else (num_frames or 16))

        def load_frames(inp):
            from experts.video import read_frames

            path = resolve_video(inp.video_path, videos)
            start = inp.start_s or 0.0
            frames = read_frames(path, start, inp.end_s, fps=None if first_frame_only else fps, num_frames=n,
                                 short_side=short_side)
            if not frames:
                raise ValueError(f"no frames decoded from {path}")
            return [f.image for f in frames[:1]] if first_frame_only else [f.image for f in frames]

        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("questions", total=len(inputs))
            replies, errors = run_model(inputs, vlm, load_frames, as_video=not first_frame_only, batch_size=batch_size,
                                        progress=lambda d, t: bar.update(task, completed=d))
        out_path = responses_out or meta.with_name(f"responses_{Path(model).name.replace(':', '_')}.json")
        out_path.write_text(json.dumps(replies, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        if errors:
            err_path = out_path.with_suffix(".errors.json")
            err_path.write_text(json.dumps(errors, indent=1) + "\n", encoding="utf-8")
            console.print(f"[yellow]{len(errors)} question(s) got no reply (counted unanswered); reasons in {err_path}[/]")
        console.print(f"replies -> {out_path}")
        result = score_files(meta, out_path, answers)
        if as_json:
            print(json.dumps(result, indent=1))
        else:
            _print_score(result)


__all__ = ["register", "parse_model_spec", "score_files"]
