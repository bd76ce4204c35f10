"""API keys from a Prefect Secret block reach the expert's environment variable and nowhere else."""
from __future__ import annotations

import json
import os

import pytest

from flows.api_keys import SecretBlockError, chat_specs, load_api_keys
from stages.imove_it.caption import CaptionConfig
from stages.motionbench.ffilter import FfilterConfig


def test_secret_block_fills_the_env_var(prefect_harness, monkeypatch):
    from prefect.blocks.system import Secret

    Secret(value="sk-test-123").save("mf-test-key", overwrite=True)
    monkeypatch.delenv("MF_TEST_KEY", raising=False)
    cfg = CaptionConfig(vlm={"model_id": "gpt-4o", "backend": "openai", "api_key_env": "MF_TEST_KEY",
                             "api_key_secret_block": "mf-test-key"})
    assert load_api_keys(cfg) == ["MF_TEST_KEY"]
    assert os.environ["MF_TEST_KEY"] == "sk-test-123"
    assert "sk-test-123" not in json.dumps(cfg.model_dump(mode="json"))  # the config only names the block
    assert load_api_keys(cfg) == []  # already set: not loaded again
    monkeypatch.delenv("MF_TEST_KEY")
    bad = CaptionConfig(vlm={"model_id": "gpt-4o", "backend": "openai", "api_key_env": "MF_TEST_KEY",
                             "api_key_secret_block": "no-such-block"})
    with pytest.raises(SecretBlockError, match="no-such-block") as err:
        load_api_keys(bad)
    assert "sk-test" not in str(err.value)


def test_chat_specs_are_found_in_nested_configs():
    specs = list(chat_specs(FfilterConfig()))
    assert len(specs) >= 2  # the paper's several first-frame judges
