"""The client address behind a load balancer (`trusted_proxies`), and refused key
registrations in the audit log."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import ADMIN_TOKEN, REPO, clear_of_the_minute_ending
from servers import free_port, serve, serve_env
from stack import Stack

from proxy.client_address import TrustedProxies, parse_networks
from proxy.config import ConfigError, load_config
from proxy.security import PROXY_KEY_PREFIX, generate_master_key

LB = "10.0.0.0/8"


def client(trusted: str, peer: str, *forwarded: str) -> str | None:
    headers = [(b"x-forwarded-for", value.encode()) for value in forwarded]
    scope = {"client": (peer, 4711), "headers": [(b"host", b"proxy.test"), *headers]}
    return TrustedProxies(parse_networks(trusted.split(",") if trusted else [])).client(scope)


@pytest.mark.parametrize(
    ("trusted", "peer", "forwarded", "expected"),
    [
        ("", "10.0.0.1", ["203.0.113.9"], "10.0.0.1"),  # off by default
        (LB, "198.51.100.1", ["203.0.113.9"], "198.51.100.1"),  # peer not trusted
        (LB, "10.0.0.1", [], "10.0.0.1"),  # no header
        (LB, "10.0.0.1", ["203.0.113.9"], "203.0.113.9"),
        (LB, "10.0.0.1", ["203.0.113.9, 10.0.0.2"], "203.0.113.9"),  # two balancers
        (LB, "10.0.0.1", ["1.2.3.4, 203.0.113.9"], "203.0.113.9"),  # left is the client's
        (LB, "10.0.0.1", ["1.2.3.4", "203.0.113.9, 10.0.0.2"], "203.0.113.9"),  # repeated
        (LB, "10.0.0.1", ["10.0.0.3, 10.0.0.2"], "10.0.0.3"),  # all trusted: left-most
        (LB, "10.0.0.1", ["203.0.113.9, unknown"], "10.0.0.1"),  # malformed: stop
        (LB, "10.0.0.1", ["garbage, 10.0.0.2"], "10.0.0.2"),
        (LB, "10.0.0.1", ["203.0.113.9:4711"], "10.0.0.1"),  # a port is not an address
        (LB, "10.0.0.1", [""], "10.0.0.1"),
        (LB, "::ffff:10.0.0.1", ["203.0.113.9"], "203.0.113.9"),  # v4-mapped peer
        ("fd00::/8", "fd00::1", ["[2001:db8::7]"], "2001:db8::7"),
        (f"{LB},fd00::/8", "fd00::1", ["2001:db8::7, 10.1.2.3"], "2001:db8::7"),
    ],
)
def test_client_address(trusted: str, peer: str, forwarded: list[str], expected: str) -> None:
    assert client(trusted, peer, *forwarded) == expected


def test_setting_from_yaml_and_environment(tmp_path: Path) -> None:
    secrets = {"ENCRYPTION_KEY": generate_master_key(), "ADMIN_TOKEN": ADMIN_TOKEN}
    assert not load_config(REPO / "config.yaml", secrets).trusted_proxies.networks
    path = tmp_path / "c.yaml"
    path.write_text("trusted_proxies: [10.0.0.0/8, '2001:db8::/32', 192.168.1.1]\n")
    networks = load_config(path, secrets).trusted_proxies.networks
    assert [str(n) for n in networks] == ["10.0.0.0/8", "2001:db8::/32", "192.168.1.1/32"]
    from_env = load_config(path, {**secrets, "TRUSTED_PROXIES": " 172.16.0.0/12 ,"})
    assert [str(n) for n in from_env.trusted_proxies.networks] == ["172.16.0.0/12"]
    with pytest.raises(ConfigError, match="TRUSTED_PROXIES: 'ten' is not an IP"):
        load_config(path, {**secrets, "TRUSTED_PROXIES": "10.0.0.0/8,ten"})
    path.write_text("trusted_proxies: 10.0.0.0/8\n")
    with pytest.raises(ConfigError, match="must be a list"):
        load_config(path, secrets)


# --- on the real proxy (`byok-proxy serve`: uvicorn's own X-Forwarded-For handling off) --


@contextmanager
def serving(tmp_path: Path, master_key: str, yaml: str = "", **variables: str) -> Iterator[str]:
    """`byok-proxy serve` on a fresh SQLite file; yields its base URL. No request here
    reaches the upstream, so none runs."""
    full = serve_env(
        tmp_path, master_key, f"sqlite:///{tmp_path / 'db'}", "http://127.0.0.1:9/v1", yaml
    )
    port = free_port()
    with serve([], {**full, **variables}, tmp_path, port, tmp_path / "serve.log"):
        yield f"http://127.0.0.1:{port}"


ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def audit(url: str, tid: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{url}/api/v1/tenants/{tid}/audit", headers=ADMIN)
    assert r.status_code == 200, r.text
    return list(r.json()["data"])


@pytest.mark.parametrize(
    ("trusted", "expected"),
    [("127.0.0.1/32", "203.0.113.9"), ("", "127.0.0.1"), (LB, "127.0.0.1")],
)
def test_audit_address_honours_only_trusted_peers(
    tmp_path: Path, master_key: str, trusted: str, expected: str
) -> None:
    with serving(tmp_path, master_key, TRUSTED_PROXIES=trusted) as url:
        r = httpx.post(
            url + "/api/v1/tenants",
            json={"name": "acme", "tier": "pro", "id": "acme"},
            headers={**ADMIN, "X-Forwarded-For": "198.51.100.66, 203.0.113.9"},
        )
        assert r.status_code == 201, r.text
        assert {e["source_ip"] for e in audit(url, "acme")} == {expected}


@pytest.mark.parametrize("trusted", [True, False])
def test_failed_auth_limit_counts_the_forwarded_client(
    tmp_path: Path, master_key: str, trusted: bool
) -> None:
    yaml = "limits:\n  failed_auth_per_minute: 3\n"
    variables = {"TRUSTED_PROXIES": "127.0.0.1"} if trusted else {}
    with serving(tmp_path, master_key, yaml, **variables) as url:

        def guess(client_address: str) -> int:
            return httpx.get(
                url + "/v1/models",
                headers={
                    "Authorization": f"Bearer {PROXY_KEY_PREFIX}guess-{client_address}",
                    "X-Forwarded-For": client_address,
                },
            ).status_code

        clear_of_the_minute_ending()  # the five guesses in one window of the limiter
        assert [guess("203.0.113.1") for _ in range(3)] == [401, 401, 401]
        assert guess("203.0.113.1") == 429
        # Another client behind the same balancer is not locked out by its neighbour;
        # without trust, both are the balancer (127.0.0.1) and share its count.
        assert guess("203.0.113.2") == (401 if trusted else 429)


REFUSED = "sk-test-REFUSEDkeyQWERTYuiopASDFGHjklZXCVBnm0123456789"


def fragments(key: str, size: int = 6) -> set[str]:
    """Every `size`-character piece of the key's secret part (after `sk-test-`)."""
    secret = key.removeprefix("sk-test-")
    return {secret[i : i + size] for i in range(len(secret) - size + 1)}


