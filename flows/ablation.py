"""Compression ablation (MotionBench section 5.2, Tables 7-8): one trained-and-evaluated configuration per
compression method and rate, all on the same data, written as the paper's method x rate table.

Two settings, as in the paper:

* ``fixed_decoder_length`` (Table 7): the decoder always sees ``decoder_slots`` (= N_input / k) slots of
  video tokens, so a rate-k method reads k times more frames of the same clip.
* ``fixed_input_frames`` (Table 8): the encoder always reads ``input_slots`` slots; a higher k leaves fewer
  decoder tokens. Rates that do not divide ``input_slots`` are left out of that table.

The train-and-evaluate step is pluggable (``train_eval``: ``"module:function"``), called with one
:class:`AblationCell` and returning ``{metric: value}``. The default, :func:`synthetic_motion_probe`,
fine-tunes the configured VLM (the tiny Qwen2-VL miniature by default) on synthetic four-option motion
questions (:mod:`stages.synth.motion_clips`) and reports answer accuracy; the issue-17 trainer plugs in
the same way for real data. Each finished cell is written at once (``cells/<method>-k<k>.json``), so a
re-run after a crash skips the cells already done; ``force`` re-runs them.
"""
from __future__ import annotations

import csv
import importlib
import io
import math
import time
from typing import Any, Callable, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from pydantic import BaseModel, ConfigDict, Field, model_validator

from experts.model_parts.config import METHOD_LABELS, PAPER_METHODS, TemporalFusionConfig, TemporalMethod
from storage.root import OutputRoot

DEFAULT_STEP = "flows.ablation:synthetic_motion_probe"


class AblationConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    out: str = Field(description="output root; results go under <out>/ablation/<name>/")
    name: str = "compression"
    setting: Literal["fixed_decoder_length", "fixed_input_frames"] = "fixed_decoder_length"
    methods: tuple[TemporalMethod, ...] = PAPER_METHODS  # the rows of MotionBench Tables 7-8
    rates: tuple[int, ...] = (2, 4, 6, 8)
    decoder_slots: int = Field(4, ge=1)  # Table 7: N_input / k = 4 (or 8)
    input_slots: int = Field(16, ge=1)  # Table 8: N_input = 16
    train_eval: str = DEFAULT_STEP
    # passed through to the step untouched (model id, data, optimiser settings, device ...)
    step_params: dict[str, Any] = Field(default_factory=dict)
    force: bool = False

    @model_validator(mode="after")
    def _check(self) -> "AblationConfig":
        if any(k < 2 for k in self.rates):
            raise ValueError(f"compression rates must be >= 2, got {self.rates}")
        if not self.methods:
            raise ValueError("no methods to compare")
        return self


