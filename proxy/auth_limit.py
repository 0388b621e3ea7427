"""A limit on failed authentications per client address (a flood of wrong proxy keys).

Counted in fixed one-minute windows per address (`limits.failed_auth_per_minute`,
0 = off). Over the limit, a key the proxy does not already know (in its cache)
is refused with 429 `too_many_failed_authentications` and `Retry-After`,
without a database lookup, until the window ends; keys already known keep
working, so a service behind the same address is not locked out by a
neighbour's guessing. The address is the client's (`proxy.client_address`: the
TCP peer, or behind a trusted proxy the address it forwarded for); IPv6
addresses count per /64 (one host can hold a whole /64). The table is
bounded: past `MAX_ADDRESSES` the oldest tenth is forgotten.
"""

from __future__ import annotations

import ipaddress
import itertools
import time
from collections.abc import Callable

from proxy.errors import TooManyFailedAuthentications

WINDOW = 60.0
MAX_ADDRESSES = 100_000


class FailedAuthLimit:
    """Failures per address in the current window; `check` raises once over the limit."""

    def __init__(
        self,
        per_minute: int,
        on_failure: Callable[[], None] | None = None,
        on_block: Callable[[], None] | None = None,
    ) -> None:
        self.per_minute = per_minute
        self._counts: dict[str, tuple[int, int]] = {}  # address -> (window number, failures)
        self._on_failure = on_failure
        self._on_block = on_block

    def over(self, address: str | None) -> bool:
        """Whether `address` has used up its failures for this window."""
        if not self.per_minute or address is None or not self._counts:
            return False
        entry = self._counts.get(_network(address))
        return entry is not None and entry[0] == self._window() and entry[1] >= self.per_minute

    def refuse(self) -> TooManyFailedAuthentications:
        """The 429 for an address over the limit (counted)."""
        if self._on_block is not None:
            self._on_block()
        wait = max(1, int(WINDOW - time.monotonic() % WINDOW) + 1)
        return TooManyFailedAuthentications(wait)

    def failed(self, address: str | None) -> None:
        """Count one failed authentication from `address`."""
        if self._on_failure is not None:
            self._on_failure()
        if not self.per_minute or address is None:
            return
        window = self._window()
        address = _network(address)
        entry = self._counts.get(address)
        count = entry[1] + 1 if entry is not None and entry[0] == window else 1
        if entry is None and len(self._counts) >= MAX_ADDRESSES:
            for oldest in list(itertools.islice(self._counts, MAX_ADDRESSES // 10)):
                del self._counts[oldest]
        self._counts.pop(address, None)  # re-inserted last: the dict stays oldest-first
        self._counts[address] = (window, count)

    @staticmethod
    def _window() -> int:
        return int(time.monotonic() // WINDOW)


def _network(address: str) -> str:
    """The unit counted: an IPv4 address, or an IPv6 address's /64."""
    if ":" not in address:
        return address
    try:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    except ValueError:
        return address