def test_refused_registrations_are_audited_without_the_key(
    tmp_path: Path, master_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with Stack.sqlite(tmp_path, master_key) as stack:
        r = stack.admin.post("/api/v1/tenants", json={"name": "acme", "tier": "pro", "id": "acme"})
        assert r.status_code == 201, r.text
        keys = {
            "format": "sk-admin-" + REFUSED.removeprefix("sk-test-"),
            "invalid": REFUSED,
            "no_credit": REFUSED[:-1] + "N",
            "forbidden": REFUSED[:-1] + "F",
        }
        stack.fake.revoked.add(keys["invalid"])
        stack.fake.no_quota.add(keys["no_credit"])
        stack.fake.forbidden.add(keys["forbidden"])
        statuses = {}
        for reason, key in keys.items():
            r = stack.admin.post("/api/v1/tenants/acme/openai-key", json={"api_key": key})
            statuses[reason] = (r.status_code, r.json()["error"]["code"])
        # A tenant that does not exist gets no audit trail (and its 422 as before).
        ghost = stack.admin.post("/api/v1/tenants/ghost/openai-key", json={"api_key": "nope"})
        assert ghost.status_code == 422
        events = stack.admin.get("/api/v1/tenants/acme/audit").json()["data"]
        with sqlite3.connect(tmp_path / "e2e.db") as db:
            rows = db.execute("SELECT * FROM audit_events").fetchall()
            tenant_row = db.execute("SELECT * FROM tenants WHERE id = 'acme'").fetchall()
            stored = db.execute(
                "SELECT openai_api_key_encrypted, openai_key_status FROM tenants"
            ).fetchall()

    assert statuses == {
        "format": (422, "invalid_key_format"),
        "invalid": (402, "openai_key_invalid"),
        "no_credit": (402, "openai_quota_exceeded"),
        "forbidden": (422, "openai_key_forbidden"),
    }
    rejected = [e for e in events if e["action"].startswith("openai_key.rejected.")]
    assert [e["action"] for e in reversed(rejected)] == [
        f"openai_key.rejected.{reason}" for reason in keys
    ]
    assert all(e["key_hint"] is None and e["source_ip"] == "127.0.0.1" for e in rejected)
    assert all(e["actor"] == "admin" and e["request_id"] for e in rejected)
    assert len(rows) == 6 and not any("ghost" in str(row) for row in rows)  # + created, issued
    assert stored == [(None, "none")]  # nothing was stored
    dumped = repr(rows) + repr(tenant_row) + repr(events) + caplog.text
    leaked = {piece for key in keys.values() for piece in fragments(key) if piece in dumped}
    assert not leaked, leaked
