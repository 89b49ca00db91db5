"""The gallery's address: its filters and page number, read strictly from the query string."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from urllib.parse import urlencode

from appliance.core.clock import day_range
from appliance.core.errors import BadRequest
from appliance.core.numbers import LARGEST_INTEGER, row_id, shown, whole_number
from appliance.jobs.models import GalleryFilter

IMAGES_PER_PAGE = 48
# Jobs still running listed above the grid; the page reloads as each one ends.
PENDING_JOBS_SHOWN = 5
# The last page whose first image's place SQLite can still count to.
LAST_PAGE = LARGEST_INTEGER // IMAGES_PER_PAGE



@dataclass(frozen=True)
class GalleryQuery:
    """The filter fields as typed, kept to fill the form and the page links again."""

    job: str = ""
    key: str = ""
    since: str = ""
    until: str = ""

    def to_filter(self) -> GalleryFilter:
        """The filter these fields ask for; BadRequest naming the field that is wrong."""
        since, until = day_range(self.since, self.until)
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


def _job_id(text: str) -> str | None:
    if not text:
        return None
    # Job ids are uuid4's text; anything else names no job, of this account or another.
    try:
        if len(text) == 36 and str(uuid.UUID(text)) == text:
            return text
    except ValueError:
        pass
    raise BadRequest(f"'job' must be a job id, as its page shows it, not {shown(text)}")


def _key_id(text: str) -> int | None:
    if not text:
        return None
    number = row_id(text)
    if number is None:
        raise BadRequest(f"'key' must be one of your keys, not {shown(text)}")
    return number
