"""Whole numbers typed by people, in a form field or on the command line."""

from __future__ import annotations


def whole_number(text: str) -> int:
    """The number `text` writes; ValueError with a sentence naming the text otherwise."""
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
