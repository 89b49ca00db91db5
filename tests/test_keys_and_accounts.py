from __future__ import annotations

import hashlib
import re

import pytest
from argon2 import PasswordHasher

from appliance.accounts import accounts, audit, keys
from appliance.core.database import immediate
from appliance.core.errors import BadRequest, Conflict, InsufficientCredits, NotFound, Unauthorized

from .helpers import database_text, row_by_id

# The store's accounting on both databases: SQLite's file and cluster mode's PostgreSQL.
pytestmark = pytest.mark.both_databases

ACTOR = audit.Actor(ip_address="192.0.2.7", user_agent="pytest")


@pytest.fixture
def account(database):
    return accounts.create_account(database.db(), "Ada@Example.com ", "long enough pw", ACTOR,
                                   credits=5)


def test_generated_keys_have_the_documented_format():
    generated = {keys.generate_key() for _ in range(200)}
    assert len(generated) == 200
    assert all(re.fullmatch(r"wi_live_[0-9a-f]{64}", key) for key in generated)


def test_only_the_sha256_of_the_key_is_stored(database, account):
    info, raw = keys.create_key(database.db(), account.id, "Production", ACTOR)
    assert info.prefix == raw[:12] and info.name == "Production"
    row = database.db().execute("SELECT * FROM api_keys").fetchone()
    assert hashlib.sha256(raw.encode()).hexdigest() in row
    dump = database_text(database.db())
    assert raw not in dump and raw[12:] not in dump


def test_key_creation_and_deletion_are_audited_with_the_address(database, account):
    info, _ = keys.create_key(database.db(), account.id, "Dev", ACTOR)
    keys.delete_key(database.db(), account.id, info.prefix, ACTOR)
    rows = list(database.db().query(
        "SELECT action, ip_address, user_agent, api_key_id FROM audit_log"
        " WHERE action LIKE 'key.%' ORDER BY id"))
    assert [(r["action"], r["ip_address"], r["api_key_id"]) for r in rows] == [
        ("key.create", "192.0.2.7", info.id), ("key.delete", "192.0.2.7", info.id)]


def test_deleted_key_is_refused_kept_for_audit_and_never_listed(database, account):
    info, raw = keys.create_key(database.db(), account.id, "Old", ACTOR)
    assert keys.find_owner(database.db(), raw).key_id == info.id
    keys.delete_key(database.db(), account.id, info.prefix, ACTOR)
    with pytest.raises(Unauthorized, match=r"^Invalid API key$"):
        keys.find_owner(database.db(), raw)
    assert keys.list_keys(database.db(), account.id) == []
    assert row_by_id(database.db(), "api_keys", info.id)["deleted_at"] is not None
    with pytest.raises(NotFound):
        keys.delete_key(database.db(), account.id, info.prefix, ACTOR)


def test_key_of_a_disabled_account_is_refused(database, account):
    _, raw = keys.create_key(database.db(), account.id, "Prod", ACTOR)
    database.db().execute("UPDATE accounts SET disabled_at = 'x' WHERE id = ?", [account.id])
    with pytest.raises(Unauthorized):
        keys.find_owner(database.db(), raw)


def test_colliding_prefixes_need_the_name(database, account):
    db = database.db()
    first, _ = keys.create_key(db, account.id, "A", ACTOR)
    second, _ = keys.create_key(db, account.id, "B", ACTOR)
    db.execute("UPDATE api_keys SET prefix = ?", [first.prefix])
    with pytest.raises(Conflict, match="say which by its name"):
        keys.delete_key(db, account.id, first.prefix, ACTOR)
    assert keys.delete_key(db, account.id, first.prefix, ACTOR, name="B").id == second.id


@pytest.mark.parametrize("name", ["", "   ", "x" * 101])
def test_key_names_are_checked(database, account, name):
    with pytest.raises(BadRequest):
        keys.create_key(database.db(), account.id, name, ACTOR)


@pytest.mark.parametrize(
    ("header", "error"),
    [(None, keys.MISSING_HEADER), ("Token abc", keys.MISSING_HEADER),
     ("Bearer ", keys.MISSING_HEADER), ("Bearer  wi_live_" + "0" * 64, keys.BAD_FORMAT),
     ("Bearer wi_live_" + "0" * 64 + " ", keys.BAD_FORMAT)],
)
def test_header_parsing(header, error):
    with pytest.raises(Unauthorized) as caught:
        keys.token_from_header(header)
    assert caught.value.message == error


def test_last_used_is_written_at_most_once_per_interval(database, account):
    info, _ = keys.create_key(database.db(), account.id, "Prod", ACTOR)
    recorder = keys.LastUsedRecorder(interval_seconds=3600)
    recorder.record(database.db(), info.id)
    first = keys.list_keys(database.db(), account.id)[0].last_used_at
    database.db().execute("UPDATE api_keys SET last_used_at = 'sentinel'")
    recorder.record(database.db(), info.id)
    assert first is not None
    assert keys.list_keys(database.db(), account.id)[0].last_used_at == "sentinel"


def test_accounts_normalise_email_and_refuse_duplicates(database, account):
    assert account.email == "ada@example.com" and account.credits == 5
    with pytest.raises(Conflict):
        accounts.create_account(database.db(), "ADA@example.com", "long enough pw", ACTOR)
    with pytest.raises(BadRequest, match="at least 8"):
        accounts.create_account(database.db(), "b@example.com", "short", ACTOR)


@pytest.mark.production_password_hashing
def test_passwords_are_stored_as_argon2id(database, account):
    stored = row_by_id(database.db(), "accounts", account.id)["password_hash"]
    assert stored.startswith("$argon2id$") and "long enough pw" not in stored
    assert not PasswordHasher().check_needs_rehash(stored), "the library's current cost"
    assert accounts.verify_password(stored, "long enough pw")
    assert not accounts.verify_password(stored, "wrong password")


def test_grants_and_removals_keep_balance_equal_to_the_ledger(database, account):
    db = database.db()
    assert accounts.grant_credits(db, account.email, 10, ACTOR) == 15
    assert accounts.grant_credits(db, account.email, -15, ACTOR, reason="refund to customer") == 0
    with pytest.raises(BadRequest, match="has only 0"):
        accounts.grant_credits(db, account.email, -1, ACTOR)
    balance = accounts.get_account(db, account.id).credits
    assert balance == accounts.ledger_total(db, account.id) == 0


def test_charging_below_zero_is_impossible(database, account):
    db = database.db()
    with pytest.raises(InsufficientCredits), immediate(db):
        accounts.change_credits(db, account.id, -6, "too much")
    assert accounts.get_account(db, account.id).credits == 5
