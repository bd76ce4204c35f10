"""Starting the temporary Prefect server on a busy machine: a longer timeout, one retry, then clear advice.

The server double below fails the way Prefect's ``SubprocessASGIServer.start`` does when the server is slow to
answer (same message); nothing is started for real.
"""
from __future__ import annotations

import pytest

from flows.prefect_api import MIN_STARTUP_TIMEOUT_S, TIMEOUT_MARKER, PrefectApiUnavailable, ensure_prefect_api


class SlowServer:
    """Times out the first ``fails`` starts (shared across instances, like a machine that stays busy)."""

    starts: list[int] = []
    stops = 0
    fails = 0

    def start(self, timeout=None):
        type(self).starts.append(timeout)
        if len(type(self).starts) <= type(self).fails:
            raise RuntimeError(TIMEOUT_MARKER + ". Ephemeral server process exited with code 1.")

    def stop(self):
        type(self).stops += 1

    api_url = "http://127.0.0.1:8999/api"


@pytest.fixture
def no_api_url(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: None}):
        yield
    SlowServer.starts, SlowServer.stops = [], 0


def test_slow_start_is_retried_with_a_longer_timeout(no_api_url):
    SlowServer.starts, SlowServer.stops, SlowServer.fails = [], 0, 1
    assert ensure_prefect_api(server_factory=SlowServer) == SlowServer.api_url
    first = SlowServer.starts[0]
    assert first >= MIN_STARTUP_TIMEOUT_S and SlowServer.starts == [first, 2 * first]
    assert SlowServer.stops == 1  # the half-started server was stopped before the retry


def test_final_failure_says_what_to_do(no_api_url):
    SlowServer.starts, SlowServer.stops, SlowServer.fails = [], 0, 5
    with pytest.raises(PrefectApiUnavailable) as exc:
        ensure_prefect_api(server_factory=SlowServer)
    msg = str(exc.value)
    assert "prefect server start" in msg and "PREFECT_API_URL" in msg
    assert len(SlowServer.starts) == 2


def test_cli_prints_the_advice_instead_of_a_traceback(no_api_url, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import flows.prefect_api as api
    from flows.cli import app

    SlowServer.starts, SlowServer.stops, SlowServer.fails = [], 0, 5
    monkeypatch.setattr(api, "_default_server", SlowServer)
    res = CliRunner().invoke(app, ["run", "--input", str(tmp_path), "--out", str(tmp_path / "o"), "--profile", "tiny"])
    assert res.exit_code == 1
    text = " ".join(res.output.split())  # rich wraps long lines
    assert "prefect server start" in text and "PREFECT_API_URL" in text
    assert isinstance(res.exception, SystemExit) and "PrefectApiUnavailable" not in text  # a message, no traceback
    assert not (tmp_path / "o").exists()  # nothing ran


def test_a_configured_server_is_used_as_is(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: "http://example.invalid:4200/api"}):
        assert ensure_prefect_api(server_factory=lambda: pytest.fail("no server may be started")) == \
            "http://example.invalid:4200/api"
