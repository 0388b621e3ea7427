"""The key vault: encryption, tenant binding, tampering, rotation, Secret masking; the
seed's module-level functions; bearer parsing and admin-token generation."""

from __future__ import annotations

import logging
import pickle
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import ADMIN_TOKEN, GOOD_KEY, OTHER_KEY, REPO, make_config
from sqlmodel import select
from stack import TENANT_KEY, Stack

from admin.tenants import create_tenant_row
from proxy import security
from proxy.app import create_app
from proxy.audit import SYSTEM
from proxy.config import MIN_ADMIN_TOKEN_LENGTH
from proxy.errors import KeyDecryptionFailed, OpenAIKeyMissing
from proxy.models import AuditEvent, Tenant
from proxy.rotation import rotate_all
from proxy.security import (
    Keyring,
    Secret,
    Vault,
    VaultNotConfigured,
    bearer_token,
    decrypt_openai_key,
    decrypt_openai_key_async,
    encrypt_openai_key,
    generate_admin_token,
    generate_master_key,
    hash_proxy_key,
    key_hint,
    new_proxy_key,
)
from proxy.store import Store, migrate


def test_round_trip() -> None:
    ring = Keyring.parse(generate_master_key())
    ciphertext = ring.encrypt(GOOD_KEY, "acme")
    assert GOOD_KEY not in ciphertext
    assert ring.decrypt(ciphertext, "acme").reveal() == GOOD_KEY


def test_two_encryptions_differ() -> None:
    ring = Keyring.parse(generate_master_key())
    assert ring.encrypt(GOOD_KEY, "acme") != ring.encrypt(GOOD_KEY, "acme")


def test_ciphertext_records_key_id() -> None:
    ring = Keyring.parse(generate_master_key())
    assert Keyring.kid_of(ring.encrypt(GOOD_KEY, "acme")) == ring.primary_kid


def test_tampered_ciphertext_fails_clearly() -> None:
    ring = Keyring.parse(generate_master_key())
    ciphertext = ring.encrypt(GOOD_KEY, "acme")
    head, token = ciphertext.rsplit(".", 1)
    flipped = token[:30] + ("A" if token[30] != "A" else "B") + token[31:]
    with pytest.raises(KeyDecryptionFailed) as info:
        ring.decrypt(f"{head}.{flipped}", "acme")
    assert info.value.status_code == 500 and info.value.code == "key_decryption_failed"
    with pytest.raises(KeyDecryptionFailed):
        ring.decrypt("garbage", "acme")


def test_wrong_master_key_fails_clearly() -> None:
    ciphertext = Keyring.parse(generate_master_key()).encrypt(GOOD_KEY, "acme")
    with pytest.raises(KeyDecryptionFailed) as info:
        Keyring.parse(generate_master_key()).decrypt(ciphertext, "acme")
    assert "not in ENCRYPTION_KEY" in info.value.message
    assert GOOD_KEY not in str(info.value)


def test_ciphertext_is_bound_to_its_tenant() -> None:
    ring = Keyring.parse(generate_master_key())
    ciphertext = ring.encrypt(GOOD_KEY, "tenant-a")
    with pytest.raises(KeyDecryptionFailed):
        ring.decrypt(ciphertext, "tenant-b")


