"""An account's usage for its dashboard: images made a day, and credits spent per API key.

Reads only. Days are UTC calendar days, as every stored time is UTC
(core/clock.py); a day with no image is a zero, not a missing row.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

from appliance.core.database import Database
from appliance.jobs.models import ImageStatus

# How far back the dashboard's pictures look.
USAGE_DAYS = 30


@dataclass(frozen=True)
class DayImages:
    day: date
    images: int


@dataclass(frozen=True)
class KeySpend:
    """Credits an API key spent: charged for its jobs, less what was refunded."""

    key_id: int | None  # None: jobs made in the console's playground, with no key
    name: str
    prefix: str | None
    deleted: bool
    images: int  # images asked for
    credits: int  # net: charged minus refunded


def first_day(today: date, days: int) -> date:
    return today - timedelta(days=days - 1)


def images_per_day(db: Database, account_id: int, today: date,
                   days: int = USAGE_DAYS) -> list[DayImages]:
    """Completed images of the account by the UTC day they were finished, oldest day first."""
    start = first_day(today, days)
    counts = dict(db.execute(
        "SELECT substr(i.finished_at, 1, 10), COUNT(*) FROM job_images i"
        " JOIN jobs j ON j.id = i.job_id"
        " WHERE j.account_id = ? AND i.status = ? AND i.finished_at >= ?"
        " GROUP BY 1",
        [account_id, ImageStatus.COMPLETED, start.isoformat()],
    ).fetchall())
    return [DayImages(day, counts.get(day.isoformat(), 0))
            for day in (start + timedelta(days=n) for n in range(days))]


def credits_per_key(db: Database, account_id: int, today: date,
                    days: int = USAGE_DAYS) -> list[KeySpend]:
    """Net credits each of the account's keys spent on jobs created in the window, most first.

    Refunds (failed or cancelled images) are taken off the job they belong to,
    whenever they happened, so a key is shown what its jobs finally cost.
    """
    rows = db.execute(
        "SELECT j.api_key_id, k.name, k.prefix, k.deleted_at IS NOT NULL,"
        " SUM(j.total_images), SUM(j.credits_used - j.credits_refunded)"
        " FROM jobs j LEFT JOIN api_keys k ON k.id = j.api_key_id"
        " WHERE j.account_id = ? AND j.created_at >= ?"
        " GROUP BY j.api_key_id, k.name, k.prefix, k.deleted_at ORDER BY 6 DESC, 2",
        [account_id, first_day(today, days).isoformat()],
    ).fetchall()
    return [KeySpend(key_id, name if key_id is not None else "Playground (no key)", prefix,
                     bool(deleted), images, credits)
            for key_id, name, prefix, deleted, images, credits in rows]
