"""Idempotency-Key: a retried POST gets its first answer again instead of a second charge.

A key belongs to the account (any of its API keys may retry with it) and is
remembered for 24 hours. The record is written in the transaction that
charges, so of two concurrent requests with one key the second waits for the
first's write lock and then finds its record: never two charges.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import timedelta

from appliance.core.clock import utc_clock, utc_iso
from appliance.core.database import Database
from appliance.core.digests import sha256_hex
from appliance.core.errors import ApplianceError, BadRequest

HEADER = "Idempotency-Key"
KEPT_FOR = timedelta(hours=24)
MAX_KEY_LENGTH = 255
# Visible ASCII only: what every HTTP client can send and a person can read.
_KEY = re.compile(rf"[\x21-\x7e]{{1,{MAX_KEY_LENGTH}}}")


class KeyReused(ApplianceError):
    """The key came before with a different request: replaying would answer the wrong one."""

    status = 422

    def __init__(self) -> None:
        super().__init__(
            f"This {HEADER} was already used with a different request in the last 24 hours;"
            " send a new key for a new request"
        )


@dataclass(frozen=True)
class IdempotentRequest:
    key_hash: str
    request_hash: str


@dataclass(frozen=True)
class Answer:
    job_id: str
    total_images: int
    credits_used: int
    credits: int


def from_header(value: str | None, request_identity: bytes) -> IdempotentRequest | None:
    """The request's key and fingerprint; None when it carries no key.

    `request_identity` is what makes two requests the same one (the route and
    the decoded body), so a retry that only re-orders JSON fields still matches.
    """
    if value is None:
        return None
    if not _KEY.fullmatch(value):
        raise BadRequest(f"the {HEADER} header must be 1 to {MAX_KEY_LENGTH} visible ASCII"
                         " characters, such as a UUID")
    return IdempotentRequest(sha256_hex(value.encode("ascii")), sha256_hex(request_identity))


def _cutoff() -> str:
    return utc_iso(utc_clock() - KEPT_FOR)


def earlier_answer(db: Database, account_id: int, request: IdempotentRequest) -> Answer | None:
    row = db.execute(
        "SELECT request_hash, response FROM idempotency_keys"
        " WHERE account_id = ? AND key_hash = ? AND created_at >= ?",
        [account_id, request.key_hash, _cutoff()],
    ).fetchone()
    if row is None:
        return None
    if row[0] != request.request_hash:
        raise KeyReused()
    return Answer(**json.loads(row[1]))


def remember(db: Database, account_id: int, request: IdempotentRequest, answer: Answer,
             now: str) -> None:
    """Records the answer; must run in the transaction that charged for it."""
    # Expired rows go first: one may hold this very key, and the table stays small.
    db.execute("DELETE FROM idempotency_keys WHERE created_at < ?", [_cutoff()])
    db.execute(
        "INSERT INTO idempotency_keys (account_id, key_hash, request_hash, job_id, response,"
        " created_at) VALUES (?, ?, ?, ?, ?, ?)",
        [account_id, request.key_hash, request.request_hash, answer.job_id,
         json.dumps(answer.__dict__, sort_keys=True), now],
    )
