"""The objects made once in the lifespan and shared by every request.

`Runtime` is stored on the ASGI app and passed down; nothing here is a module
global, so two apps (tests, a separate admin listener) never share state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import TYPE_CHECKING

from proxy.auth_limit import FailedAuthLimit
from proxy.config import Config
from proxy.metrics import Metrics
from proxy.security import Vault
from proxy.spend import SpendControl
from proxy.store import Store
from proxy.usage_sink import UsageLog

if TYPE_CHECKING:
    import httpx


@dataclass
class Runtime:
    """Config plus the live resources built from it."""

    config: Config
    store: Store
    vault: Vault
    usage_log: UsageLog
    metrics: Metrics
    auth_limit: FailedAuthLimit
    spend: SpendControl
    _validation_client: httpx.AsyncClient | None = field(default=None, repr=False)

    @property
    def validation_client(self) -> httpx.AsyncClient:
        """The client of key validation, made (and httpx imported) on first use: its TLS
        setup costs ~7 MB, and a process serving only `/v1` never validates a key.

        Like the proxy's own client: no cookies kept between tenants (a jar that
        refuses every cookie), no proxy settings from the environment.
        """
        if self._validation_client is None:
            import httpx

            self._validation_client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.config.upstream.validation_timeout),
                follow_redirects=False,
                trust_env=False,
                cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])),
            )
        return self._validation_client

    async def aclose(self) -> None:
        """Close what the runtime opened lazily."""
        if self._validation_client is not None:
            await self._validation_client.aclose()
            self._validation_client = None

    def __repr__(self) -> str:
        return f"Runtime(store={self.store!r})"
