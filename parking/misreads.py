"""Characters that plate readers confuse, and plates that differ only by them.

Plates that one misread could turn into each other share a *confusion form*:
every character replaced by the representative of its class. The store keeps
open visits of one confusion form together, so looking for a misread exit's
visit is one set lookup instead of a scan.
"""

from __future__ import annotations

import random

#: Classes of characters that readers swap (O/0/D/Q, I/1/L, B/8, S/5, Z/2, G/6).
CONFUSABLE_CLASSES = ("0ODQ", "1IL", "8B", "5S", "2Z", "6G")
_REPRESENTATIVE = {char: group[0] for group in CONFUSABLE_CLASSES for char in group}
_CLASS_OF = {char: group for group in CONFUSABLE_CLASSES for char in group}


def confusion_form(plate_key: str) -> str:
    """The form shared by every plate one confusable misread away (normalised)."""
    return "".join(_REPRESENTATIVE.get(char, char) for char in plate_key)


def misread_distance(a: str, b: str) -> int | None:
    """Positions where two normalised plates differ, if only by confusables."""
    if len(a) != len(b) or confusion_form(a) != confusion_form(b):
        return None
    return sum(x != y for x, y in zip(a, b, strict=True))


def misread(plate: str, rng: random.Random) -> str:
    """The plate with one confusable character swapped, as a reader might."""
    positions = [i for i, char in enumerate(plate) if char in _CLASS_OF]
    if not positions:
        return plate
    at = rng.choice(positions)
    options = [c for c in _CLASS_OF[plate[at]] if c != plate[at]]
    return plate[:at] + rng.choice(options) + plate[at + 1 :]