class AblationCell(BaseModel):
    """One configuration of the grid: what the train-and-evaluate step is asked to run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: TemporalMethod
    rate: int
    input_slots: int  # temporal slots the vision encoder reads per clip
    decoder_slots: int  # slots' worth of video tokens the decoder sees
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def fusion(self) -> TemporalFusionConfig:
        return TemporalFusionConfig(method=self.method, rate=self.rate)

    @property
    def key(self) -> str:
        return f"{self.method}-k{self.rate}"


def plan_cells(cfg: AblationConfig) -> list[AblationCell]:
    cells = []
    for k in cfg.rates:
        if cfg.setting == "fixed_decoder_length":
            input_slots, decoder_slots = cfg.decoder_slots * k, cfg.decoder_slots
        else:
            if cfg.input_slots % k:
                continue
            input_slots, decoder_slots = cfg.input_slots, cfg.input_slots // k
        cells.extend(AblationCell(method=m, rate=k, input_slots=input_slots, decoder_slots=decoder_slots,
                                  params=dict(cfg.step_params)) for m in cfg.methods)
    if not cells:
        raise ValueError(f"no rate in {cfg.rates} divides input_slots={cfg.input_slots}")
    return cells


def load_step(dotted: str) -> Callable[[AblationCell], dict[str, float]]:
    module, _, name = dotted.partition(":")
    if not module or not name:
        raise ValueError(f"train_eval must look like 'package.module:function', got {dotted!r}")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"{dotted}: no callable {name!r} in {module}")
    return fn


def synthetic_motion_probe(cell: AblationCell) -> dict[str, float]:
    """Default step: fine-tune a VLM with the cell's fusion on synthetic motion clips, score answers, and
    report the speed of both loops (``train_samples_per_s``, ``eval_samples_per_s``; ``peak_gpu_mib`` on CUDA)
    beside the decoder's video tokens per clip (see :class:`experts.model_parts.probe.ProbeResult`).

    params: ``model_id`` (tiny://qwen2_vl), ``n_train`` (32), ``n_eval`` (32), ``steps`` (20), ``lr``
    (3e-3), ``batch_size`` (8), ``seed`` (0), ``device`` (auto), ``frame_size`` (56). Train and eval clips
    come from different seeds; every cell sees the same clips, sampled at its own frame count."""
    from experts.model_parts.probe import train_and_evaluate
    from stages.synth.motion_clips import OPTION_LETTERS, QUESTION, motion_clip_set

    p = {"model_id": "tiny://qwen2_vl", "n_train": 32, "n_eval": 32, "steps": 20, "lr": 3e-3, "batch_size": 8,
         "seed": 0, "device": "auto", "frame_size": 56, "frames_per_slot": 2, **cell.params}
    n_frames = cell.input_slots * int(p["frames_per_slot"])
    train = [(c.frames, c.answer_index) for c in motion_clip_set(int(p["seed"]), int(p["n_train"]), n_frames, int(p["frame_size"]))]
    evaluate = [(c.frames, c.answer_index) for c in motion_clip_set(int(p["seed"]) + 1, int(p["n_eval"]), n_frames, int(p["frame_size"]))]
    result = train_and_evaluate(str(p["model_id"]), cell.fusion, train, evaluate, QUESTION, OPTION_LETTERS,
                                steps=int(p["steps"]), lr=float(p["lr"]), batch_size=int(p["batch_size"]),
                                seed=int(p["seed"]), device=str(p["device"]))
    return result.as_dict()


def _cell_path(root: OutputRoot, cfg: AblationConfig, cell: AblationCell) -> str:
    return root.path("ablation", cfg.name, "cells", f"{cell.key}.json")


@task(name="ablation-cell", cache_policy=NONE, retries=1)
def run_cell(cfg: AblationConfig, cell: AblationCell) -> dict:
    root = OutputRoot(cfg.out)
    path = _cell_path(root, cfg, cell)
    done = None if cfg.force else root.read_json(path)
    if done is not None and done.get("cell") == cell.model_dump(mode="json"):
        return done
    step = load_step(cfg.train_eval)
    t0 = time.perf_counter()
    try:
        metrics = {k: float(v) for k, v in step(cell).items()}
        record = {"cell": cell.model_dump(mode="json"), "status": "ok", "error": None, "metrics": metrics,
                  "seconds": time.perf_counter() - t0, "train_eval": cfg.train_eval}
    except Exception as exc:  # one configuration failing is a row of the table, not a lost grid
        record = {"cell": cell.model_dump(mode="json"), "status": "error", "metrics": {},
                  "error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - t0,
                  "train_eval": cfg.train_eval}
    root.write_json(path, record)
    return record


def _fmt(metric: str, v: float) -> str:
    v = float(v)
    if not math.isfinite(v):
        return str(v)
    if metric.endswith("_per_s") and v > 0:
        # throughput spans orders of magnitude (a CPU probe, a GPU run): three significant figures at any scale,
        # and the same decimals whether or not a rate happens to be whole
        return f"{v:.{max(0, 2 - math.floor(math.log10(v)))}f}"
    if metric.endswith("_mib"):  # memory: whole MiB
        return f"{v:.0f}"
    # counts (tokens, slots, clips) print as integers; fractions and losses with three decimals
    return str(int(v)) if metric != "accuracy" and v.is_integer() else f"{v:.3f}"


def grid_table(records: list[dict], metric: str, cfg: AblationConfig) -> str:
    """Markdown method x rate grid for one metric, MotionBench Tables 7-8 style."""
    rates = sorted({r["cell"]["rate"] for r in records})
    by = {(r["cell"]["method"], r["cell"]["rate"]): r for r in records}
    title = ("Same decoder length: N_input / k = {}".format(cfg.decoder_slots) if cfg.setting == "fixed_decoder_length"
             else "Same input frames: N_input = {} slots".format(cfg.input_slots))
    lines = [f"**{metric}** ({title})", "",
             "| method | " + " | ".join(f"k={k}" for k in rates) + " |",
             "| --- | " + " | ".join("---:" for _ in rates) + " |"]
    for m in cfg.methods:
        cells = []
        for k in rates:
            r = by.get((m, k))
            if r is None:
                cells.append("")
            elif r["status"] != "ok":
                cells.append("error")
            else:
                v = r["metrics"].get(metric)
                cells.append("" if v is None else _fmt(metric, v))
        lines.append(f"| {METHOD_LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_tables(cfg: AblationConfig, records: list[dict], metrics: tuple[str, ...] | None = None) -> dict[str, str]:
    """``table.md`` (one grid per metric, errors listed below) and ``results.csv`` (one row per cell)."""
    root = OutputRoot(cfg.out)
    names = list(metrics or sorted({k for r in records for k in r["metrics"]}))
    if "accuracy" in names:  # the paper's tables report accuracy; put it first
        names.remove("accuracy")
        names.insert(0, "accuracy")
    parts = [f"# Compression ablation `{cfg.name}` ({cfg.setting})", "",
             f"train-and-evaluate step: `{cfg.train_eval}`", ""]
    for m in names:
        parts += [grid_table(records, m, cfg), ""]
    errors = [r for r in records if r["status"] != "ok"]
    if errors:
        parts += ["## Failed configurations", ""] + [f"- {r['cell']['method']} k={r['cell']['rate']}: {r['error']}"
                                                     for r in errors] + [""]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "rate", "input_slots", "decoder_slots", "status", "error", "seconds"] + names)
    for r in sorted(records, key=lambda r: (cfg.methods.index(r["cell"]["method"]), r["cell"]["rate"])):
        c = r["cell"]
        w.writerow([c["method"], c["rate"], c["input_slots"], c["decoder_slots"], r["status"], r["error"] or "",
                    f"{r['seconds']:.2f}"] + [r["metrics"].get(m, "") for m in names])
    out = {"table": root.path("ablation", cfg.name, "table.md"), "csv": root.path("ablation", cfg.name, "results.csv")}
    root.write_bytes_atomic(out["table"], "\n".join(parts).encode())
    root.write_bytes_atomic(out["csv"], buf.getvalue().encode())
    return out


@flow(name="compression-ablation")
def compression_ablation(config: AblationConfig) -> dict[str, str]:
    """Train and evaluate every (method, rate) cell in turn, then write the method x rate tables."""
    log = get_run_logger()
    cells = plan_cells(config)
    records = []
    for i, cell in enumerate(cells, 1):
        rec = run_cell(config, cell)
        log.info("cell %d/%d %s: %s %s", i, len(cells), cell.key, rec["status"], rec["metrics"] or rec["error"])
        records.append(rec)
    out = write_tables(config, records)
    log.info("ablation table: %s", out["table"])
    return out
