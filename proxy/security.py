"""The key vault (tenant OpenAI keys encrypted at rest) and the credentials callers present.

Encryption is Fernet (AES-128-CBC with HMAC-SHA256; the 256-bit Fernet key is
half signing key, half encryption key). Each tenant gets its own Fernet key,
derived with HKDF-SHA256 from the master key and the tenant id, so a
ciphertext copied into another tenant's row fails to decrypt.

Stored ciphertexts look like ``v1.<kid>.<fernet token>``: ``kid`` is a short
id of the master key that made it, so rotation (``ENCRYPTION_KEY=new,old``
then ``byok-proxy rotate-keys``) can tell what is left to re-encrypt.

Plaintext keys travel inside `Secret`, whose repr/str never show them; only
the code that sets the upstream ``Authorization`` header calls `reveal()`.

The seed's functions, `encrypt_openai_key` and `decrypt_openai_key`, are
module-level (SPEC section 10): they use the process's `Vault`, which the
composition roots hand over with `configure()` once their configuration is
loaded (the app in its lifespan, the CLI per command).

Credentials: proxy keys (``byok-``, stored as SHA-256), admin tokens
(``adm-``), and the one parser of ``Authorization: Bearer`` headers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proxy.errors import KeyDecryptionFailed, OpenAIKeyMissing

__all__ = [
    "Keyring",
    "Secret",
    "Vault",
    "VaultNotConfigured",
    "bearer_token",
    "configure",
    "decrypt_openai_key",
    "decrypt_openai_key_async",
    "encrypt_openai_key",
    "generate_admin_token",
    "generate_master_key",
    "hash_proxy_key",
    "key_hint",
    "new_proxy_key",
    "tokens_equal",
    "unconfigure",
]

CIPHERTEXT_VERSION = "v1"
PROXY_KEY_PREFIX = "byok-"
ADMIN_TOKEN_PREFIX = "adm-"  # noqa: S105 (a prefix, not a token)
_HKDF_SALT = b"byok-proxy tenant key v1"
_MAX_DERIVED = 10_000


class Secret:
    """A secret string whose repr and str are masked; `reveal()` gives the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The plaintext; call only where it is sent, never to log or store it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(
            self._value.encode(), other._value.encode()
        )

    def __hash__(self) -> int:
        return hash(("Secret", hashlib.sha256(self._value.encode()).digest()))

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("Secret values cannot be pickled")

    def __len__(self) -> int:
        return len(self._value)


def generate_master_key() -> str:
    """A fresh Fernet master key (what `byok-proxy gen-key` prints)."""
    return Fernet.generate_key().decode()


def key_hint(plaintext: str) -> str:
    """What we may show of an OpenAI key: ``sk-...abcd``."""
    return f"{plaintext[:3]}...{plaintext[-4:]}"


@dataclass(frozen=True)
class _MasterKey:
    kid: str
    material: bytes

    def __repr__(self) -> str:
        return f"_MasterKey(kid={self.kid!r})"


class Keyring:
    """The master keys from ENCRYPTION_KEY: the first encrypts, all decrypt."""

    def __init__(self, keys: list[_MasterKey]) -> None:
        if not keys:
            raise ValueError("no keys given")
        self._keys = keys
        self._by_kid = {k.kid: k for k in keys}
        # Derived per-tenant Fernet keys (HKDF output, not OpenAI keys), kept to spare the
        # hot path an HKDF per request. Bounded: cleared when it grows past _MAX_DERIVED.
        self._derived: dict[tuple[str, str], Fernet] = {}

    @classmethod
    def parse(cls, value: str) -> Keyring:
        """Parse a comma-separated list of Fernet keys; raise ValueError saying what is wrong."""
        keys = []
        for n, part in enumerate(p.strip() for p in value.split(",")):
            if not part:
                continue
            try:
                material = base64.urlsafe_b64decode(part.encode())
            except (binascii.Error, ValueError):
                raise ValueError(f"key #{n + 1} is not url-safe base64") from None
            if len(material) != 32:
                raise ValueError(f"key #{n + 1} must decode to 32 bytes, not {len(material)}")
            kid = hashlib.sha256(b"byok-kid" + material).hexdigest()[:8]
            keys.append(_MasterKey(kid, material))
        if not keys:
            raise ValueError("no keys given")
        return cls(keys)

    @property
    def primary_kid(self) -> str:
        """Id of the key new ciphertexts are made with."""
        return self._keys[0].kid

    @property
    def kids(self) -> list[str]:
        return [k.kid for k in self._keys]

    def __repr__(self) -> str:
        return f"Keyring(kids={self.kids!r})"

    def _fernet(self, master: _MasterKey, tenant_id: str) -> Fernet:
        fernet = self._derived.get((master.kid, tenant_id))
        if fernet is None:
            derived = HKDF(
                algorithm=hashes.SHA256(), length=32, salt=_HKDF_SALT, info=tenant_id.encode()
            ).derive(master.material)
            fernet = Fernet(base64.urlsafe_b64encode(derived))
            if len(self._derived) >= _MAX_DERIVED:
                self._derived.clear()
            self._derived[(master.kid, tenant_id)] = fernet
        return fernet

    def encrypt(self, plaintext_key: str, tenant_id: str) -> str:
        """Encrypt under the primary key, bound to `tenant_id`."""
        master = self._keys[0]
        token = self._fernet(master, tenant_id).encrypt(plaintext_key.encode()).decode()
        return f"{CIPHERTEXT_VERSION}.{master.kid}.{token}"

    def decrypt(self, ciphertext: str, tenant_id: str) -> Secret:
        """Decrypt a stored ciphertext of `tenant_id`; raise KeyDecryptionFailed otherwise."""
        version, _, rest = ciphertext.partition(".")
        kid, _, token = rest.partition(".")
        if version != CIPHERTEXT_VERSION or not token:
            raise KeyDecryptionFailed()
        master = self._by_kid.get(kid)
        if master is None:
            raise KeyDecryptionFailed(
                f"The stored OpenAI key was made with master key id {kid}, which is not in "
                "ENCRYPTION_KEY. The operator must restore that key."
            )
        try:
            return Secret(self._fernet(master, tenant_id).decrypt(token.encode()).decode())
        except InvalidToken:
            raise KeyDecryptionFailed() from None

    @staticmethod
    def kid_of(ciphertext: str) -> str:
        """The master key id recorded in a stored ciphertext."""
        return ciphertext.split(".", 2)[1] if ciphertext.count(".") >= 2 else ""


