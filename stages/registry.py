"""Every stage by name, in pipeline order, and the dependency graph between them."""
from __future__ import annotations

import importlib
from functools import lru_cache

from stages.base import Stage

# Order matters: it is a topological order of the DAG (each stage after its inputs).
STAGE_MODULES: dict[str, str] = {
    "ingest": "stages.ingest",
    "scenes": "stages.scenes",
    # iMOVE-IT branch (iMOVE 3.1.1)
    "tag": "stages.imove_it.tag",
    "detect": "stages.imove_it.detect",
    "track": "stages.imove_it.track",
    "trackfilter": "stages.imove_it.trackfilter",
    "caption": "stages.imove_it.caption",
    "check": "stages.imove_it.check",
    "tasks": "stages.imove_it.tasks",
    # MotionBench branch (MotionBench 3.1-3.2, 9)
    "describe": "stages.motionbench.describe",
    "qgen": "stages.motionbench.qgen",
    "ffilter": "stages.motionbench.ffilter",
    "review": "stages.motionbench.review",
    "synthqa": "stages.synth.synthqa",  # questions from synthetic videos' ground truth (MotionBench "virtual videos")
    "finalize": "stages.motionbench.finalize",
}


class UnknownStageError(KeyError):
    pass


@lru_cache(maxsize=None)
def get_stage(name: str) -> Stage:
    if name not in STAGE_MODULES:
        raise UnknownStageError(f"unknown stage {name!r}; stages are: {', '.join(STAGE_MODULES)}")
    mod = importlib.import_module(STAGE_MODULES[name])
    stage = getattr(mod, "STAGE", None)
    if stage is None:
        raise UnknownStageError(f"module {STAGE_MODULES[name]} defines no STAGE")
    return stage


def available_stages() -> list[str]:
    """Stage names whose modules define a STAGE, in pipeline order."""
    out = []
    for name, modname in STAGE_MODULES.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name == modname:
                continue
            raise
        if getattr(mod, "STAGE", None) is not None:
            out.append(name)
    return out


def order(names) -> list[str]:
    names = set(names)
    return [n for n in STAGE_MODULES if n in names]


def with_upstream(names) -> list[str]:
    todo, seen = list(names), set()
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += list(get_stage(n).inputs)
    return order(seen)


def downstream(name: str, among=None) -> list[str]:
    among = list(among or available_stages())
    out: set[str] = set()
    changed = True
    while changed:
        changed = False
        for n in among:
            if n not in out and (name in get_stage(n).inputs or out & set(get_stage(n).inputs)):
                out.add(n)
                changed = True
    return order(out)
