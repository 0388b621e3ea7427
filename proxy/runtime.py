"""The objects made once in the lifespan and shared by every request.

`Runtime` is stored on the ASGI app and passed down; nothing here is a module
global, so two apps (tests, a separate admin listener) never share state.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from proxy.config import Config
from proxy.metrics import Metrics
from proxy.security import Vault
from proxy.store import Store
from proxy.usage import UsageLog


@dataclass
class Runtime:
    """Config plus the live resources built from it."""

    config: Config
    store: Store
    vault: Vault
    validation_client: httpx.AsyncClient
    usage_log: UsageLog
    metrics: Metrics

    def __repr__(self) -> str:
        return f"Runtime(store={self.store!r})"
