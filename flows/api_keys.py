"""API keys from Prefect Secret blocks: copied into the environment variable an expert reads.

A VLM/LLM spec names the variable (``api_key_env``) and, optionally, a Secret block
(``api_key_secret_block``). Before a stage runs, the flow loads each named block once per process and sets the
variable if it is not already set, so keys live in Prefect (or the environment), never in configs, tables,
logs or the response cache.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Iterator

from pydantic import BaseModel

from experts.openai_compat import ChatSpec

_LOCK = threading.Lock()


def chat_specs(obj: Any) -> Iterator[ChatSpec]:
    """Every chat (VLM/LLM) spec inside a config, however deeply nested."""
    if isinstance(obj, ChatSpec):
        yield obj
    elif isinstance(obj, BaseModel):
        for name in type(obj).model_fields:
            yield from chat_specs(getattr(obj, name))
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from chat_specs(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from chat_specs(v)


class SecretBlockError(RuntimeError):
    pass


def load_api_keys(config: Any) -> list[str]:
    """Fill ``$api_key_env`` from ``api_key_secret_block`` for every spec in ``config`` that names one and whose
    variable is unset. Returns the variable names that were set (never the values)."""
    set_now = []
    for spec in chat_specs(config):
        block, env = spec.api_key_secret_block, spec.api_key_env
        if not block or not env or os.environ.get(env):
            continue
        with _LOCK:
            if os.environ.get(env):
                continue
            from prefect.blocks.system import Secret

            try:
                value = Secret.load(block).get()
            except Exception as exc:  # noqa: BLE001
                raise SecretBlockError(
                    f"could not load the Prefect Secret block {block!r} for {spec.model_id} ({type(exc).__name__}); "
                    f"create it (prefect block create secret) or set ${env} in the worker's environment") from None
            if not isinstance(value, str) or not value:
                raise SecretBlockError(f"the Prefect Secret block {block!r} holds no string key for {spec.model_id}")
            os.environ[env] = value
            set_now.append(env)
    return set_now
