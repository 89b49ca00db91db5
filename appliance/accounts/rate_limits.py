"""The API keys' request budgets shared by every node of a cluster (PostgreSQL only).

A token bucket per key in the `rate_buckets` table, which only the PostgreSQL
schema has: one process alone (SQLite) keeps its buckets in memory instead
(web/api/limits.py), with no round trip per request.

After a refusal a row holds a negative count: the bucket's fraction of a token,
less one, dated one token's refill time back. Refill is linear, so that is the
same bucket as the fraction dated now; the sign is what tells the statement's
caller whether it took a token, and the count below zero is its wait.
"""

from __future__ import annotations

import math

from appliance.core.database import Database
from appliance.core.errors import TooManyRequests

# One statement, so one round trip and no transaction to hold: the upsert locks the key's
# row, so two nodes taking the same key's token run one after the other, and the clock
# read inside the SET is read after that lock (a time read before it could be older
# than the row's). The database's clock, not the nodes': theirs may disagree.
_TAKE_TOKEN = """
INSERT INTO rate_buckets AS bucket (key_id, tokens, updated_at)
VALUES (?, ? - 1, extract(epoch FROM clock_timestamp())::float8)
ON CONFLICT (key_id) DO UPDATE SET (tokens, updated_at) = (
    SELECT refilled - 1, CASE WHEN refilled >= 1 THEN now ELSE now - ? END
    FROM (SELECT now,
                 -- A clock set back refills nothing rather than taking tokens away.
                 least(?, bucket.tokens + greatest(0, now - bucket.updated_at) * ?)
                     AS refilled
          FROM (SELECT extract(epoch FROM clock_timestamp())::float8 AS now) AS clock
         ) AS refill)
RETURNING tokens
"""


def take_token(db: Database, key_id: int, capacity: int, per_second: float) -> float:
    """Takes one of the key's tokens: 0.0 when there was one, else the seconds until there is.

    The bucket holds at most `capacity` tokens (at least 1) and gains `per_second` (more
    than 0) a second; a key seen for the first time starts full. PostgreSQL only, in
    autocommit or in the caller's transaction (which then holds the key's row until it ends).
    """
    row = db.execute(_TAKE_TOKEN, [key_id, float(capacity), 1.0 / per_second,
                                   float(capacity), per_second]).fetchone()
    tokens = float(row[0])
    return 0.0 if tokens >= 0 else -tokens / per_second


def too_many_requests(per_minute: int, wait_seconds: float) -> TooManyRequests:
    """The refusal of a request over its key's rate, whichever limiter counted it."""
    wait = max(1, math.ceil(wait_seconds))
    return TooManyRequests(f"Too many requests with this API key: at most {per_minute} a minute."
                           f" Retry after {wait} seconds", retry_after=wait)
