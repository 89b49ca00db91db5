"""The one digest the appliance stores in place of a secret: SHA-256, as lowercase hex.

API keys, console session ids and Idempotency-Keys are kept only this way, so
a copy of the database yields none of them.
"""

from __future__ import annotations

import hashlib


def sha256_hex(data: str | bytes) -> str:
    """Text is digested as its UTF-8 bytes."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return hashlib.sha256(raw).hexdigest()
