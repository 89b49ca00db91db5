"""Structured logs: one record a line, as logfmt or JSON, with secrets masked.

Every record of the process (ours, uvicorn's, litestar's, diffusers') goes
through the root handler set up here, so masking there covers all of them.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from appliance.core.clock import utc_iso
from appliance.core.config import LoggingConfig
from appliance.web.access_log import ACCESS_LOGGER

REDACTED = "[redacted]"

# API keys anywhere in a line (messages, tracebacks, request paths), and the
# values after words that carry credentials: "Bearer x", "password=x",
# "session: x", "cookie=x".
_SECRET_PATTERNS = [
    (re.compile(r"wi_live_[0-9A-Za-z_]+"), "wi_live_" + REDACTED),
    (re.compile(r"(?i)\b(bearer)\s+[^\s\"',;]+"), r"\1 " + REDACTED),
    (re.compile(r"(?i)\b(password|passwd|secret|session(?:[_-]?id)?|cookie|authorization|token)"
                r"(\\?[\"']?\s*[:=]\s*\\?[\"']?)[^\s\"',;&]+"),
     r"\1\2" + REDACTED),
]
_SECRET_FIELD = re.compile(
    r"(?i)password|passwd|secret|session|cookie|authorization|token|api_?key")

# A record given no `extra=`: its attributes are the ones every LogRecord has.
_PLAIN = vars(logging.LogRecord("", 0, "", 0, "", None, None))
# Anything else came from `extra=` and is a field.
_RECORD_ATTRIBUTES = frozenset(_PLAIN) | {"message", "asctime", "taskName"}
_PLAIN_RECORD = len(_PLAIN)


# The words without which each pattern above cannot match.
_CLUES = (("wi_live_",), ("bearer",),
          ("password", "passwd", "secret", "session", "cookie", "authorization", "token"))


def redact(text: str) -> str:
    # Every request's access line comes through here, and most lines hold none
    # of the words the patterns need: looking for those first costs a tenth of
    # running the patterns. Case-insensitive matching beyond ASCII has more
    # spellings than lower() finds, so other text always goes through them all.
    lowered = text.lower() if text.isascii() else None
    for (pattern, replacement), clues in zip(_SECRET_PATTERNS, _CLUES, strict=True):
        if lowered is None or any(clue in lowered for clue in clues):
            text = pattern.sub(replacement, text)
    return text


class _Timestamps:
    """utc_iso() of a record's time (to the millisecond, truncated), its text up to the
    second made once a second: formatting a datetime a line cost a sixth of an access line."""

    def __init__(self) -> None:
        # (the second, its text): one attribute, so threads read a consistent pair.
        self._latest: tuple[int, str] | None = None

    def __call__(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        latest = self._latest
        if latest is None or latest[0] != second:
            latest = self._latest = (second,
                                     utc_iso(datetime.fromtimestamp(second, UTC))[:-5])
        # From `created` itself, not logging's msecs (computed otherwise on newer
        # Pythons): the second and its milliseconds always agree.
        return f"{latest[1]}.{int((record.created - second) * 1000):03d}Z"


_timestamp = _Timestamps()


def _access_args(record: logging.LogRecord) -> tuple[Any, Any, Any, Any] | None:
    """(client, method, target, status) of an access line (web/access_log.py), else None."""
    args = record.args
    if record.name == ACCESS_LOGGER and isinstance(args, tuple) and len(args) == 4:
        return args
    return None


def _access_fields(record: logging.LogRecord) -> dict[str, Any]:
    args = _access_args(record)
    if args is None:
        return {}
    client, method, path, status = args
    return {"client": client, "method": method, "path": path, "status": status}


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "ts": _timestamp(record),
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    fields.update(_access_fields(record))
    attributes = vars(record)
    # Most records (every access line) carry no fields of their own.
    extra = attributes.keys() - _RECORD_ATTRIBUTES
    if extra:
        for name, value in attributes.items():  # in the order they were given
            if name in extra and not name.startswith("_"):
                fields[name] = REDACTED if _SECRET_FIELD.search(name) else value
    if record.exc_info:
        fields["exc"] = logging.Formatter().formatException(record.exc_info)
    elif record.exc_text:
        fields["exc"] = record.exc_text
    return fields


_NEEDS_QUOTES = re.compile(r'[\s"=\\]')


def _logfmt_value(value: Any) -> str:
    if type(value) is int:  # a status, a count: as JSON writes it, without its cost
        return str(value)
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text and not _NEEDS_QUOTES.search(text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


@functools.lru_cache(maxsize=4096)
def _request_text(text: str) -> tuple[str, str]:
    """A client's or a target's text redacted, and as a logfmt value. Kept: a client
    polls the same job from the same connection many times over."""
    redacted = redact(text)
    return redacted, _logfmt_value(redacted)


def _access_logfmt(record: logging.LogRecord, args: tuple[Any, Any, Any, Any]) -> str:
    """An access line made in one go: it is the line every request writes, and the
    general path below cost a third of a status poll's logging. Only the client and
    the target are the request's own text, so only they are redacted; the line is
    otherwise the general path's."""
    client, method, target, status = args
    (client, client_value), (target, target_value) = (_request_text(str(client)),
                                                      _request_text(str(target)))
    message = record.msg % (client, method, target, status)
    return (f"ts={_timestamp(record)} level={record.levelname.lower()} logger={record.name}"
            f" msg={_logfmt_value(message)} client={client_value}"
            f" method={_logfmt_value(method)} path={target_value}"
            f" status={_logfmt_value(status)}")


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        access = _access_args(record)
        if access is not None and not record.exc_info and len(vars(record)) == _PLAIN_RECORD:
            return _access_logfmt(record, access)
        fields = record_fields(record).items()
        line = " ".join(f"{key}={_logfmt_value(value)}" for key, value in fields)
        return redact(line)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(json.dumps(record_fields(record), default=str, ensure_ascii=False))