class Vault:
    """`encrypt_openai_key` / `decrypt_openai_key` over a keyring and the tenant store.

    `load_ciphertext(tenant_id)` returns the stored ciphertext or None; the
    store provides it, so this module stays free of database code.
    """

    def __init__(self, keyring: Keyring, load_ciphertext: Callable[[str], str | None]) -> None:
        self.keyring = keyring
        self._load = load_ciphertext

    def __repr__(self) -> str:
        return f"Vault(kids={self.keyring.kids!r})"

    def encrypt_openai_key(self, plaintext_key: str | Secret, tenant_id: str) -> str:
        """The ciphertext to store for `tenant_id`."""
        value = plaintext_key.reveal() if isinstance(plaintext_key, Secret) else plaintext_key
        return self.keyring.encrypt(value, tenant_id)

    def decrypt_openai_key(self, tenant_id: str) -> Secret:
        """The tenant's OpenAI key, for this request only; KeyDecryptionFailed if unreadable."""
        ciphertext = self._load(tenant_id)
        if ciphertext is None:
            raise OpenAIKeyMissing(
                f"Tenant {tenant_id!r} has no stored OpenAI key (no such tenant, or none "
                f"registered). Register one at POST /api/v1/tenants/{tenant_id}/openai-key."
            )
        return self.keyring.decrypt(ciphertext, tenant_id)


# --- the seed's functions (SPEC section 10) ---------------------------------------

_vault: Vault | None = None


class VaultNotConfigured(RuntimeError):
    """`encrypt_openai_key` / `decrypt_openai_key` called before `configure()`."""

    def __init__(self) -> None:
        super().__init__(
            "proxy.security has no vault yet: encrypt_openai_key/decrypt_openai_key work once "
            "the proxy app has started (its lifespan) or a byok-proxy command has loaded its "
            "configuration. In your own process, load the config and call "
            "proxy.security.configure(Vault(config.keyring, store.load_ciphertext)) first."
        )


def configure(vault: Vault) -> None:
    """Make `vault` the one the module functions use (called by the composition roots).

    Process-wide by design: the seed's functions take no vault argument. The
    vault holds the keyring and a way to read ciphertexts, never a plaintext.
    """
    global _vault
    _vault = vault


def unconfigure(vault: Vault) -> None:
    """Forget `vault` if it is still the configured one (an app shutting down leaves a
    newer app's vault alone); the module functions then raise VaultNotConfigured."""
    global _vault
    if _vault is vault:
        _vault = None


def _configured() -> Vault:
    if _vault is None:
        raise VaultNotConfigured()
    return _vault


def encrypt_openai_key(plaintext_key: str, tenant_id: str) -> str:
    """The ciphertext to store for `tenant_id` (under the primary master key); stores nothing."""
    return _configured().encrypt_openai_key(plaintext_key, tenant_id)


def decrypt_openai_key(tenant_id: str) -> str:
    """The tenant's OpenAI key, read from the database and decrypted now; keep it local.

    Synchronous on purpose: callable from plain code (a script, a worker, the
    CLI) and from a coroutine alike, as the user story calls it; it blocks for
    one database read. On an event loop that must not block, use
    `decrypt_openai_key_async`. Nothing is cached: every call reads and decrypts.

    Raises OpenAIKeyMissing (no such tenant or no key), KeyDecryptionFailed
    (wrong ENCRYPTION_KEY, tampered row, or another tenant's ciphertext) and
    VaultNotConfigured; no message carries any part of the key.
    """
    return _configured().decrypt_openai_key(tenant_id).reveal()


async def decrypt_openai_key_async(tenant_id: str) -> str:
    """`decrypt_openai_key` with its database read in a worker thread, for event loops."""
    vault = _configured()  # raise here, in the caller's frame, not in the thread
    secret = await asyncio.to_thread(vault.decrypt_openai_key, tenant_id)
    return secret.reveal()


def new_proxy_key() -> str:
    """A fresh proxy key: ``byok-`` and 256 bits of randomness."""
    return PROXY_KEY_PREFIX + secrets.token_urlsafe(32)


def generate_admin_token() -> str:
    """A fresh admin token: ``adm-`` and 256 bits of randomness (gen-key, ``serve --dev``)."""
    return ADMIN_TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_proxy_key(key: str) -> str:
    """SHA-256 of a proxy key; only this is stored."""
    return hashlib.sha256(key.encode()).hexdigest()


def tokens_equal(a: str, b: str) -> bool:
    """Constant-time string comparison."""
    return hmac.compare_digest(a.encode(), b.encode())


def bearer_token(authorization: bytes) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, or None.

    The one parser of the header (data plane, admin API, /metrics). The scheme
    is case-insensitive (RFC 9110 section 11.1). Bytes, as ASGI gives headers.
    """
    scheme, _, token = authorization.partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip().decode("latin-1") or None
