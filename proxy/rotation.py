"""Re-encrypting every stored OpenAI key under the primary master key (`rotate-keys`).

Refused while a live replica (`proxy.replicas`) cannot decrypt the primary key, or
encrypts with another one: rotating then would make its requests fail, or leave
keys behind. `--force` goes ahead anyway.

Safe while replicas serve and resumable after a crash: tenants are read in
batches (in id order); each batch's re-encrypted keys and their
`openai_key.rotated` audit events commit in one transaction, each update guarded
by the ciphertext it read (a concurrent change wins and is left alone).
Ciphertexts already under the primary key are skipped, so a re-run finishes what
a crashed run left and a second run changes nothing.

The pass ends with a re-count of the whole table: a key written meanwhile under
an old master key counts as `remaining`, and the command exits non-zero, so the
operator never drops an old key that is still needed.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from sqlalchemy import func, update
from sqlmodel import col, select

from proxy import audit
from proxy.errors import KeyDecryptionFailed
from proxy.models import AuditEvent, Tenant
from proxy.replicas import live_replicas
from proxy.security import Keyring
from proxy.store import Store

log = logging.getLogger("byok.rotation")

BATCH_SIZE = 500
_PREFIX_CHARS = 12  # "v1.<8-hex kid>."


@dataclass
class RotationReport:
    """What a pass did: `current` were skipped (already under the primary key), `failed`
    were left (`reasons`: why, with counts); `remaining` is counted after the pass."""

    rotated: int = 0
    current: int = 0
    failed: int = 0
    remaining: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    @property
    def complete(self) -> bool:
        """True when every stored key is under the primary key (the old ones may go)."""
        return self.failed == 0 and self.remaining == 0


def stored_key_ids(store: Store) -> Counter[str]:
    """How many stored ciphertexts each master key id made ("" for an unreadable one)."""
    prefix = func.substr(Tenant.openai_api_key_encrypted, 1, _PREFIX_CHARS)
    with store.session() as s:
        rows = s.exec(
            select(prefix, func.count())
            .where(col(Tenant.openai_api_key_encrypted).is_not(None))
            .group_by(prefix)
        ).all()
    counts: Counter[str] = Counter()
    for start, n in rows:
        counts[Keyring.kid_of(start or "")] += n
    return counts


def count_not_current(store: Store, keyring: Keyring) -> int:
    """How many stored ciphertexts are not under `keyring`'s primary key."""
    counts = stored_key_ids(store)
    return sum(counts.values()) - counts[keyring.primary_kid]


def _why_left(keyring: Keyring, ciphertext: str) -> str:
    kid = Keyring.kid_of(ciphertext)
    if not kid:
        return "not a byok ciphertext"
    if kid not in keyring.kids:
        return f"made with key id {kid}, which is not in ENCRYPTION_KEY"
    return f"does not decrypt with key {kid} (corrupt, or copied from another tenant's row)"


def _rotate_batch(
    store: Store, keyring: Keyring, rows: list[tuple[str, str, str | None]], report: RotationReport
) -> None:
    """Re-encrypt one batch; the new ciphertexts and their audit events commit together."""
    with store.session() as s:
        for tenant_id, ciphertext, hint in rows:
            if Keyring.kid_of(ciphertext) == keyring.primary_kid:
                report.current += 1
                continue
            try:
                fresh = keyring.encrypt(keyring.decrypt(ciphertext, tenant_id).reveal(), tenant_id)
            except KeyDecryptionFailed:
                reason = _why_left(keyring, ciphertext)
                log.error("rotate-keys: tenant %s: stored key %s; left as is", tenant_id, reason)
                report.failed += 1
                report.reasons[reason] += 1
                continue
            changed = s.execute(
                update(Tenant)
                .where(
                    col(Tenant.id) == tenant_id, col(Tenant.openai_api_key_encrypted) == ciphertext
                )
                .values(openai_api_key_encrypted=fresh)
            ).rowcount  # type: ignore[attr-defined]
            if changed:
                audit.record(s, audit.SYSTEM, tenant_id, "openai_key.rotated", hint)
                report.rotated += 1
            else:  # changed concurrently: the re-count at the end tells what it was made with
                report.current += 1
        s.commit()


def rotate_all(
    store: Store,
    keyring: Keyring,
    batch_size: int = BATCH_SIZE,
    on_batch: Callable[[int], None] | None = None,
) -> RotationReport:
    """Re-encrypt what is not under `keyring`'s primary key, `batch_size` tenants at a
    time; `on_batch(done)` after each batch. Report what happened."""
    report = RotationReport()
    after = ""
    while True:
        with store.session() as s:
            rows = s.exec(
                select(Tenant.id, Tenant.openai_api_key_encrypted, Tenant.openai_key_hint)
                .where(col(Tenant.openai_api_key_encrypted).is_not(None), col(Tenant.id) > after)
                .order_by(col(Tenant.id))
                .limit(batch_size)
            ).all()
        if not rows:
            break
        _rotate_batch(store, keyring, [(t, c or "", h) for t, c, h in rows], report)
        after = rows[-1][0]
        if on_batch is not None:
            on_batch(report.rotated + report.current + report.failed)
    report.remaining = count_not_current(store, keyring)
    return report


