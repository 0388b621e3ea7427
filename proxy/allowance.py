"""The trial allowance on the platform key: reserve before the call, settle when it ends.

One row per tenant and UTC day (`trial_allowance`) holds the requests made,
the tokens settled and the tokens `reserved` by requests in flight, so every
worker and replica shares one count.

- `reserve()`: one atomic upsert admits the request only if
  `requests < daily_requests` and `tokens + reserved + estimate <= daily_tokens`,
  and adds the estimate (`proxy.platform.estimate_tokens`) to `reserved`.
- `settle()`: when the request ends, however it ends, the reservation is
  released and `charged()` tokens are added: the upstream's usage when it was
  seen (a client that left after the usage arrived pays it); nothing when the
  upstream was not reached or answered an error; the reservation when the
  upstream may have worked but its usage was never seen (a client that left
  mid-stream, a cut stream, a timeout).

Bound (README, "Tiers"): admitted reservations never exceed the allowance, so
a day's tokens can exceed `daily_tokens` only by what requests use beyond
their own reservation; for text prompts with an output limit (given, or
`platform_key.default_output_tokens`) the reservation is an upper bound.
A reservation outlives a crashed worker until the day ends (it errs on the
platform's side).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from proxy.config import TierPolicy
from proxy.models import TrialAllowance
from proxy.platform import USAGE_ENDPOINTS
from proxy.upsert import insert_for
from proxy.usage import UsageRecord

log = logging.getLogger("byok.allowance")
_TABLE = TrialAllowance.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Reservation:
    """Tokens held for one platform-key request, on the day it was admitted."""

    tenant_id: str
    day: date
    tokens: int


def today() -> date:
    return datetime.now(UTC).date()


def reserve(
    engine: Engine, tenant_id: str, policy: TierPolicy, estimate: int
) -> Reservation | None:
    """Admit one platform-key request holding `estimate` tokens; None if over the allowance.

    An estimate larger than the whole allowance is capped to it (such a request
    runs only on an untouched day).
    """
    if policy.daily_requests <= 0 or policy.daily_tokens <= 0:
        return None
    held = min(estimate, policy.daily_tokens)
    day = today()
    insert = insert_for(engine.dialect.name)
    stmt = (
        insert(_TABLE)
        .values(tenant_id=tenant_id, day=day, requests=1, tokens=0, reserved=held)
        .on_conflict_do_update(
            index_elements=["tenant_id", "day"],
            set_={"requests": _TABLE.c.requests + 1, "reserved": _TABLE.c.reserved + held},
            where=(_TABLE.c.requests < policy.daily_requests)
            & (_TABLE.c.tokens + _TABLE.c.reserved + held <= policy.daily_tokens)
            & (_TABLE.c.tokens < policy.daily_tokens),
        )
        .returning(_TABLE.c.requests)
    )
    with engine.begin() as conn:
        admitted = conn.execute(stmt).first() is not None
    return Reservation(tenant_id, day, held) if admitted else None


def outcome(record: UsageRecord) -> str:
    """How a finished request is charged: `usage` (the upstream's usage was seen),
    `nothing`, or `reservation` (it may have worked, its usage never seen). One rule for
    the trial allowance and budgets (see module docstring)."""
    if record.usage is not None and record.usage.tokens is not None:
        return "usage"
    if record.upstream_status is None:  # never answered: did the upstream get to work?
        gone = record.client_disconnected or record.error_code == "upstream_timeout"
        return "reservation" if gone and record.path in USAGE_ENDPOINTS else "nothing"
    if record.upstream_status >= 400 and not record.client_disconnected:
        return "nothing"  # an error answered whole: OpenAI bills none
    if record.path in USAGE_ENDPOINTS:
        return "reservation"  # worked (or may have), usage never seen
    return "nothing"


def charged(reservation: Reservation, record: UsageRecord) -> int:
    """Tokens a finished platform-key request costs the allowance (see module docstring)."""
    result = outcome(record)
    if result == "usage":
        return record.usage.tokens  # type: ignore[union-attr,return-value]
    return reservation.tokens if result == "reservation" else 0


def settle(engine: Engine, reservation: Reservation, tokens: int) -> None:
    """Release `reservation` and charge `tokens` to the day it was made on.

    A database error is logged, not raised: the answer the tenant already got
    must not be spoiled, and the reservation then stays held until the day ends
    (it errs on the platform's side).
    """
    try:
        _settle(engine, reservation, tokens)
    except SQLAlchemyError as exc:
        log.error(
            "trial allowance of tenant %s not settled (%d tokens, %d reserved): %s",
            reservation.tenant_id,
            tokens,
            reservation.tokens,
            type(exc).__name__,
        )


def _settle(engine: Engine, reservation: Reservation, tokens: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(_TABLE)
            .where(_TABLE.c.tenant_id == reservation.tenant_id, _TABLE.c.day == reservation.day)
            .values(
                tokens=_TABLE.c.tokens + tokens,
                reserved=_TABLE.c.reserved - reservation.tokens,
            )
        )
