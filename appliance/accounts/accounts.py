"""Accounts, their passwords and their credits.

Every change of balance goes through `change_credits`, which writes the ledger
row in the same statement sequence, so balance and ledger cannot disagree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from appliance.accounts import audit
from appliance.core.clock import utc_now
from appliance.core.database import Database, IntegrityError, immediate, insert
from appliance.core.errors import BadRequest, Conflict, InsufficientCredits, NotFound

_hasher = PasswordHasher()  # argon2id with the library's current parameters
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")
MIN_PASSWORD_LENGTH = 8
# The most credits a grant (or an account's first credits) may bring a balance to.
# Far below SQLite's 64-bit integers: past those a sum turns into an inexact float.
MAX_CREDITS = 10**12


@dataclass(frozen=True)
class Account:
    id: int
    email: str
    is_admin: bool
    credits: int
    disabled: bool


def normalise_email(email: str) -> str:
    email = email.strip().lower()
    if not _EMAIL.match(email) or len(email) > 254:
        raise BadRequest(f"'{email}' is not an email address")
    return email


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise BadRequest(f"the password must be at least {MIN_PASSWORD_LENGTH} characters long")
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    if not password_hash:
        return False
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def create_account(
    db: Database,
    email: str,
    password: str,
    actor: audit.Actor,
    *,
    is_admin: bool = False,
    credits: int = 0,
) -> Account:
    email = normalise_email(email)
    if not 0 <= credits <= MAX_CREDITS:
        raise BadRequest(f"initial credits must be from 0 to {MAX_CREDITS}, not {credits}")
    password_hash = hash_password(password)
    try:
        with immediate(db):
            account_id = insert(
                db,
                "INSERT INTO accounts (email, password_hash, is_admin, credits, created_at)"
                " VALUES (?, ?, ?, 0, ?)",
                [email, password_hash, int(is_admin), utc_now()],
            )
            audit.record(db, "account.create", actor, account_id=account_id,
                         details={"email": email, "admin": is_admin})
            if credits:
                change_credits(db, account_id, credits, "initial grant")
    except IntegrityError:
        raise Conflict(f"an account for {email} already exists") from None
    return get_account(db, account_id)


def _account_from_row(row: dict) -> Account:
    return Account(
        id=row["id"],
        email=row["email"],
        is_admin=bool(row["is_admin"]),
        credits=row["credits"],
        disabled=row["disabled_at"] is not None,
    )


def get_account(db: Database, account_id: int) -> Account:
    rows = list(db.query("SELECT * FROM accounts WHERE id = ?", [account_id]))
    if not rows:
        raise NotFound(f"no account with id {account_id}")
    return _account_from_row(rows[0])


def find_account(db: Database, email: str) -> Account:
    email = normalise_email(email)
    rows = list(db.query("SELECT * FROM accounts WHERE email = ?", [email]))
    if not rows:
        raise NotFound(f"no account for {email}")
    return _account_from_row(rows[0])


def change_credits(db: Database, account_id: int, delta: int, reason: str,
                   job_id: str | None = None) -> int:
    """Adds `delta` (negative to charge) and writes the ledger row; returns the new balance.

    Must run inside a write transaction. Raises InsufficientCredits rather
    than letting a balance go below zero. A refund may take a balance a little past
    MAX_CREDITS (it gives back what was charged after a grant filled it); only grants
    are held to it.
    """
    if not -MAX_CREDITS <= delta <= MAX_CREDITS:
        raise BadRequest(f"a change of {delta} credits is past the limit of {MAX_CREDITS}")
    row = db.execute(
        "UPDATE accounts SET credits = credits + ? WHERE id = ? AND credits + ? >= 0"
        " RETURNING credits",
        [delta, account_id, delta],
    ).fetchone()
    if row is None:
        raise InsufficientCredits()
    balance = row[0]
    db.execute(
        "INSERT INTO credit_ledger (account_id, delta, balance_after, reason, job_id, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        [account_id, delta, balance, reason, job_id, utc_now()],
    )
    return balance


def grant_credits(db: Database, email: str, amount: int, actor: audit.Actor,
                  reason: str = "grant") -> int:
    """An operator's grant (or, with a negative amount, removal) of credits.

    The balance it leaves is at most MAX_CREDITS.
    """
    if amount == 0:
        raise BadRequest("the amount of credits must not be zero")
    if not -MAX_CREDITS <= amount <= MAX_CREDITS:
        raise BadRequest(f"the amount of credits must be from {-MAX_CREDITS} to {MAX_CREDITS},"
                         f" not {amount}")
    account = find_account(db, email)
    with immediate(db):
        # Read inside the transaction, which holds the write lock: no charge or
        # grant can come between this check and the change.
        balance = get_account(db, account.id).credits
        if amount > 0 and balance + amount > MAX_CREDITS:
            raise BadRequest(
                f"cannot grant {amount} credits: {account.email} has {balance}, and a balance"
                f" may be at most {MAX_CREDITS}")
        try:
            balance = change_credits(db, account.id, amount, reason)
        except InsufficientCredits:
            raise BadRequest(
                f"cannot remove {-amount} credits: {account.email} has only {account.credits}"
            ) from None
        audit.record(db, "credits.grant", actor, account_id=account.id,
                     details={"amount": amount, "reason": reason, "balance": balance})
    return balance


def ledger_total(db: Database, account_id: int) -> int:
    return db.execute(
        "SELECT COALESCE(SUM(delta), 0) FROM credit_ledger WHERE account_id = ?", [account_id]
    ).fetchone()[0]


@dataclass(frozen=True)
class LedgerEntry:
    delta: int
    balance_after: int
    reason: str
    job_id: str | None
    created_at: str


def list_accounts(db: Database) -> list[Account]:
    return [_account_from_row(row) for row in db.query("SELECT * FROM accounts ORDER BY email")]


def ledger(db: Database, account_id: int, limit: int = 20) -> list[LedgerEntry]:
    """The account's latest credit changes, newest first."""
    return [
        LedgerEntry(*row)
        for row in db.execute(
            "SELECT delta, balance_after, reason, job_id, created_at FROM credit_ledger"
            " WHERE account_id = ? ORDER BY id DESC LIMIT ?",
            [account_id, limit],
        )
    ]


def set_disabled(db: Database, account_id: int, disabled: bool, actor: audit.Actor) -> Account:
    """Disables (or enables again) an account: its keys and console sign-ins stop working."""
    account = get_account(db, account_id)
    if account.disabled == disabled:
        return account
    with immediate(db):
        db.execute("UPDATE accounts SET disabled_at = ? WHERE id = ?",
                   [utc_now() if disabled else None, account_id])
        audit.record(db, "account.disable" if disabled else "account.enable", actor,
                     account_id=account_id, details={"email": account.email})
    return get_account(db, account_id)


def make_admin(db: Database, account_id: int, actor: audit.Actor) -> Account:
    account = get_account(db, account_id)
    if account.is_admin:
        return account
    with immediate(db):
        db.execute("UPDATE accounts SET is_admin = 1 WHERE id = ?", [account_id])
        audit.record(db, "account.admin", actor, account_id=account_id,
                     details={"email": account.email})
    return get_account(db, account_id)
