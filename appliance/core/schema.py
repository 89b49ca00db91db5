"""The schema, as versioned migrations applied in order (sqlite-utils' Migrations)."""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

migrations = Migrations("appliance")


@migrations()
def m001_initial(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE accounts (
            id INTEGER PRIMARY KEY,
            email TEXT NOT NULL UNIQUE COLLATE NOCASE,
            password_hash TEXT,
            is_admin INTEGER NOT NULL DEFAULT 0,
            credits INTEGER NOT NULL DEFAULT 0 CHECK (credits >= 0),
            created_at TEXT NOT NULL,
            disabled_at TEXT
        );
        CREATE TABLE api_keys (
            id INTEGER PRIMARY KEY,
            account_id INTEGER NOT NULL REFERENCES accounts(id),
            name TEXT NOT NULL,
            key_hash TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL,
            created_at TEXT NOT NULL,
            last_used_at TEXT,
            deleted_at TEXT
        );
        CREATE INDEX api_keys_account ON api_keys(account_id);
        CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            account_id INTEGER NOT NULL REFERENCES accounts(id),
            api_key_id INTEGER REFERENCES api_keys(id),
            status TEXT NOT NULL,
            total_images INTEGER NOT NULL,
            credits_used INTEGER NOT NULL,
            credits_refunded INTEGER NOT NULL DEFAULT 0,
            settings TEXT NOT NULL,
            created_at TEXT NOT NULL,
            started_at TEXT,
            finished_at TEXT
        );
        CREATE INDEX jobs_account ON jobs(account_id, created_at);
        CREATE TABLE job_images (
            id INTEGER PRIMARY KEY,
            job_id TEXT NOT NULL REFERENCES jobs(id),
            idx INTEGER NOT NULL,
            prompt TEXT NOT NULL,
            seed INTEGER NOT NULL,
            status TEXT NOT NULL,
            file TEXT,
            error TEXT,
            started_at TEXT,
            finished_at TEXT,
            UNIQUE (job_id, idx)
        );
        CREATE INDEX job_images_status ON job_images(status);
        CREATE TABLE credit_ledger (
            id INTEGER PRIMARY KEY,
            account_id INTEGER NOT NULL REFERENCES accounts(id),
            delta INTEGER NOT NULL,
            balance_after INTEGER NOT NULL CHECK (balance_after >= 0),
            reason TEXT NOT NULL,
            job_id TEXT REFERENCES jobs(id),
            created_at TEXT NOT NULL
        );
        CREATE INDEX credit_ledger_account ON credit_ledger(account_id, id);
        CREATE TABLE audit_log (
            id INTEGER PRIMARY KEY,
            created_at TEXT NOT NULL,
            account_id INTEGER REFERENCES accounts(id),
            action TEXT NOT NULL,
            api_key_id INTEGER REFERENCES api_keys(id),
            ip_address TEXT,
            user_agent TEXT,
            details TEXT
        );
        CREATE INDEX audit_log_created ON audit_log(created_at);
        CREATE INDEX audit_log_account ON audit_log(account_id, created_at);
        """
    )


@migrations()
def m002_console_sessions(db: Database) -> None:
    # Server-side console sessions. Only a digest of the session id is stored,
    # so the database cannot be used to take over a signed-in browser.
    db.executescript(
        """
        CREATE TABLE console_sessions (
            key_hash TEXT PRIMARY KEY,
            value BLOB NOT NULL,
            expires_at TEXT
        );
        CREATE INDEX console_sessions_expires ON console_sessions(expires_at);
        """
    )


@migrations()
def m003_job_base_seed(db: Database) -> None:
    # The base seed a client asked for, echoed in the job's status; NULL when
    # each image drew its own random seed.
    db.execute("ALTER TABLE jobs ADD COLUMN seed INTEGER")


@migrations()
def m004_idempotency_keys(db: Database) -> None:
    # The first answer to each POST that carried an Idempotency-Key, so that a
    # retry gets it again instead of a second charge. Only a digest of the
    # client's key is kept; rows older than a day are ignored, then deleted.
    db.executescript(
        """
        CREATE TABLE idempotency_keys (
            account_id INTEGER NOT NULL REFERENCES accounts(id),
            key_hash TEXT NOT NULL,
            request_hash TEXT NOT NULL,
            job_id TEXT NOT NULL,
            response TEXT NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (account_id, key_hash)
        );
        CREATE INDEX idempotency_keys_created ON idempotency_keys(created_at);
        """
    )


@migrations()
def m005_signin_failures(db: Database) -> None:
    # The sign-in throttle's counts of failed sign-ins: of one email from one
    # client address ('pair'), of one address whatever the emails ('address',
    # email ''), and of one email from every address ('email', ip_address '').
    # Keyed by the email as typed, so that an unknown email is throttled like an
    # account's. Each failure is also an audit row; these counts are what the
    # throttle reads and claims in one write transaction, before the password
    # is checked, so that simultaneous attempts cannot all slip past it.
    # The index on the audit log finds an account's sign-ins from one address.
    db.executescript(
        """
        CREATE TABLE signin_failures (
            kind TEXT NOT NULL CHECK (kind IN ('pair', 'address', 'email')),
            email TEXT NOT NULL,
            ip_address TEXT NOT NULL,
            failures INTEGER NOT NULL CHECK (failures >= 0),
            last_failed_at TEXT NOT NULL,
            PRIMARY KEY (kind, email, ip_address)
        );
        CREATE INDEX signin_failures_last ON signin_failures(last_failed_at);
        CREATE INDEX audit_log_signins ON audit_log(account_id, action, ip_address);
        """
    )


@migrations()
def m006_job_price(db: Database) -> None:
    # What each of the job's images cost when it was asked for: models may be
    # priced differently, and a refund gives back what was paid, even after
    # the model's price in config.toml changed.
    db.execute("ALTER TABLE jobs ADD COLUMN credits_per_image INTEGER NOT NULL DEFAULT 1"
               " CHECK (credits_per_image >= 1)")


@migrations()
def m007_image_claims(db: Database) -> None:
    # Cluster mode (PostgreSQL) claims queued images for a node under a lease and
    # records which node made each image; the columns are here too so that the store's
    # SQL is the same on both databases. One SQLite appliance claims nothing.
    db.executescript(
        """
        ALTER TABLE job_images ADD COLUMN claimed_by TEXT;
        ALTER TABLE job_images ADD COLUMN lease_until REAL;
        ALTER TABLE job_images ADD COLUMN made_by TEXT;
        """
    )
