"""The audit log: who did what to keys, accounts and credits, from where."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from appliance.core.clock import day_range, utc_now
from appliance.core.database import Database, like_escaped


@dataclass(frozen=True)
class Actor:
    """Where a change came from: the client address and agent, or the CLI."""

    ip_address: str | None = None
    user_agent: str | None = None
    # The signed-in person acting on someone else's account (an admin in the
    # console); recorded in the row's details.
    by: str | None = None

    @classmethod
    def cli(cls) -> Actor:
        return cls(ip_address=None, user_agent="appliance-cli")


def record(
    db: Database,
    action: str,
    actor: Actor,
    *,
    account_id: int | None = None,
    api_key_id: int | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    if actor.by:
        details = {**(details or {}), "by": actor.by}
    db.execute(
        "INSERT INTO audit_log (created_at, account_id, action, api_key_id, ip_address,"
        " user_agent, details) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            utc_now(),
            account_id,
            action,
            api_key_id,
            actor.ip_address,
            actor.user_agent,
            json.dumps(details, sort_keys=True) if details else None,
        ],
    )


# Reading the log, for the admin pages and compliance exports.

EXPORT_FIELDS = ("id", "created_at", "account", "action", "api_key", "ip_address", "user_agent",
                 "details")


@dataclass(frozen=True)
class AuditFilter:
    account: str = ""  # part of the account's email
    action: str = ""
    since: str = ""  # YYYY-MM-DD, inclusive, UTC
    until: str = ""  # YYYY-MM-DD, inclusive, UTC


@dataclass(frozen=True)
class AuditEntry:
    id: int
    created_at: str
    account: str | None
    action: str
    api_key: str | None  # the key's prefix
    ip_address: str | None
    user_agent: str | None
    details: str | None  # JSON text

    def as_row(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in EXPORT_FIELDS}


def query(db: Database, where: AuditFilter, limit: int | None = None) -> list[AuditEntry]:
    """Newest first. Dates are whole UTC days; an account matches by part of its email."""
    clauses: list[str] = []
    params: list[str | int] = []
    if where.account.strip():
        clauses.append("lower(a.email) LIKE ? ESCAPE '!'")
        params.append(f"%{like_escaped(where.account.strip().lower())}%")
    if where.action.strip():
        clauses.append("l.action = ?")
        params.append(where.action.strip())
    since, until = day_range(where.since, where.until)
    # created_at is ISO 8601 text, so comparing it as text is comparing times.
    if since:
        clauses.append("l.created_at >= ?")
        params.append(since.isoformat())
    # Before the day after `until`; the last day a date can name has no day after it,
    # and every row is before it anyway.
    if until and until < date.max:
        clauses.append("l.created_at < ?")
        params.append((until + timedelta(days=1)).isoformat())
    sql = ("SELECT l.id, l.created_at, a.email, l.action, k.prefix, l.ip_address, l.user_agent,"
           " l.details FROM audit_log l LEFT JOIN accounts a ON a.id = l.account_id"
           " LEFT JOIN api_keys k ON k.id = l.api_key_id")
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    sql += " ORDER BY l.id DESC"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return [AuditEntry(*row) for row in db.execute(sql, params).fetchall()]


def actions(db: Database) -> list[str]:
    return [row[0] for row in db.execute("SELECT DISTINCT action FROM audit_log ORDER BY action")]


def to_csv(entries: list[AuditEntry]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=EXPORT_FIELDS)
    writer.writeheader()
    for entry in entries:
        writer.writerow({k: _inert(v) for k, v in entry.as_row().items()})
    return out.getvalue()


def _inert(value: Any) -> Any:
    # A spreadsheet runs a cell that starts like a formula; user agents and
    # emails come from outside, so such cells are kept as text.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def to_json(entries: list[AuditEntry]) -> str:
    # details go out as JSON objects, not as strings holding JSON.
    rows = [{**e.as_row(), "details": json.loads(e.details) if e.details else None}
            for e in entries]
    return json.dumps(rows, indent=1)
