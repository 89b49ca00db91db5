"""The account services every front end calls: accounts and credits, API keys, sign-in, audit.

Each method takes plain values, runs on the calling thread's own connection
and knows nothing of HTTP or the terminal. The SQL lives in the modules beside
this one, which take a connection and join the caller's transaction.
"""

from __future__ import annotations

from appliance.accounts import accounts, audit, keys, rate_limits, signin
from appliance.accounts.accounts import Account, LedgerEntry
from appliance.accounts.audit import Actor, AuditEntry, AuditFilter
from appliance.accounts.key_uses import KeyUseWriter
from appliance.accounts.keys import KeyInfo, KeyOwner, LastUsedRecorder
from appliance.accounts.signin import SignInLimits
from appliance.core.clock import Clock, utc_clock
from appliance.core.database import ConnectionPool


class AccountService:
    """Accounts and their credit balances; every balance change writes its ledger row."""

    def __init__(self, database: ConnectionPool):
        self.database = database

    def create(self, email: str, password: str, actor: Actor, *, is_admin: bool = False,
               credits: int = 0) -> Account:
        return accounts.create_account(self.database.db(), email, password, actor,
                                       is_admin=is_admin, credits=credits)

    def get(self, account_id: int) -> Account:
        return accounts.get_account(self.database.db(), account_id)

    def find(self, email: str) -> Account:
        return accounts.find_account(self.database.db(), email)

    def all(self) -> list[Account]:
        return accounts.list_accounts(self.database.db())

    def set_disabled(self, account_id: int, disabled: bool, actor: Actor) -> Account:
        return accounts.set_disabled(self.database.db(), account_id, disabled, actor)

    def make_admin(self, account_id: int, actor: Actor) -> Account:
        return accounts.make_admin(self.database.db(), account_id, actor)

    def grant_credits(self, email: str, amount: int, actor: Actor, reason: str = "grant") -> int:
        """Adds credits (a negative amount removes them); returns the new balance, which a
        grant may bring to at most accounts.MAX_CREDITS (BadRequest past it)."""
        return accounts.grant_credits(self.database.db(), email, amount, actor, reason=reason)

    def ledger(self, account_id: int, limit: int = 20) -> list[LedgerEntry]:
        return accounts.ledger(self.database.db(), account_id, limit)


class KeyService:
    """API keys: made once and shown once, verified by digest on every request."""

    def __init__(self, database: ConnectionPool, last_used: LastUsedRecorder | None = None):
        self.database = database
        self.last_used = last_used or LastUsedRecorder()
        self.uses = KeyUseWriter(database)

    def __deepcopy__(self, memo: dict) -> KeyService:
        # Shared by the copies Litestar makes of the middleware that holds it:
        # one record of when each key was last written.
        return self

    def create(self, account_id: int, name: str, actor: Actor) -> tuple[KeyInfo, str]:
        """The key's listing and the raw key, which is never seen again."""
        return keys.create_key(self.database.db(), account_id, name, actor)

    def live(self, account_id: int) -> list[KeyInfo]:
        return keys.list_keys(self.database.db(), account_id)

    def delete(self, account_id: int, prefix: str, actor: Actor,
               name: str | None = None) -> KeyInfo:
        return keys.delete_key(self.database.db(), account_id, prefix, actor, name=name)

    def delete_by_id(self, account_id: int, key_id: int, actor: Actor) -> KeyInfo:
        return keys.delete_key_by_id(self.database.db(), account_id, key_id, actor)

    def owner(self, token: str) -> KeyOwner:
        """The owner of a live key; Unauthorized for an unknown or deleted one.

        One indexed read: in WAL mode it never waits for a writer, so the API
        asks it on the event loop, with no thread hop per request.
        """
        return keys.find_owner(self.database.db(), token)

    def use_is_due(self, key_id: int) -> bool:
        """Whether the key's last use is due to be written (at most once a minute)."""
        return self.last_used.due(key_id)

    def record_use(self, key_id: int) -> None:
        """Notes the key's use now and returns at once: the write happens on a thread of
        its own (KeyUseWriter), so that no request waits for another writer's lock. A busy
        or full database delays it; it never turns away a request that may only read."""
        self.uses.note(key_id)


class SharedKeyRateLimiter:
    """The API keys' request rate counted in the database, so that it holds across every
    node of a cluster: the same buckets and refusal as web/api/limits.py's KeyRateLimiter,
    at the cost of a round trip per request. PostgreSQL only (cluster mode)."""

    # Each check waits for the database: the API runs it off the event loop.
    asks_database = True

    def __init__(self, database: ConnectionPool, per_minute: int):
        self.database = database
        self.capacity = per_minute
        self.per_second = per_minute / 60.0

    def __deepcopy__(self, memo: dict) -> SharedKeyRateLimiter:
        # Litestar copies the routes' middleware; the copies share this one.
        return self

    def check(self, key_id: int) -> None:
        """TooManyRequests when the key has no request left this minute."""
        if not self.capacity:
            return
        wait = rate_limits.take_token(self.database.db(), key_id, self.capacity,
                                      self.per_second)
        if wait:
            raise rate_limits.too_many_requests(self.capacity, wait)


class AuditService:
    """The audit log as admins read and export it."""

    def __init__(self, database: ConnectionPool):
        self.database = database

    def query(self, where: AuditFilter, limit: int | None = None) -> list[AuditEntry]:
        return audit.query(self.database.db(), where, limit)

    def actions(self) -> list[str]:
        return audit.actions(self.database.db())


class SignInService:
    """Console sign-in with its throttling, and sign-out, each audited."""

    def __init__(self, database: ConnectionPool, limits: SignInLimits,
                 clock: Clock = utc_clock):
        self.database = database
        self.limits = limits
        # The throttle's waits are measured on this clock (tests move it by hand).
        self.clock = clock

    def sign_in(self, email: str, password: str, actor: Actor) -> Account:
        return signin.sign_in(self.database.db(), email, password, actor, self.limits,
                              self.clock())

    def unlock(self, account_id: int, actor: Actor) -> int:
        """Forgets the account's failed sign-ins, from every address; returns how many
        still counted. NotFound for an unknown account."""
        db = self.database.db()
        return signin.unlock(db, accounts.get_account(db, account_id), actor, self.clock(),
                             self.limits)

    def throttled_emails(self) -> set[str]:
        """The accounts, by email, whose sign-ins the throttle is slowing now."""
        return signin.throttled_emails(self.database.db(), self.clock(), self.limits)

    def sign_out(self, account_id: int, actor: Actor) -> None:
        audit.record(self.database.db(), signin.SIGNED_OUT, actor, account_id=account_id)
