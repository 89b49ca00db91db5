"""Time as the appliance stores and shows it: ISO 8601 UTC text with milliseconds."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone

# Where code takes "now" from a caller (retention boundaries tested at exact ages).
Clock = Callable[[], datetime]


def utc_clock() -> datetime:
    return datetime.now(timezone.utc)


def utc_now() -> str:
    """ISO 8601 UTC with milliseconds; sorts as text in time order."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_iso(moment: datetime) -> str:
    """An aware datetime in utc_now()'s format, e.g. for an expiry time."""
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_utc(text: str) -> datetime:
    """utc_now()'s text (or any ISO 8601 time) -> an aware datetime."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
