"""Time as the appliance stores and shows it: ISO 8601 UTC text with milliseconds."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, date, datetime

from appliance.core.errors import BadRequest
from appliance.core.numbers import shown

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


# Only YYYY-MM-DD: date.fromisoformat also takes "20250131" and "2025-W05-1".
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def day_range(since: str, until: str) -> tuple[date | None, date | None]:
    """The whole UTC days a 'from' and a 'to' field name, each typed as YYYY-MM-DD (blank:
    no bound); BadRequest naming the field that is wrong, or saying they are out of order."""
    first, last = _day(since, "from"), _day(until, "to")
    if first and last and first > last:
        raise BadRequest("the 'from' date is after the 'to' date")
    return first, last


def _day(text: str, name: str) -> date | None:
    if not text:
        return None
    try:
        if _DAY.fullmatch(text):
            return date.fromisoformat(text)
    except ValueError:
        pass
    raise BadRequest(f"'{name}' must be a date such as 2025-01-31, not {shown(text)}")
