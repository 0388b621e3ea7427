"""Who the client is when the proxy sits behind a load balancer: `X-Forwarded-For`, trusted.

Off by default: the client is the TCP peer, and forwarded headers are ignored
(anyone can send them). With `trusted_proxies` (CIDRs), a request whose peer
is in one of them is taken to come from the address that peer forwarded for:
`X-Forwarded-For` is read from the right (each proxy appends the address it
saw), trusted addresses are skipped, and the first one that is not trusted is
the client. Only what trusted proxies wrote is believed: the walk stops at an
entry that is not an IP address (then the client is the nearest trusted hop),
and entries left of the client, which the client itself may have written, are
never read. The result feeds audit events' `source_ip` and the failed-auth
limit's per-address count.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_HEADER = b"x-forwarded-for"


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs (a bare address is a /32 or /128); ValueError names the first malformed one."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{entry.strip()!r} is not an IP address or CIDR") from None
    return tuple(networks)


class TrustedProxies:
    """The proxies whose `X-Forwarded-For` is believed; `client(scope)` applies them."""

    def __init__(self, networks: Iterable[Network] = ()) -> None:
        self.networks = tuple(networks)

    def __repr__(self) -> str:
        return f"TrustedProxies({[str(n) for n in self.networks]})"

    def client(self, scope: Mapping[str, Any]) -> str | None:
        """The client's address for an ASGI `scope` (the TCP peer unless it is trusted)."""
        peer = scope.get("client")
        address = peer[0] if peer else None
        if not self.networks or address is None or not self._trusted(address):
            return address
        for entry in reversed(_forwarded_for(scope["headers"])):
            hop = _ip(entry)
            if hop is None:
                break
            address = str(hop)
            if not self._trusted(hop):
                break
        return address

    def _trusted(self, address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        ip = _ip(address) if isinstance(address, str) else address
        return ip is not None and any(ip in network for network in self.networks)


def _forwarded_for(headers: Iterable[tuple[bytes, bytes]]) -> list[str]:
    """Every `X-Forwarded-For` entry, in order (repeated headers are one list, RFC 9110)."""
    entries: list[str] = []
    for name, value in headers:
        if name.lower() == _HEADER:
            entries.extend(value.decode("latin-1").split(","))
    return entries


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address from a forwarded entry (`[v6]` brackets allowed), or None if malformed."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped or ip
