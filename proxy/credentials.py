"""Which OpenAI key a request uses: the tenant's own (decrypted now), or the platform's.

- tenant key `active`: decrypt it for this request (`byok`);
- tenant key `invalid` (upstream said 401 earlier): 402 at once, no upstream call;
- no key: tiers with platform fallback use `PLATFORM_OPENAI_KEY` within a daily
  allowance counted in the database (shared by every worker and replica);
  other tiers get 402 `openai_key_missing`.

Also here: marking a stored key invalid after the upstream rejected it. The
allowance itself is `proxy.allowance`; what the platform key may be used for,
`proxy.platform`.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import update
from sqlmodel import col

from proxy import audit, invalidation
from proxy.config import Config, TierPolicy
from proxy.errors import OpenAIKeyInvalid, OpenAIKeyMissing, TrialQuotaExceeded
from proxy.models import Tenant, utcnow
from proxy.security import Secret
from proxy.store import Store, TenantSnapshot


@dataclass(frozen=True, slots=True)
class Credential:
    """The key for one upstream call and where it came from (`byok` or `platform`)."""

    secret: Secret
    source: str


def register_hint(tenant_id: str) -> str:
    return f"POST /api/v1/tenants/{tenant_id}/openai-key"


def invalid_key_error(tenant_id: str) -> OpenAIKeyInvalid:
    return OpenAIKeyInvalid(
        "OpenAI rejected this tenant's API key (invalid, revoked, expired or account "
        "deactivated). Create a new key in the OpenAI dashboard and register it at "
        f"{register_hint(tenant_id)}; requests fail until then."
    )


def choose(config: Config, tenant: TenantSnapshot) -> Credential | TierPolicy:
    """The tenant's own key, or the tier policy to check before using the platform key.

    Raises the 402s that need no database write.
    """
    if tenant.key_status == "active" and tenant.ciphertext:
        return Credential(config.keyring.decrypt(tenant.ciphertext, tenant.id), "byok")
    if tenant.key_status == "invalid":
        raise invalid_key_error(tenant.id)
    policy = config.tiers.get(tenant.tier)
    if policy is None or not policy.platform_fallback:
        raise OpenAIKeyMissing(
            f"Tenant {tenant.id} has no OpenAI API key, and its tier ({tenant.tier}) must bring "
            f"its own. Register one at {register_hint(tenant.id)}."
        )
    if config.platform_openai_key is None:
        raise OpenAIKeyMissing(
            f"Tenant {tenant.id} has no OpenAI API key, and the platform key its tier "
            f"({tenant.tier}) falls back to is not configured on this proxy. Register your own "
            f"at {register_hint(tenant.id)}, or ask the operator to set PLATFORM_OPENAI_KEY."
        )
    return policy


def fallback_without_platform_key(config: Config) -> list[str]:
    """Tiers configured to fall back to the platform key when none is set (warned at start)."""
    if config.platform_openai_key is not None:
        return []
    return sorted(name for name, policy in config.tiers.items() if policy.platform_fallback)


def trial_exhausted(tenant: TenantSnapshot, policy: TierPolicy) -> TrialQuotaExceeded:
    return TrialQuotaExceeded(
        f"Tenant {tenant.id} has used today's trial allowance on the platform key "
        f"({policy.daily_requests} requests / {policy.daily_tokens} tokens per UTC day). "
        f"Register your own OpenAI key at {register_hint(tenant.id)} or wait until tomorrow (UTC)."
    )


def mark_invalid(store: Store, tenant_id: str, ciphertext: str, request_id: str) -> bool:
    """Mark the stored key invalid (if it is still the one that failed) and audit it."""
    with store.session() as s:
        changed = s.execute(
            update(Tenant)
            .where(
                col(Tenant.id) == tenant_id,
                col(Tenant.openai_api_key_encrypted) == ciphertext,
                col(Tenant.openai_key_status) == "active",
            )
            .values(openai_key_status="invalid", updated_at=utcnow())
        ).rowcount  # type: ignore[attr-defined]
        if changed:
            hint = s.get(Tenant, tenant_id).openai_key_hint  # type: ignore[union-attr]
            actor = audit.Actor("system", None, request_id, None)
            audit.record(s, actor, tenant_id, "openai_key.invalidated", hint)
            invalidation.tenant_changed(s, tenant_id)
            s.commit()
    store.invalidate_tenant(tenant_id)
    return bool(changed)
