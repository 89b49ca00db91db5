"""Whole numbers that arrive as text: typed in a form field or on the command line, or
written in an address."""

from __future__ import annotations

import re

# SQLite keeps an integer in 64 signed bits: an id or index past this names no
# row, and binding a larger Python int raises OverflowError.
LARGEST_INTEGER = 2**63 - 1

# ASCII digits only: int() and str.isdigit() also take other scripts' digits
# ("\u0663", Arabic-Indic three; "\uff13", fullwidth three), and int() takes
# " 7", "+7" and "1_000". A leading '-' is allowed; `low` says whether a negative
# number makes sense.
_WHOLE = re.compile(r"-?[0-9]+")
_SHOWN = 40  # characters of a refused text worth echoing back


def shown(text: str) -> str:
    """`text` quoted to be echoed back in a refusal, cut if long."""
    return repr(text) if len(text) <= _SHOWN else repr(text[:_SHOWN]) + "…"


def whole_number(text: str, low: int, high: int) -> int:
    """The number `text` writes in the digits 0-9 (a '-' before a negative one), from `low`
    to `high`; ValueError with a sentence naming the text otherwise."""
    if not _WHOLE.fullmatch(text):
        raise ValueError(f"{shown(text)} is not a whole number")
    # Thousands of digits would make int() slow (and past 4300 it refuses them):
    # a number with more digits than both bounds is out of range anyway.
    digits = text.removeprefix("-").lstrip("0") or "0"
    if len(digits) <= max(len(str(abs(low))), len(str(abs(high)))):
        value = -int(digits) if text.startswith("-") else int(digits)
        if low <= value <= high:
            return value
    raise ValueError(f"{shown(text)} is out of range: it must be from {low} to {high}")


def row_id(text: str) -> int | None:
    """The id or index an address names, or None when `text` cannot name a row."""
    try:
        return whole_number(text, 0, LARGEST_INTEGER)
    except ValueError:
        return None


def size_text(count: float) -> str:
    """Bytes as a person reads them: 1023 B, 4.0 KiB, 12.3 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")