class Progress:
    """Progress on `stream`: one rewritten line on a terminal, else a line every
    `every` seconds (and at the end)."""

    def __init__(self, stream: TextIO, total: int, every: float = 5.0) -> None:
        self.stream = stream
        self.total = total
        self.every = every
        self.tty = stream.isatty()
        self._last = time.monotonic()

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        finished = done >= self.total
        if not (self.tty or finished or now - self._last >= self.every):
            return
        self._last = now
        percent = min(done, self.total) * 100 // self.total
        text = f"rotate-keys: {done}/{self.total} stored keys done ({percent}%)"
        if self.tty:
            self.stream.write("\r" + text + ("\n" if finished else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _name(keyring: Keyring, kid: str) -> str:
    if kid in keyring.kids:
        return f"key {kid} (#{keyring.kids.index(kid) + 1} in ENCRYPTION_KEY)"
    return f"key id {kid or '?'} (not in ENCRYPTION_KEY)"


def _refusals(store: Store, primary: str) -> list[str]:
    return [
        f"replica on host {r.host}, pid {r.pid}: {problem}"
        for r in live_replicas(store)
        if (problem := r.problem_with(primary)) is not None
    ]


def run_rotate_keys(
    store: Store,
    keyring: Keyring,
    *,
    force: bool,
    batch_size: int,
    out: TextIO,
    err: TextIO,
    summary: dict[str, object] | None = None,
) -> int:
    """The `rotate-keys` command: check the replicas, rotate, say what happened; exit code.
    `summary` (for --json) gets the figures: key id, replicas refused, counts."""
    primary = keyring.primary_kid
    refusals = _refusals(store, primary)
    figures: dict[str, object] = {} if summary is None else summary
    figures.update(primary_key_id=primary, replicas_not_ready=len(refusals))
    for line in refusals:
        print(f"rotate-keys: {line}", file=err)
    if refusals and not force:
        print(
            f"rotate-keys: refused: {len(refusals)} running replica(s) are not ready for "
            f"{_name(keyring, primary)}. Restart each with ENCRYPTION_KEY=new,old (new key "
            "first), then run rotate-keys again (or pass --force to go ahead anyway).",
            file=err,
        )
        return 1
    if refusals:
        print("rotate-keys: --force: going ahead anyway.", file=err)
    print(f"rotate-keys: encrypting with {_name(keyring, primary)}", file=out)
    before = stored_key_ids(store)
    total = sum(before.values())
    figures["stored"] = total
    if not total:
        print("rotate-keys: no stored OpenAI keys; nothing to do.", file=out)
        return 0
    held = ", ".join(f"{n} under {_name(keyring, kid)}" for kid, n in before.most_common())
    print(f"rotate-keys: {total} stored OpenAI keys: {held}", file=out)
    report = rotate_all(store, keyring, batch_size, Progress(err, total))
    figures.update(
        re_encrypted=report.rotated,
        skipped=report.current,
        left=report.failed,
        written_meanwhile_under_old_keys=report.remaining - report.failed,
    )
    print(
        f"rotate-keys: {report.rotated} re-encrypted, {report.current} skipped (already under "
        f"key {primary}), {report.failed} left",
        file=out,
    )
    for reason, n in report.reasons.most_common():
        print(f"rotate-keys: left {n}: {reason} (tenants named above)", file=err)
    if report.remaining > report.failed:
        print(
            f"rotate-keys: {report.remaining - report.failed} stored key(s) were written "
            "meanwhile under an old key (a replica not yet restarted with the new key first). "
            "Keep the old key; restart every replica with ENCRYPTION_KEY=new,old, then re-run.",
            file=err,
        )
    unused = [kid for kid in keyring.kids[1:] if not before[kid]]
    if report.complete and not report.rotated and unused:
        names = ", ".join(_name(keyring, kid) for kid in unused)
        live = live_replicas(store)
        if live and all(r.primary_key_id == primary for r in live) and _ever_rotated(store):
            # The running replicas encrypt with this key too, and a rotation has run
            # before: a re-run after a finished rotation, not the new key put last (with
            # no rotation ever, every replica was given the new key last).
            print(
                f"rotate-keys: rotation already complete: all {total} stored keys are under "
                f"{_name(keyring, primary)}, which every running replica encrypts with; "
                f"{names} encrypts none of them and can be removed from ENCRYPTION_KEY.",
                file=out,
            )
            return 0
        print(
            f"rotate-keys: nothing was re-encrypted: all {total} stored keys were already under "
            f"{_name(keyring, primary)}, and {names} encrypts none of them. If that is your new "
            "key, it must come first: set ENCRYPTION_KEY=new,old on every replica and here, "
            "then run rotate-keys again. If it is the old key, rotation is already complete: "
            "remove it from ENCRYPTION_KEY.",
            file=err,
        )
        return 1
    return 0 if report.complete else 1


def _ever_rotated(store: Store) -> bool:
    """Whether any rotation has re-encrypted a key here (an `openai_key.rotated` event)."""
    with store.session() as s:
        found = s.exec(
            select(AuditEvent.id).where(col(AuditEvent.action) == "openai_key.rotated").limit(1)
        ).first()
    return found is not None
