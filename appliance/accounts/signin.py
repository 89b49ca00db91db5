"""Console sign-in: password check, throttling of failures, and their audit rows.

Failed sign-ins are counted three ways, in the signin_failures table:

- per email and client address (a "pair"): past
  console.max_failed_signins_per_account_and_address failures, each further one
  makes the next attempt from that address wait 1 s, then 2 s, 4 s... up to
  console.signin_max_wait_seconds. A stranger elsewhere fails in a pair of his
  own, so he never holds the owner back;
- per client address, whatever the emails, with the same growing waits past
  console.max_failed_signins_per_address: one address trying many accounts;
- per email from every address: past console.max_failed_signins_per_account,
  each attempt waits a short, fixed console.signin_account_wait_seconds after
  the latest failure: many addresses guessing one account's password. Addresses
  the account has signed in from are exempt, so strangers never slow its owner
  there, and elsewhere by seconds at most.

A successful sign-in clears its pair and takes the pair's failures off the other
two counts; an administrator's unlock does so for every pair of the account and
clears its all-address count. A count is forgotten once
console.signin_window_minutes pass without a failure, after the wait it imposed.
Counts are keyed by the email as typed, so an unknown email is throttled exactly
like an account's and throttling does not tell which accounts exist.

Each attempt that may go ahead is counted as a failure before its password is
checked, in the transaction that read the counts, and a success takes it back:
attempts sent at the same moment cannot all pass the throttle.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from appliance.accounts import audit
from appliance.accounts.accounts import Account, get_account, verify_password
from appliance.core.clock import parse_utc, utc_iso
from appliance.core.config import ConsoleConfig
from appliance.core.database import Database, immediate
from appliance.core.errors import Forbidden, TooManyRequests, Unauthorized

WRONG_CREDENTIALS = "The email or password is not right"
DISABLED = "This account is disabled; ask an administrator"
FAILED, SUCCEEDED, THROTTLED = "login.failed", "login.success", "login.throttled"
UNLOCKED = "login.unlocked"
SIGNED_OUT = "logout"

# The three counts, as the signin_failures table names them.
PAIR, ADDRESS, EMAIL = "pair", "address", "email"
# The first wait past a count's free failures; each further failure doubles it.
FIRST_WAIT_SECONDS = 1
# Doubling stops here long before it matters (2**20 s is twelve days, far past
# any maximum wait), so that a count held for months stays a small number.
MAX_DOUBLINGS = 20


@dataclass(frozen=True)
class SignInLimits:
    window: timedelta
    per_pair: int
    per_address: int
    max_wait: int
    per_account: int
    account_wait: int

    @classmethod
    def from_config(cls, console: ConsoleConfig) -> SignInLimits:
        return cls(timedelta(minutes=console.signin_window_minutes),
                   console.max_failed_signins_per_account_and_address,
                   console.max_failed_signins_per_address,
                   console.signin_max_wait_seconds,
                   console.max_failed_signins_per_account,
                   console.signin_account_wait_seconds)

    def wait(self, kind: str, failures: int) -> int:
        """Seconds the next attempt waits after the latest of a count's `failures`."""
        if kind == EMAIL:
            return self.account_wait if failures > self.per_account else 0
        beyond = failures - (self.per_pair if kind == PAIR else self.per_address)
        if beyond <= 0:
            return 0
        return min(FIRST_WAIT_SECONDS * 2 ** min(beyond - 1, MAX_DOUBLINGS), self.max_wait)

    @property
    def kept_for(self) -> timedelta:
        """How long after its latest failure a count can still matter."""
        return timedelta(seconds=max(self.max_wait, self.account_wait)) + self.window


@dataclass(frozen=True)
class Count:
    kind: str
    email: str
    ip_address: str
    failures: int
    last_failed_at: datetime

    def wait_ends(self, limits: SignInLimits) -> datetime:
        return self.last_failed_at + timedelta(seconds=limits.wait(self.kind, self.failures))

    def forgotten(self, now: datetime, limits: SignInLimits) -> bool:
        return now > self.wait_ends(limits) + limits.window


Key = tuple[str, str, str]  # kind, email, ip_address

_COUNT_COLUMNS = "kind, email, ip_address, failures, last_failed_at"


def _count(row: Any) -> Count:
    return Count(row[0], row[1], row[2], row[3], parse_utc(row[4]))


def _keys(email: str, address: str) -> list[Key]:
    keys = [(PAIR, email, address), (EMAIL, email, "")]
    if address:
        # Requests without a client address (a Unix socket) have no address count.
        keys.append((ADDRESS, "", address))
    return keys


def _live_counts(db: Database, keys: list[Key], now: datetime,
                 limits: SignInLimits) -> dict[str, Count]:
    where = " OR ".join(["(kind = ? AND email = ? AND ip_address = ?)"] * len(keys))
    rows = db.execute(f"SELECT {_COUNT_COLUMNS} FROM signin_failures WHERE {where}",
                      [part for key in keys for part in key]).fetchall()
    counts = (_count(row) for row in rows)
    return {c.kind: c for c in counts if not c.forgotten(now, limits)}


def _take_off(db: Database, failures: int, key: Key) -> None:
    # CASE rather than SQLite's MAX(a, b), which PostgreSQL spells GREATEST.
    db.execute("UPDATE signin_failures"
               " SET failures = CASE WHEN failures > ? THEN failures - ? ELSE 0 END"
               " WHERE kind = ? AND email = ? AND ip_address = ?", [failures, failures, *key])


