"""The audit log: who did what to keys, accounts and credits, from where."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlite_utils import Database

from .db import utc_now


@dataclass(frozen=True)
class Actor:
    """Where a change came from: the client address and agent, or the CLI."""

    ip_address: str | None = None
    user_agent: str | None = None

    @classmethod
    def cli(cls) -> "Actor":
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
