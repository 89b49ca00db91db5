"""Errors the services raise; the HTTP layer and the CLI word them for people."""

from __future__ import annotations


class ApplianceError(Exception):
    """A refusal with a human sentence. `status` is the HTTP status it maps to."""

    status = 400

    def __init__(self, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ApplianceError):
    status = 400


class Unauthorized(ApplianceError):
    status = 401


class InsufficientCredits(ApplianceError):
    status = 402

    def __init__(self) -> None:
        super().__init__("Insufficient credits")


class Forbidden(ApplianceError):
    status = 403


class NotFound(ApplianceError):
    status = 404


class Conflict(ApplianceError):
    status = 409


class TooManyRequests(ApplianceError):
    status = 429

    def __init__(self, message: str, retry_after: int):
        super().__init__(message, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class ServiceUnavailable(ApplianceError):
    status = 503

    def __init__(self, message: str, retry_after: int):
        super().__init__(message, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class DatabaseBusy(ServiceUnavailable):
    """Another writer (a backup, a CLI command) held the database's write lock past the wait.

    Every write is one transaction, so a refused one left nothing behind. A lock is
    usually a short backup or CLI write: the client may retry after a few seconds.
    """

    RETRY_AFTER_SECONDS = 5

    def __init__(self) -> None:
        super().__init__("The database is busy with another writer; nothing was changed."
                         " Try again shortly", retry_after=self.RETRY_AFTER_SECONDS)


class DatabaseUnreachable(ServiceUnavailable):
    """Cluster mode: the PostgreSQL server cannot be reached (restarting, cut off).

    A write that failed this way was not committed; the client may retry, on this node
    or another, once the database is back.
    """

    RETRY_AFTER_SECONDS = 5

    def __init__(self) -> None:
        super().__init__("The database cannot be reached; nothing was changed. Try again"
                         " shortly", retry_after=self.RETRY_AFTER_SECONDS)