@functools.cache
def _decoy_hash() -> str:
    from appliance.accounts.accounts import hash_password

    return hash_password("decoy password, never matches")


def sign_in(db: Database, email: str, password: str, actor: audit.Actor,
            limits: SignInLimits, now: datetime) -> Account:
    email = email.strip().lower()
    row = db.execute("SELECT id, password_hash, disabled_at FROM accounts WHERE email = ?",
                     [email]).fetchone()
    account_id = row[0] if row else None
    address = actor.ip_address or ""
    wait = _claim_attempt(db, email, address, account_id, now, limits)
    if wait:
        audit.record(db, THROTTLED, actor, account_id=account_id, details={"email": email})
        raise TooManyRequests(f"Too many failed sign-ins; try again in {_in_words(wait)}",
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
    with immediate(db):
        _clear_pair(db, email, address, now, limits)
        audit.record(db, SUCCEEDED, actor, account_id=row[0])
    return get_account(db, row[0])


def _claim_attempt(db: Database, email: str, address: str, account_id: int | None,
                   now: datetime, limits: SignInLimits) -> int:
    """0 once the attempt is counted as a failure (until it succeeds); else the whole
    seconds it must wait, with nothing counted."""
    keys = _keys(email, address)
    with immediate(db):
        counts = _live_counts(db, keys, now, limits)
        waiting = [c.wait_ends(limits) for c in counts.values() if c.wait_ends(limits) > now
                   and not (c.kind == EMAIL and _signed_in_from(db, account_id, address))]
        if waiting:
            return math.ceil((max(waiting) - now).total_seconds())
        for key in keys:
            failures = counts[key[0]].failures if key[0] in counts else 0
            db.execute(
                f"INSERT INTO signin_failures ({_COUNT_COLUMNS}) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (kind, email, ip_address) DO UPDATE"
                " SET failures = excluded.failures, last_failed_at = excluded.last_failed_at",
                [*key, failures + 1, utc_iso(now)])
        forget_stale(db, now, limits)
    return 0


def forget_stale(db: Database, now: datetime, limits: SignInLimits) -> int:
    """Deletes the counts that can no longer matter; how many. Sign-in attempts do it, and
    housekeeping, so that counts from attempts that stopped do not stay for good."""
    return db.execute("DELETE FROM signin_failures WHERE last_failed_at < ?",
                      [utc_iso(now - limits.kept_for)]).rowcount


def _signed_in_from(db: Database, account_id: int | None, address: str) -> bool:
    """Whether the account has signed in from this address (as far back as the audit log
    goes): its owner's own, which strangers guessing elsewhere must not slow."""
    if account_id is None or not address:
        return False
    return db.execute("SELECT 1 FROM audit_log WHERE account_id = ? AND action = ?"
                      " AND ip_address = ? LIMIT 1",
                      [account_id, SUCCEEDED, address]).fetchone() is not None


def _clear_pair(db: Database, email: str, address: str, now: datetime,
                limits: SignInLimits) -> None:
    """After a success: the pair's failures (this attempt's included) count nowhere."""
    pair = _live_counts(db, [(PAIR, email, address)], now, limits).get(PAIR)
    db.execute("DELETE FROM signin_failures WHERE kind = ? AND email = ? AND ip_address = ?",
               [PAIR, email, address])
    if pair:
        _take_off(db, pair.failures, (EMAIL, email, ""))
        _take_off(db, pair.failures, (ADDRESS, "", address))


def unlock(db: Database, account: Account, actor: audit.Actor, now: datetime,
           limits: SignInLimits) -> int:
    """Forgets the account's failed sign-ins, from every address, as a success from each
    would; audited. Returns how many still counted."""
    with immediate(db):
        rows = db.execute(f"SELECT {_COUNT_COLUMNS} FROM signin_failures WHERE email = ?"
                          " AND kind IN (?, ?)", [account.email, PAIR, EMAIL]).fetchall()
        counts = [c for c in map(_count, rows) if not c.forgotten(now, limits)]
        pairs = [c for c in counts if c.kind == PAIR]
        for pair in pairs:
            _take_off(db, pair.failures, (ADDRESS, "", pair.ip_address))
        db.execute("DELETE FROM signin_failures WHERE email = ? AND kind IN (?, ?)",
                   [account.email, PAIR, EMAIL])
        forgotten = max([sum(p.failures for p in pairs)]
                        + [c.failures for c in counts if c.kind == EMAIL])
        audit.record(db, UNLOCKED, actor, account_id=account.id,
                     details={"email": account.email, "failures": forgotten})
    return forgotten


def throttled_emails(db: Database, now: datetime, limits: SignInLimits) -> set[str]:
    """The accounts (by email) whose sign-ins are being slowed: from some address, or from
    every address, they have failed past the free failures."""
    rows = db.execute("SELECT f.kind, f.email, f.ip_address, f.failures, f.last_failed_at"
                      " FROM signin_failures f JOIN accounts a ON a.email = f.email"
                      " WHERE f.kind IN (?, ?)", [PAIR, EMAIL]).fetchall()
    return {c.email for c in map(_count, rows)
            if not c.forgotten(now, limits) and limits.wait(c.kind, c.failures)}


def _in_words(seconds: int) -> str:
    if seconds < 60:
        return f"{seconds} second{'s' * (seconds != 1)}"
    minutes = math.ceil(seconds / 60)
    return f"{minutes} minute{'s' * (minutes != 1)}"
