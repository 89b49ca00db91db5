"""The gallery's address: its filters and page number, read strictly from the query string."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import date
from urllib.parse import urlencode

from appliance.core.errors import BadRequest
from appliance.core.numbers import LARGEST_INTEGER, row_id, whole_number
from appliance.jobs.models import GalleryFilter

IMAGES_PER_PAGE = 48
# Jobs still running listed above the grid; the page reloads as each one ends.
PENDING_JOBS_SHOWN = 5
# The last page whose first image's place SQLite can still count to.
LAST_PAGE = LARGEST_INTEGER // IMAGES_PER_PAGE

# Only YYYY-MM-DD: date.fromisoformat also takes "20250131" and "2025-W05-1".
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_SHOWN = 40  # characters of a refused text worth echoing back


@dataclass(frozen=True)
class GalleryQuery:
    """The filter fields as typed, kept to fill the form and the page links again."""

    job: str = ""
    key: str = ""
    since: str = ""
    until: str = ""

    def to_filter(self) -> GalleryFilter:
        """The filter these fields ask for; BadRequest naming the field that is wrong."""
        since, until = _day(self.since, "from"), _day(self.until, "to")
        if since and until and since > until:
            raise BadRequest("the 'from' date is after the 'to' date")
        return GalleryFilter(job_id=_job_id(self.job), key_id=_key_id(self.key),
                             since=since, until=until)

    def link_query(self) -> str:
        """The filters as a query string for links to other pages; empty fields left out."""
        fields = {"job": self.job, "key": self.key, "from": self.since, "to": self.until}
        return urlencode({name: value for name, value in fields.items() if value})

    @property
    def active(self) -> bool:
        return any((self.job, self.key, self.since, self.until))


def page_number(text: str) -> int:
    try:
        return whole_number(text, 1, LAST_PAGE)
    except ValueError as problem:
        raise BadRequest(f"There is no such page of images: {problem}") from None


def _day(text: str, name: str) -> date | None:
    if not text:
        return None
    try:
        if _DAY.fullmatch(text):
            return date.fromisoformat(text)
    except ValueError:
        pass
    raise BadRequest(f"'{name}' must be a date such as 2025-01-31, not {_shown(text)}")


def _job_id(text: str) -> str | None:
    if not text:
        return None
    # Job ids are uuid4's text; anything else names no job, of this account or another.
    try:
        if len(text) == 36 and str(uuid.UUID(text)) == text:
            return text
    except ValueError:
        pass
    raise BadRequest(f"'job' must be a job id, as its page shows it, not {_shown(text)}")


def _key_id(text: str) -> int | None:
    if not text:
        return None
    number = row_id(text)
    if number is None:
        raise BadRequest(f"'key' must be one of your keys, not {_shown(text)}")
    return number


def _shown(text: str) -> str:
    return repr(text) if len(text) <= _SHOWN else repr(text[:_SHOWN]) + "…"
