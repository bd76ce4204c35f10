"""Every Prefect setting the docs tell a user to set (``PREFECT_...=value``, in a shell block or inline) is one
Prefect takes, and its value parses: Prefect ignores an environment variable it does not know, so a misspelt or
retired name in the docs would silently do nothing on the user's server. Checked against Prefect's own settings
model (the installed version, the one ``constraints.txt`` pins)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ASSIGNMENT = re.compile(r"(?<![\w.])(PREFECT_[A-Z0-9_]+)=(\"[^\"]*\"|'[^']*'|[^\s`]+)")


def documented() -> list[tuple[str, str, str]]:
    found = []
    for doc in DOCS:
        for m in ASSIGNMENT.finditer(doc.read_text()):
            found.append((f"{doc.name}: {m[0]}", m[1], shlex.split(m[2])[0] if m[2] else ""))
    return found


def test_the_docs_name_prefect_settings():
    names = {name for _, name, _ in documented()}
    assert {"PREFECT_API_URL", "PREFECT_SERVER_SERVICES_DB_VACUUM_EVENT_RETENTION_OVERRIDES"} <= names, names


@pytest.mark.parametrize("where,name,value", [pytest.param(*d, id=d[0]) for d in documented()])
def test_documented_prefect_setting_is_real_and_parses(where, name, value, monkeypatch):
    from prefect.settings import Settings
    from prefect.settings.legacy import _get_valid_setting_names

    assert name in _get_valid_setting_names(Settings), f"{where}: Prefect has no setting {name}"
    if value in ("...", "") or "$" in value:
        return  # a placeholder the user fills in
    monkeypatch.setenv(name, value)
    Settings()  # raises on a value Prefect cannot parse
