"""The `byok-proxy` command, run as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
from helpers import ADMIN_TOKEN, REPO
from servers import free_port, serve

from proxy.security import Keyring, generate_master_key


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("ENCRYPTION_KEY", "ADMIN_TOKEN")}
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        cwd=cwd,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_gen_key(tmp_path: Path) -> None:
    result = run(["gen-key"], tmp_path)
    assert result.returncode == 0
    Keyring.parse(result.stdout.strip())
    token = run(["gen-key", "--admin-token"], tmp_path).stdout.strip()
    assert len(token) >= 32


def test_serve_refuses_to_start_without_secrets(tmp_path: Path) -> None:
    result = run(["serve", "--port", str(free_port())], tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "ENCRYPTION_KEY" in lines[0] and "byok-proxy gen-key" in lines[0]
    result = run(["serve"], tmp_path, ENCRYPTION_KEY="bad")
    assert result.returncode == 2 and "malformed" in result.stderr
    result = run(["serve"], tmp_path, ENCRYPTION_KEY=generate_master_key(), ADMIN_TOKEN="short")
    assert result.returncode == 2 and "ADMIN_TOKEN" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_serve_dev_quickstart(tmp_path: Path) -> None:
    """The README's first command: `byok-proxy serve --dev` on a fresh folder answers /healthz."""
    port = free_port()
    with serve(["--dev"], {}, tmp_path, port, tmp_path / "serve.log"):
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
        token = (tmp_path / ".byok" / "admin_token").read_text().strip()
        r = httpx.post(
            f"http://127.0.0.1:{port}/api/v1/tenants",
            json={"name": "Acme", "tier": "trial"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 201
    output = (tmp_path / "serve.log").read_text()
    assert "NOT FOR PRODUCTION" in output and token in output
    assert (tmp_path / "byok.db").exists()


def test_tenants_create_and_rotate_keys(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    old, new = generate_master_key(), generate_master_key()
    env = {"DATABASE_URL": db, "ADMIN_TOKEN": ADMIN_TOKEN, "BYOK_CONFIG": str(REPO / "config.yaml")}
    created = run(
        ["tenants", "create", "--name", "Acme", "--tier", "pro", "--id", "acme"],
        tmp_path,
        ENCRYPTION_KEY=old,
        **env,
    )
    assert created.returncode == 0, created.stderr
    assert "byok-" in created.stdout and "acme" in created.stdout
    dup = run(
        ["tenants", "create", "--name", "Acme", "--tier", "pro", "--id", "acme"],
        tmp_path,
        ENCRYPTION_KEY=old,
        **env,
    )
    assert dup.returncode == 1 and "already exists" in dup.stderr

    # Store a key under the old master key, as the admin API would.
    from proxy.models import Tenant
    from proxy.store import Store

    store = Store.connect(db)
    with store.session() as s:
        tenant = s.get(Tenant, "acme")
        assert tenant is not None
        tenant.openai_api_key_encrypted = Keyring.parse(old).encrypt("sk-" + "a" * 30, "acme")
        s.add(tenant)
        s.commit()

    first = run(["rotate-keys"], tmp_path, ENCRYPTION_KEY=f"{new},{old}", **env)
    assert first.returncode == 0, first.stderr
    assert "1 re-encrypted, 0 already current, 0 failed" in first.stdout
    second = run(["rotate-keys"], tmp_path, ENCRYPTION_KEY=f"{new},{old}", **env)
    assert "0 re-encrypted, 1 already current" in second.stdout
    assert store.load_ciphertext("acme") is not None
    ciphertext = store.load_ciphertext("acme")
    assert ciphertext is not None
    assert Keyring.parse(new).decrypt(ciphertext, "acme").reveal() == "sk-" + "a" * 30
    lost = run(["rotate-keys"], tmp_path, ENCRYPTION_KEY=generate_master_key(), **env)
    assert lost.returncode == 1 and "1 failed" in lost.stdout
    assert "1 stored key(s) are still under an old master key" in lost.stderr
    store.dispose()


def test_tenants_create_validates_id(tmp_path: Path) -> None:
    result = run(
        ["tenants", "create", "--name", "Acme", "--tier", "pro", "--id", "Bad Id"],
        tmp_path,
        ENCRYPTION_KEY=generate_master_key(),
        ADMIN_TOKEN=ADMIN_TOKEN,
        DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}",
    )
    assert result.returncode == 2 and "id" in result.stderr


def test_admin_api_on_its_own_port(tmp_path: Path) -> None:
    proxy_port, admin_port = free_port(), free_port()
    (tmp_path / "config.yaml").write_text(f"admin:\n  host: 127.0.0.1\n  port: {admin_port}\n")
    env = {
        "ENCRYPTION_KEY": generate_master_key(),
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'a.db'}",
    }
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with serve([], env, tmp_path, proxy_port, tmp_path / "serve.log"):
        from servers import wait_until_up

        wait_until_up(f"http://127.0.0.1:{admin_port}/healthz")
        r = httpx.get(f"http://127.0.0.1:{admin_port}/api/v1/tenants", headers=headers)
        assert r.status_code == 200
        r = httpx.get(f"http://127.0.0.1:{proxy_port}/api/v1/tenants", headers=headers)
        assert r.status_code == 404
        r = httpx.get(f"http://127.0.0.1:{admin_port}/v1/models", headers=headers)
        assert r.status_code == 404
        r = httpx.get(f"http://127.0.0.1:{proxy_port}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_proxy_key"
