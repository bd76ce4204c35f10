"""The architecture's one-way flow, checked on the source: no stage module imports another stage module,
stages never import flows or dashboards, and every stage module sits in the folder of its branch."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from stages.registry import STAGE_MODULES

REPO = Path(__file__).resolve().parents[1]


def _stage_modules() -> set[str]:
    """Every module under stages/ that defines a module-level ``STAGE`` (read from the source, not imported)."""
    out = set()
    for path in (REPO / "stages").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            targets = [t for n in [node] if isinstance(n, (ast.Assign, ast.AnnAssign))
                       for t in (n.targets if isinstance(n, ast.Assign) else [n.target])]
            if any(isinstance(t, ast.Name) and t.id == "STAGE" for t in targets):
                out.add(".".join(path.relative_to(REPO).with_suffix("").parts))
    return out


def _imports(path: Path) -> set[str]:
    """Absolute module names imported anywhere in the file (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_stage_modules_are_the_registry():
    assert _stage_modules() == set(STAGE_MODULES.values())


@pytest.mark.parametrize("module", sorted(set(STAGE_MODULES.values())))
def test_no_stage_module_imports_another_stage_module(module):
    path = REPO / (module.replace(".", "/") + ".py")
    others = _stage_modules() - {module}
    bad = sorted(_imports(path) & others)
    assert not bad, f"{module} imports the stage module(s) {bad}; move what they share into stages/shared/"
    assert not any(n.split(".")[0] in {"flows", "dashboards"} for n in _imports(path)), module


def test_branch_folders():
    where = {name: mod.split(".")[1] for name, mod in STAGE_MODULES.items()}
    assert {n for n, f in where.items() if f == "imove_it"} == {
        "tag", "detect", "track", "trackfilter", "caption", "check", "tasks"}
    assert {n for n, f in where.items() if f == "motionbench"} == {"describe", "qgen", "ffilter", "review", "finalize"}
    assert where["synthqa"] == "synth"
    assert where["ingest"] == "ingest" and where["scenes"] == "scenes"


def test_every_stage_module_imports():
    for mod in STAGE_MODULES.values():
        assert importlib.import_module(mod).STAGE is not None
