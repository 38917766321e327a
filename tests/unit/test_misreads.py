from __future__ import annotations

import random

import pytest

from parking.misreads import confusion_form, misread, misread_distance


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [
        pytest.param("ABC123", "ABC123", 0, id="same"),
        pytest.param("OBC123", "0BC123", 1, id="O-zero"),
        pytest.param("DQO000", "ODQ0D0", 4, id="whole-O-class"),
        pytest.param("ILL111", "1I1LL1", 5, id="I-one-L"),
        pytest.param("B8S5Z2G6", "8B5S2Z6G", 8, id="every-pair"),
        pytest.param("ABC123", "ABC124", None, id="not-confusable"),
        pytest.param("ABC123", "ABC1234", None, id="other-length"),
        pytest.param("ABC123", "XBC123", None, id="A-is-not-confusable"),
    ],
)
def test_misread_distance(a: str, b: str, distance: int | None) -> None:
    assert misread_distance(a, b) == distance
    assert misread_distance(b, a) == distance


def test_confusable_plates_share_a_form_and_others_do_not() -> None:
    assert confusion_form("S0B1") == confusion_form("5O81")
    assert confusion_form("S0B1") != confusion_form("S0B7")


def test_misread_swaps_exactly_one_confusable_character() -> None:
    rng = random.Random(7)
    for _ in range(500):
        plate = "".join(rng.choices("ABOS0158XYZ2G6", k=7))
        read = misread(plate, rng)
        if plate == read:
            assert not any(char in "0ODQ1IL8B5S2Z6G" for char in plate)
        else:
            assert misread_distance(plate, read) == 1


def test_a_plate_without_confusables_is_read_as_it_is() -> None:
    assert misread("AXY347", random.Random(1)) == "AXY347"
