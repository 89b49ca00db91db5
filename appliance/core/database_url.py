"""A PostgreSQL database named by URL in storage.database, kept apart from the text shown.

The URL may carry a password: it is used to connect and never shown; what logs, errors
and pages print is `shown`, the same URL with the password masked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

SCHEMES = ("postgresql", "postgres")
_ANY_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def looks_like_url(text: str) -> bool:
    return bool(_ANY_URL.match(text.strip()))


def scheme_of(text: str) -> str:
    return text.strip().split(":", 1)[0].lower()


@dataclass(frozen=True)
class DatabaseUrl:
    url: str = field(repr=False)

    def __post_init__(self) -> None:
        problem = _problem(self.url)
        if problem:
            raise ValueError(problem)

    @property
    def shown(self) -> str:
        parts = urlsplit(self.url)
        if parts.password is not None:
            host = parts.netloc.rsplit("@", 1)[1]
            parts = parts._replace(netloc=f"{unquote(parts.username or '')}:***@{host}")
        if parts.query:
            # libpq also takes the password as a parameter: ?password=...
            query = parse_qsl(parts.query, keep_blank_values=True)
            parts = parts._replace(query=urlencode(
                [(name, "***" if name.lower() == "password" else value)
                 for name, value in query], safe="*"))
        return parts.geturl()

    @property
    def name(self) -> str:
        """The database's name, from the URL's path."""
        return unquote(urlsplit(self.url).path.lstrip("/"))

    def __str__(self) -> str:
        return self.shown


def _problem(url: str) -> str | None:
    if scheme_of(url) not in SCHEMES:
        return f"is a {scheme_of(url)}:// URL; only postgresql:// URLs name a database"
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 (a port that is not a number raises here)
    except ValueError:
        return "is not a valid postgresql:// URL (postgresql://USER:PASSWORD@HOST:PORT/DBNAME)"
    if not parts.hostname or not parts.path.strip("/"):
        return ("must name a host and a database: postgresql://USER:PASSWORD@HOST:PORT/DBNAME")
    return None
