"""The key vault: encryption, tenant binding, tampering, rotation, Secret masking."""

from __future__ import annotations

import logging
import pickle

import pytest
from helpers import GOOD_KEY, OTHER_KEY
from sqlmodel import select

from admin.tenants import create_tenant_row
from proxy.audit import SYSTEM
from proxy.errors import KeyDecryptionFailed
from proxy.models import AuditEvent, Tenant
from proxy.rotation import rotate_all
from proxy.security import (
    Keyring,
    Secret,
    Vault,
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
