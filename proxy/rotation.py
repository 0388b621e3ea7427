"""Re-encrypting every stored OpenAI key under the primary master key (`rotate-keys`).

Safe while replicas serve and after a crash: each tenant is re-encrypted in its
own transaction, guarded by the ciphertext it read (a concurrent change wins
and is left alone), with its `openai_key.rotated` audit event. Ciphertexts
already under the primary key are skipped, so a second run changes nothing.

The pass ends with a re-check of the whole table: a key written meanwhile
under an old master key (a replica not yet restarted with the new
`ENCRYPTION_KEY`) is counted in `remaining`, and the CLI exits non-zero, so
the operator never drops an old key that is still needed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import update
from sqlmodel import col, select

from proxy import audit
from proxy.errors import KeyDecryptionFailed
from proxy.models import Tenant
from proxy.security import Keyring
from proxy.store import Store

log = logging.getLogger("byok.rotation")


@dataclass
class RotationReport:
    """What a pass did; `remaining` is read after it: ciphertexts still under an old key."""

    rotated: int = 0
    current: int = 0
    failed: int = 0
    remaining: int = 0

    @property
    def complete(self) -> bool:
        """True when every stored key is under the primary key (the old ones may go)."""
        return self.failed == 0 and self.remaining == 0


def rotate_all(store: Store, keyring: Keyring) -> RotationReport:
    """Re-encrypt what is not under `keyring`'s primary key; report what happened."""
    report = RotationReport()
    with store.session() as s:
        rows = s.exec(
            select(Tenant.id, Tenant.openai_api_key_encrypted).where(
                col(Tenant.openai_api_key_encrypted).is_not(None)
            )
        ).all()
    for tenant_id, stored in rows:
        ciphertext: str = stored or ""
        if Keyring.kid_of(ciphertext) == keyring.primary_kid:
            report.current += 1
            continue
        try:
            fresh = keyring.encrypt(keyring.decrypt(ciphertext, tenant_id).reveal(), tenant_id)
        except KeyDecryptionFailed:
            log.error("rotate-keys: tenant %s: stored key does not decrypt; left as is", tenant_id)
            report.failed += 1
            continue
        with store.session() as s:
            changed = s.execute(
                update(Tenant)
                .where(
                    col(Tenant.id) == tenant_id, col(Tenant.openai_api_key_encrypted) == ciphertext
                )
                .values(openai_api_key_encrypted=fresh)
            ).rowcount  # type: ignore[attr-defined]
            if changed:
                hint = s.get(Tenant, tenant_id).openai_key_hint  # type: ignore[union-attr]
                audit.record(s, audit.SYSTEM, tenant_id, "openai_key.rotated", hint)
                s.commit()
                report.rotated += 1
            else:  # changed concurrently: the re-check below tells what it was made with
                report.current += 1
    report.remaining = count_not_current(store, keyring)
    return report


def count_not_current(store: Store, keyring: Keyring) -> int:
    """How many stored ciphertexts are not under `keyring`'s primary key."""
    with store.session() as s:
        stored = s.exec(
            select(Tenant.openai_api_key_encrypted).where(
                col(Tenant.openai_api_key_encrypted).is_not(None)
            )
        ).all()
    return sum(Keyring.kid_of(c or "") != keyring.primary_kid for c in stored)
