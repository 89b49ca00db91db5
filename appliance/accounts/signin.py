"""Console sign-in: password check, throttling of failures, and their audit rows.

Failures are counted from the audit log itself, so the throttle holds across
restarts and needs no table of its own: per account (since its last
successful sign-in) and per client address, over a sliding window.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlite_utils import Database

from appliance.accounts import audit
from appliance.accounts.accounts import Account, get_account, verify_password
from appliance.core.clock import parse_utc, utc_clock, utc_iso
from appliance.core.config import ConsoleConfig
from appliance.core.errors import Forbidden, TooManyRequests, Unauthorized

WRONG_CREDENTIALS = "The email or password is not right"
DISABLED = "This account is disabled; ask an administrator"
FAILED, SUCCEEDED, THROTTLED = "login.failed", "login.success", "login.throttled"
SIGNED_OUT = "logout"


@dataclass(frozen=True)
class SignInLimits:
    window: timedelta
    per_account: int
    per_address: int

    @classmethod
    def from_config(cls, console: ConsoleConfig) -> SignInLimits:
        return cls(timedelta(minutes=console.signin_window_minutes),
                   console.max_failed_signins_per_account,
                   console.max_failed_signins_per_address)


@functools.cache
def _decoy_hash() -> str:
    from appliance.accounts.accounts import hash_password

    return hash_password("decoy password, never matches")


def sign_in(db: Database, email: str, password: str, actor: audit.Actor,
            limits: SignInLimits) -> Account:
    email = email.strip().lower()
    row = db.execute("SELECT id, password_hash, disabled_at FROM accounts WHERE email = ?",
                     [email]).fetchone()
    account_id = row[0] if row else None
    now = utc_clock()
    wait = _seconds_throttled(db, account_id, actor.ip_address, now, limits)
    if wait:
        audit.record(db, THROTTLED, actor, account_id=account_id, details={"email": email})
        minutes = math.ceil(wait / 60)
        raise TooManyRequests(
            f"Too many failed sign-ins; try again in {minutes} minute{'s' * (minutes != 1)}",
            retry_after=wait)
    # An unknown email costs the same hashing time as a known one, so timing
    # does not tell which accounts exist.
    matches = verify_password(row[1] if row else _decoy_hash(), password)
    if not matches:
        audit.record(db, FAILED, actor, account_id=account_id,
                     details={"email": email,
                              "reason": "wrong password" if row else "unknown account"})
        raise Unauthorized(WRONG_CREDENTIALS)
    if row[2] is not None:
        audit.record(db, FAILED, actor, account_id=account_id,
                     details={"email": email, "reason": "account disabled"})
        raise Forbidden(DISABLED)
    audit.record(db, SUCCEEDED, actor, account_id=row[0])
    return get_account(db, row[0])


def _seconds_throttled(db: Database, account_id: int | None, ip_address: str | None,
                       now: datetime, limits: SignInLimits) -> int:
    """0 when a sign-in may be tried, else the seconds until one may."""
    since = utc_iso(now - limits.window)
    waits = []
    if account_id is not None:
        waits.append(_wait(db, "account_id = ? AND id > (SELECT COALESCE(MAX(id), 0) FROM audit_log"
                               " WHERE account_id = ? AND action = ?)",
                           [account_id, account_id, SUCCEEDED], since, limits.per_account,
                           now, limits.window))
    if ip_address:
        waits.append(_wait(db, "ip_address = ?", [ip_address], since, limits.per_address,
                           now, limits.window))
    return max(waits, default=0)


def _wait(db: Database, where: str, params: list, since: str, allowed: int, now: datetime,
          window: timedelta) -> int:
    # The throttle lifts when enough of the counted failures have left the
    # window that fewer than `allowed` remain: when the oldest of the newest
    # `allowed` failures does.
    row = db.execute(
        f"SELECT created_at FROM audit_log WHERE action = ? AND created_at >= ? AND {where}"
        " ORDER BY id DESC LIMIT 1 OFFSET ?",
        [FAILED, since, *params, allowed - 1],
    ).fetchone()
    if row is None:
        return 0
    return max(1, math.ceil((parse_utc(row[0]) + window - now).total_seconds()))
