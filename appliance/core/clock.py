"""Time as the appliance stores and shows it: ISO 8601 UTC text with milliseconds."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

# Where code takes "now" from a caller (retention boundaries tested at exact ages).
Clock = Callable[[], datetime]


def utc_clock() -> datetime:
    return datetime.now(UTC)


def utc_iso(moment: datetime) -> str:
    """ISO 8601 UTC with milliseconds (2025-01-31T13:45:07.123Z); sorts as text in time order."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now() -> str:
    return utc_iso(utc_clock())


def parse_utc(text: str) -> datetime:
    """utc_now()'s text (or any ISO 8601 time) -> an aware datetime."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
