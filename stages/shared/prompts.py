"""Versioned prompt files shipped as package data (``stages/data/<family>/<name>.v<N>.txt|json``).

The version is part of the file name and goes into each row's provenance (``prompt_version``), so a
changed prompt is a new file, never an edit that silently changes what old rows mean.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

# Package data of every stage: prompts, word lists, vocabularies (stages/data/).
DATA_DIR = Path(__file__).resolve().parent.parent / "data"


@dataclass(frozen=True)
class Prompt:
    name: str  # e.g. "static_caption.v1"
    text: str

    @property
    def version(self) -> str:
        return self.name


@lru_cache(maxsize=None)
def load_prompt(family: str, name: str) -> Prompt:
    files = resources.files("stages") / "data" / family
    for ext in (".txt", ".json"):
        f = files / f"{name}{ext}"
        if f.is_file():
            return Prompt(name=name, text=f.read_text(encoding="utf-8"))
    available = sorted(p.name for p in files.iterdir()) if files.is_dir() else []
    raise FileNotFoundError(f"prompt {family}/{name} not found in package data; available: {available}")


def load_json_prompt(family: str, name: str) -> dict:
    return json.loads(load_prompt(family, name).text)
