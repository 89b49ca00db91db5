"""API keys: made once, stored only as a SHA-256 digest, soft-deleted.

Lookup is by digest through the unique index, so no secret is ever compared
byte by byte in Python, and a stolen database yields no usable key.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from dataclasses import dataclass

from appliance.accounts import audit
from appliance.core.clock import utc_now
from appliance.core.database import Database, immediate, insert
from appliance.core.digests import sha256_hex
from appliance.core.errors import BadRequest, Conflict, NotFound, Unauthorized

KEY_PREFIX = "wi_live_"
KEY_PATTERN = re.compile(r"wi_live_[0-9a-f]{64}")
DISPLAY_PREFIX_LENGTH = 12
MAX_NAME_LENGTH = 100

MISSING_HEADER = "Missing or invalid Authorization header"
BAD_FORMAT = "Invalid API key format"
UNKNOWN_KEY = "Invalid API key"


@dataclass(frozen=True)
class KeyInfo:
    id: int
    name: str
    prefix: str
    created_at: str
    last_used_at: str | None


@dataclass(frozen=True)
class KeyOwner:
    account_id: int
    key_id: int


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_hex(32)


def hash_key(key: str) -> str:
    return sha256_hex(key)


def token_from_header(header: str | None) -> str:
    """The token of `Authorization: Bearer <token>`, checked for shape only."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized(MISSING_HEADER)
    if not KEY_PATTERN.fullmatch(token):
        raise Unauthorized(BAD_FORMAT)
    return token


def create_key(db: Database, account_id: int, name: str, actor: audit.Actor) -> tuple[KeyInfo, str]:
    """Returns the key's listing and the raw key, which is never seen again."""
    name = name.strip()
    if not name:
        raise BadRequest("the key needs a name, such as 'Production'")
    if len(name) > MAX_NAME_LENGTH:
        raise BadRequest(f"the key name is longer than {MAX_NAME_LENGTH} characters")
    raw = generate_key()
    now = utc_now()
    with immediate(db):
        key_id = insert(
            db,
            "INSERT INTO api_keys (account_id, name, key_hash, prefix, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            [account_id, name, hash_key(raw), raw[:DISPLAY_PREFIX_LENGTH], now],
        )
        audit.record(db, "key.create", actor, account_id=account_id, api_key_id=key_id,
                     details={"name": name, "prefix": raw[:DISPLAY_PREFIX_LENGTH]})
    return KeyInfo(key_id, name, raw[:DISPLAY_PREFIX_LENGTH], now, None), raw


def list_keys(db: Database, account_id: int) -> list[KeyInfo]:
    return [
        KeyInfo(r["id"], r["name"], r["prefix"], r["created_at"], r["last_used_at"])
        for r in db.query(
            "SELECT id, name, prefix, created_at, last_used_at FROM api_keys"
            " WHERE account_id = ? AND deleted_at IS NULL ORDER BY created_at, id",
            [account_id],
        )
    ]


def delete_key(db: Database, account_id: int, prefix: str, actor: audit.Actor,
               name: str | None = None) -> KeyInfo:
    """Soft-deletes the live key with this prefix (and name, when prefixes collide)."""
    matches = [k for k in list_keys(db, account_id)
               if k.prefix == prefix and (name is None or k.name == name)]
    if not matches:
        raise NotFound(f"no live key with prefix {prefix}" + (f" named {name!r}" if name else ""))
    if len(matches) > 1:
        raise Conflict(f"{len(matches)} live keys have prefix {prefix}; say which by its name")
    return _soft_delete(db, account_id, matches[0], actor)


def delete_key_by_id(db: Database, account_id: int, key_id: int, actor: audit.Actor) -> KeyInfo:
    """Soft-deletes one of the account's live keys, named by its id (the console's Delete)."""
    matches = [k for k in list_keys(db, account_id) if k.id == key_id]
    if not matches:
        raise NotFound("No such key: it may have been deleted already")
    return _soft_delete(db, account_id, matches[0], actor)


def _soft_delete(db: Database, account_id: int, key: KeyInfo, actor: audit.Actor) -> KeyInfo:
    with immediate(db):
        db.execute("UPDATE api_keys SET deleted_at = ? WHERE id = ? AND deleted_at IS NULL",
                   [utc_now(), key.id])
        audit.record(db, "key.delete", actor, account_id=account_id, api_key_id=key.id,
                     details={"name": key.name, "prefix": key.prefix})
    return key


def find_owner(db: Database, token: str) -> KeyOwner:
    """The live key and enabled account behind a well-formed token."""
    row = db.execute(
        "SELECT k.account_id, k.id FROM api_keys k JOIN accounts a ON a.id = k.account_id"
        " WHERE k.key_hash = ? AND k.deleted_at IS NULL AND a.disabled_at IS NULL",
        [hash_key(token)],
    ).fetchone()
    if row is None:
        raise Unauthorized(UNKNOWN_KEY)
    return KeyOwner(account_id=row[0], key_id=row[1])


class LastUsedRecorder:
    """Writes a key's last-used time at most once per interval.

    A busy client would otherwise turn every read request into a write.
    """

    def __init__(self, interval_seconds: float = 60.0):
        self.interval = interval_seconds
        self._written: dict[int, float] = {}
        self._lock = threading.Lock()

    def due(self, key_id: int) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._written.get(key_id)
            if last is not None and now - last < self.interval:
                return False
            self._written[key_id] = now
            return True

    def record(self, db: Database, key_id: int) -> None:
        if self.due(key_id):
            write_last_used(db, key_id)


def write_last_used(db: Database, key_id: int, when: str | None = None) -> None:
    """Records the key's last use: `when` it was used (default: now)."""
    db.execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?", [when or utc_now(), key_id])