# Loggers whose warnings a client can set off as often as it likes: the HTTP
# server's (h11 protocol errors), asyncio's (accept errors) and the connection
# limits'. Access lines (web/access_log.py) are never held back.
FLOOD_LOGGERS = frozenset({"uvicorn.error", "asyncio", "appliance.runtime.connections"})
_OUT_OF_FILES = frozenset({errno.EMFILE, errno.ENFILE})
REPEAT_WINDOW_SECONDS = 10.0
# Past this many kinds remembered, those not seen for a window are forgotten.
_MOST_KINDS = 256


def fault_kind(record: logging.LogRecord) -> Hashable | None:
    """What makes two records the same fault, for RepeatLimiter; None: never held back."""
    error = record.exc_info[1] if record.exc_info else record.msg
    if isinstance(error, OSError) and error.errno in _OUT_OF_FILES:
        return ("out of files", error.errno)  # "Too many open files", from anywhere
    if record.name not in FLOOD_LOGGERS or record.levelno < logging.WARNING:
        return None
    # The template, not the formatted line: the client's address and counts vary.
    first_line = str(record.msg).partition("\n")[0]
    return (record.name, first_line, type(error).__name__ if record.exc_info else None)


@dataclass
class _Seen:
    since: float
    held_back: int = 0


class RepeatLimiter(logging.Filter):
    """Lets one record of each fault kind through per `window` seconds: a flood of
    connections, or running out of files, writes a line every few seconds, not
    thousands. The next line let through says how many like it were left out
    (field repeats_suppressed)."""

    def __init__(self, window: float = REPEAT_WINDOW_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.window = window
        self.clock = clock
        self._seen: dict[Hashable, _Seen] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        kind = fault_kind(record)
        if kind is None:
            return True
        with self._lock:
            now = self.clock()
            seen = self._seen.get(kind)
            if seen is not None and now - seen.since < self.window:
                seen.held_back += 1
                return False
            if len(self._seen) >= _MOST_KINDS:
                self._seen = {k: s for k, s in self._seen.items() if now - s.since < self.window}
            self._seen[kind] = _Seen(now)
        if seen is not None and seen.held_back:
            record.repeats_suppressed = seen.held_back
        return True


HANDLER_NAME = "appliance"
FORMATTERS = {"logfmt": LogfmtFormatter, "json": JsonFormatter}


def configure_logging(settings: LoggingConfig, stream=None) -> None:
    """Routes every logger of the process to one stderr handler in the chosen format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(FORMATTERS[settings.format]())
    handler.addFilter(RepeatLimiter())
    handler.set_name(HANDLER_NAME)
    root = logging.getLogger()
    # Replaces a handler of an earlier call, or logging.basicConfig's; handlers
    # that others added (a test runner's capture) stay.
    for old in list(root.handlers):
        if old.get_name() == HANDLER_NAME or type(old) is logging.StreamHandler:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.level.upper())
    # Facts no line shows, each gathered for every record (the logging HOWTO's
    # "Optimization"): the caller's frame, file and line, and the thread,
    # process and task. Every request writes a line.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # uvicorn's loggers would otherwise keep handlers of their own.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