@pytest.mark.parametrize(
    ("value", "message"),
    [("", "no keys"), ("not base64!!", "base64"), ("c2hvcnQ=", "32 bytes")],
)
def test_malformed_master_keys(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Keyring.parse(value)


def test_secret_never_shows_itself() -> None:
    secret = Secret(GOOD_KEY)
    for text in (
        repr(secret),
        str(secret),
        f"{secret}",
        "%s %r" % (secret, secret),  # noqa: UP031 (logging formats this way)
        repr([secret]),
    ):
        assert GOOD_KEY not in text
    assert secret.reveal() == GOOD_KEY
    assert secret == Secret(GOOD_KEY) and secret != Secret(OTHER_KEY)
    with pytest.raises(TypeError):
        pickle.dumps(secret)


def test_keyring_repr_hides_material() -> None:
    master = generate_master_key()
    ring = Keyring.parse(master)
    assert master not in repr(ring) and master not in repr(ring._keys)


def test_proxy_keys() -> None:
    a, b = new_proxy_key(), new_proxy_key()
    assert a.startswith("byok-") and not a.startswith("sk-") and a != b and len(a) > 40
    assert hash_proxy_key(a) != hash_proxy_key(b) and len(hash_proxy_key(a)) == 64
    assert key_hint(GOOD_KEY) == "sk-...6789"


# --- with a database -------------------------------------------------------------


def _store_with_tenants(database_url: str, ring: Keyring) -> Store:
    store = Store.connect(database_url)
    migrate(store.engine)
    with store.session() as s:
        for tid in ("tenant-a", "tenant-b"):
            create_tenant_row(s, SYSTEM, tid, "pro", tid)
        s.commit()
    for tid, key in (("tenant-a", GOOD_KEY), ("tenant-b", OTHER_KEY)):
        with store.session() as s:
            tenant = s.get(Tenant, tid)
            assert tenant is not None
            tenant.openai_api_key_encrypted = ring.encrypt(key, tid)
            tenant.openai_key_hint = key_hint(key)
            tenant.openai_key_status = "active"
            s.add(tenant)
            s.commit()
    return store


def test_vault_decrypts_from_the_store(database_url: str) -> None:
    ring = Keyring.parse(generate_master_key())
    store = _store_with_tenants(database_url, ring)
    vault = Vault(ring, store.load_ciphertext)
    assert vault.decrypt_openai_key("tenant-a").reveal() == GOOD_KEY
    assert vault.decrypt_openai_key("tenant-b").reveal() == OTHER_KEY
    ciphertext = vault.encrypt_openai_key(GOOD_KEY, "tenant-c")
    assert ring.decrypt(ciphertext, "tenant-c").reveal() == GOOD_KEY
    store.dispose()


def test_row_copied_to_another_tenant_does_not_decrypt(database_url: str) -> None:
    ring = Keyring.parse(generate_master_key())
    store = _store_with_tenants(database_url, ring)
    with store.session() as s:
        a = s.get(Tenant, "tenant-a")
        b = s.get(Tenant, "tenant-b")
        assert a is not None and b is not None
        b.openai_api_key_encrypted = a.openai_api_key_encrypted
        s.add(b)
        s.commit()
    with pytest.raises(KeyDecryptionFailed):
        Vault(ring, store.load_ciphertext).decrypt_openai_key("tenant-b")
    store.dispose()


def test_rotation(database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    old, new = generate_master_key(), generate_master_key()
    old_ring = Keyring.parse(old)
    store = _store_with_tenants(database_url, old_ring)

    both = Keyring.parse(f"{new},{old}")
    vault = Vault(both, store.load_ciphertext)
    assert vault.decrypt_openai_key("tenant-a").reveal() == GOOD_KEY  # new,old: old still works

    report = rotate_all(store, both)
    assert (report.rotated, report.current, report.failed) == (2, 0, 0)

    only_new = Vault(Keyring.parse(new), store.load_ciphertext)
    assert only_new.decrypt_openai_key("tenant-a").reveal() == GOOD_KEY
    assert only_new.decrypt_openai_key("tenant-b").reveal() == OTHER_KEY
    with pytest.raises(KeyDecryptionFailed):
        Vault(old_ring, store.load_ciphertext).decrypt_openai_key("tenant-a")

    with store.session() as s:
        before = {t.id: t.openai_api_key_encrypted for t in s.exec(select(Tenant)).all()}
    again = rotate_all(store, both)
    assert (again.rotated, again.current, again.failed) == (0, 2, 0)
    with store.session() as s:
        after = {t.id: t.openai_api_key_encrypted for t in s.exec(select(Tenant)).all()}
        events = s.exec(select(AuditEvent).where(AuditEvent.action == "openai_key.rotated")).all()
    assert before == after
    assert sorted((e.tenant_id, e.actor, e.key_hint) for e in events) == [
        ("tenant-a", "system", key_hint(GOOD_KEY)),
        ("tenant-b", "system", key_hint(OTHER_KEY)),
    ]
    store.dispose()


def test_rotation_reports_undecryptable_rows(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    lost = Keyring.parse(generate_master_key())
    store = _store_with_tenants(database_url, lost)
    ring = Keyring.parse(generate_master_key())
    with caplog.at_level(logging.ERROR):
        report = rotate_all(store, ring)
    assert (report.rotated, report.failed) == (0, 2)
    assert "tenant-a" in caplog.text and GOOD_KEY not in caplog.text
    store.dispose()


def test_head_revision_matches_the_migrations() -> None:
    from alembic.config import Config as AlembicConfig
    from alembic.script import ScriptDirectory

    from proxy.store import _MIGRATIONS, HEAD_REVISION

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    assert ScriptDirectory.from_config(cfg).get_current_head() == HEAD_REVISION


def _write_while_rotating(monkeypatch: pytest.MonkeyPatch, store: Store, ciphertext: str) -> None:
    """Make rotate-keys race a write: tenant-a's row gets `ciphertext` just as rotation
    decrypts its old one (between its read and its guarded update)."""
    real_decrypt = Keyring.decrypt

    def decrypt_then_race(self: Keyring, stored: str, tenant_id: str) -> Secret:
        if tenant_id == "tenant-a":
            with store.session() as s:
                row = s.get(Tenant, "tenant-a")
                assert row is not None
                row.openai_api_key_encrypted = ciphertext
                s.add(row)
                s.commit()
        return real_decrypt(self, stored, tenant_id)

    monkeypatch.setattr(Keyring, "decrypt", decrypt_then_race)


def test_rotation_leaves_a_concurrent_change_alone(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key re-registered while rotate-keys runs is kept, not overwritten with the old one."""
    old, new = generate_master_key(), generate_master_key()
    store = _store_with_tenants(database_url, Keyring.parse(old))
    ring = Keyring.parse(f"{new},{old}")
    fresh = Keyring.parse(new).encrypt(OTHER_KEY, "tenant-a")
    _write_while_rotating(monkeypatch, store, fresh)  # the admin API replaces A's key now
    report = rotate_all(store, ring)
    assert (report.rotated, report.current, report.failed) == (1, 1, 0)
    assert store.load_ciphertext("tenant-a") == fresh
    with store.session() as s:
        rotated = s.exec(select(AuditEvent).where(AuditEvent.action == "openai_key.rotated")).all()
    assert [e.tenant_id for e in rotated] == ["tenant-b"]
    store.dispose()


def test_rotation_counts_a_key_written_meanwhile_under_an_old_master_key(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica still on the old ENCRYPTION_KEY registers a key while rotate-keys runs:
    the pass must not call the run complete (dropping the old key would lose that tenant)."""
    old, new = generate_master_key(), generate_master_key()
    store = _store_with_tenants(database_url, Keyring.parse(old))
    ring = Keyring.parse(f"{new},{old}")
    stale = Keyring.parse(old).encrypt(OTHER_KEY, "tenant-a")
    _write_while_rotating(monkeypatch, store, stale)
    report = rotate_all(store, ring)
    assert (report.rotated, report.failed, report.remaining) == (1, 0, 1)
    assert not report.complete
    monkeypatch.undo()
    again = rotate_all(store, ring)  # the re-run finishes the job
    assert (again.rotated, again.remaining) == (1, 0) and again.complete
    store.dispose()


# --- the seed's module-level functions (SPEC section 10) --------------------------


@pytest.fixture
def configured(database_url: str) -> Iterator[tuple[Keyring, Store]]:
    """The module functions configured as the app does it (`security.configure`), over a
    store with tenant-a and tenant-b keyed; unconfigured afterwards."""
    ring = Keyring.parse(generate_master_key())
    store = _store_with_tenants(database_url, ring)
    vault = Vault(ring, store.load_ciphertext)
    security.configure(vault)
    try:
        yield ring, store
    finally:
        security.unconfigure(vault)
        store.dispose()


def _set_ciphertext(store: Store, tenant_id: str, ciphertext: str | None) -> None:
    with store.session() as s:
        row = s.get(Tenant, tenant_id)
        assert row is not None
        row.openai_api_key_encrypted = ciphertext
        s.add(row)
        s.commit()


def _shows_nothing_of_the_key(exc: BaseException, *keys: str) -> None:
    """No key, nor a 12-character piece of one, in the exception's str, repr or traceback."""
    text = "".join(traceback.format_exception(exc)) + str(exc) + repr(exc)
    for key in keys:
        pieces = {key[i : i + 12] for i in range(len(key) - 11)}
        assert not [p for p in pieces if p in text], text


def test_seed_functions_round_trip(configured: tuple[Keyring, Store]) -> None:
    _, store = configured
    assert decrypt_openai_key("tenant-a") == GOOD_KEY
    assert decrypt_openai_key("tenant-b") == OTHER_KEY
    ciphertext = encrypt_openai_key(OTHER_KEY, "tenant-a")
    assert isinstance(ciphertext, str) and "GOODKEY" not in ciphertext
    assert "OTHERKEY" not in ciphertext
    _set_ciphertext(store, "tenant-a", ciphertext)
    assert decrypt_openai_key("tenant-a") == OTHER_KEY  # read now: nothing cached


async def test_seed_decrypt_async(configured: tuple[Keyring, Store]) -> None:
    assert await decrypt_openai_key_async("tenant-a") == GOOD_KEY
    with pytest.raises(OpenAIKeyMissing):
        await decrypt_openai_key_async("nobody")


def test_seed_functions_are_bound_to_the_tenant(configured: tuple[Keyring, Store]) -> None:
    _, store = configured
    _set_ciphertext(store, "tenant-b", encrypt_openai_key(GOOD_KEY, "tenant-a"))
    with pytest.raises(KeyDecryptionFailed) as info:
        decrypt_openai_key("tenant-b")
    _shows_nothing_of_the_key(info.value, GOOD_KEY, OTHER_KEY)


def test_seed_decrypt_without_a_key(configured: tuple[Keyring, Store]) -> None:
    _, store = configured
    _set_ciphertext(store, "tenant-b", None)
    for tenant_id in ("tenant-b", "no-such-tenant"):
        with pytest.raises(OpenAIKeyMissing) as info:
            decrypt_openai_key(tenant_id)
        assert f"POST /api/v1/tenants/{tenant_id}/openai-key" in info.value.message
        assert info.value.code == "openai_key_missing"
        _shows_nothing_of_the_key(info.value, GOOD_KEY, OTHER_KEY)


def test_seed_functions_show_nothing_of_the_key(configured: tuple[Keyring, Store]) -> None:
    ring, store = configured
    head, token = encrypt_openai_key(GOOD_KEY, "tenant-a").rsplit(".", 1)
    _set_ciphertext(store, "tenant-a", f"{head}.{token[:-6]}AAAAAA")  # tampered
    with pytest.raises(KeyDecryptionFailed) as info:
        decrypt_openai_key("tenant-a")
    _shows_nothing_of_the_key(info.value, GOOD_KEY)
    assert GOOD_KEY not in repr(Vault(ring, store.load_ciphertext))


def test_seed_functions_before_configuration_fail_clearly() -> None:
    """Unconfigured (as after an app's shutdown): a named error saying what to do. An older
    app shutting down leaves a newer app's vault in place."""
    older = Vault(Keyring.parse(generate_master_key()), lambda _: None)
    newer = Vault(Keyring.parse(generate_master_key()), lambda _: None)
    security.configure(older)
    security.configure(newer)
    security.unconfigure(older)
    with pytest.raises(OpenAIKeyMissing):
        decrypt_openai_key("acme")  # newer is still configured
    security.unconfigure(newer)
    for call in (lambda: encrypt_openai_key(GOOD_KEY, "acme"), lambda: decrypt_openai_key("acme")):
        with pytest.raises(VaultNotConfigured, match=r"proxy\.security\.configure\(") as info:
            call()
        _shows_nothing_of_the_key(info.value, GOOD_KEY)


def test_seed_functions_in_a_fresh_process_fail_clearly() -> None:
    """Nothing loaded a configuration: a clear error, no traceback from deep inside."""
    code = (
        "from proxy.security import decrypt_openai_key, VaultNotConfigured\n"
        "try:\n    decrypt_openai_key('acme')\n"
        "except VaultNotConfigured as exc:\n    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert "proxy.security has no vault yet" in out.stdout and "configure(" in out.stdout


def test_seed_functions_through_the_real_app(tmp_path: Path, master_key: str) -> None:
    """The app configures the module in its lifespan: a key registered through the admin
    API decrypts by tenant id in the same process; after shutdown, the clear error again."""
    with Stack.sqlite(tmp_path, master_key) as stack:
        stack.tenant("acme")  # registers TENANT_KEY (validated by the fake OpenAI)
        stack.tenant("beta", key=None)
        assert decrypt_openai_key("acme") == TENANT_KEY
        ciphertext = encrypt_openai_key(TENANT_KEY, "beta")
        assert Keyring.parse(master_key).decrypt(ciphertext, "beta").reveal() == TENANT_KEY
        with pytest.raises(OpenAIKeyMissing):
            decrypt_openai_key("beta")
    with pytest.raises(VaultNotConfigured):
        decrypt_openai_key("acme")


# --- credentials presented by callers ------------------------------------------------


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (b"Bearer abc", "abc"),
        (b"bearer abc", "abc"),
        (b"BEARER   abc  ", "abc"),
        (b"Bearer ", None),
        (b"Bearer", None),
        (b"Basic abc", None),
        (b"", None),
        (b"Bearerabc", None),
    ],
)
def test_bearer_token(header: bytes, token: str | None) -> None:
    assert bearer_token(header) == token


async def test_every_listener_parses_bearer_alike(tmp_path: Path, master_key: str) -> None:
    """/v1, the admin API and /metrics all accept the scheme in any case (one parser)."""
    config_path = tmp_path / "config.yaml"
    config_path.write_text("metrics:\n  require_admin_token: true\n")
    app = create_app(make_config(f"sqlite:///{tmp_path / 'b.db'}", master_key, config_path))
    transport = httpx.ASGITransport(app=app)
    async with app.lifespan(), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        admin = {"Authorization": f"bEaReR {ADMIN_TOKEN}"}
        r = await c.post(
            "/api/v1/tenants", json={"name": "A", "tier": "pro", "id": "a"}, headers=admin
        )
        assert r.status_code == 201, r.text
        tenant = {"Authorization": f"BEARER {r.json()['api_key']}"}
        r = await c.get("/v1/models", headers=tenant)  # authenticated; no OpenAI key yet
        assert r.json()["error"]["code"] == "openai_key_missing"
        assert (await c.get("/metrics", headers=admin)).status_code == 200
        for wrong in ("Basic " + ADMIN_TOKEN, "Bearer " + ADMIN_TOKEN[:-1], "Bearer"):
            r = await c.get("/metrics", headers={"Authorization": wrong})
            assert r.status_code == 401


def test_generate_admin_token() -> None:
    a, b = generate_admin_token(), generate_admin_token()
    assert a.startswith("adm-") and a != b and len(a) >= MIN_ADMIN_TOKEN_LENGTH
    assert make_config("sqlite://", generate_master_key(), ADMIN_TOKEN=a).admin_token.reveal() == a
