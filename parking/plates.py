"""Plates are kept as read for display and matched in a normalised form."""

from __future__ import annotations

import unicodedata

MAX_PLATE_LENGTH = 16
_SEPARATORS = frozenset(" -")


def _allowed(char: str) -> bool:
    # Letters and digits of any script (Ä, 京), plus the separators cameras print.
    return char.isalnum() or char in _SEPARATORS


def clean_plate(raw: str) -> str:
    """The plate as read, trimmed; raises ``ValueError`` naming the problem."""
    # Separators at the ends are noise from the reader, and a leading dash
    # would make a spreadsheet cell a formula.
    plate = unicodedata.normalize("NFC", raw).strip(" -")
    if not plate:
        raise ValueError("plate is empty")
    if len(plate) > MAX_PLATE_LENGTH:
        raise ValueError(f"plate longer than {MAX_PLATE_LENGTH} characters")
    bad = next((char for char in plate if not _allowed(char)), None)
    if bad is not None:
        raise ValueError(f"plate has a character that is not allowed: {bad!r}")
    if not normalise_plate(plate):
        raise ValueError("plate has no letter or digit")
    return plate


def normalise_plate(plate: str) -> str:
    """The matching key: case, spaces and dashes ignored."""
    return "".join(char for char in plate.upper() if char not in _SEPARATORS)
