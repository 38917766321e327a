"""Plates are shown as read and matched in a normalised form."""

from __future__ import annotations

import pytest

from parking.plates import MAX_PLATE_LENGTH, clean_plate, normalise_plate


@pytest.mark.parametrize(
    "variants",
    [
        pytest.param(["AB-123", "ab-123", "AB 123", "ab123", "A-B 1-2-3"], id="latin"),
        pytest.param(["ÄÖ-123", "äö 123", "ÄÖ123"], id="umlauts"),
        pytest.param(["京A12345", "京a 12345", "京A-123-45"], id="cjk"),
    ],
)
def test_case_spaces_and_dashes_do_not_change_the_match(variants: list[str]) -> None:
    keys = {normalise_plate(clean_plate(plate)) for plate in variants}

    assert len(keys) == 1


def test_different_plates_keep_different_keys() -> None:
    assert normalise_plate("AB-123") != normalise_plate("AB-124")
    assert normalise_plate("O0") != normalise_plate("00")


@pytest.mark.parametrize(
    ("raw", "shown", "key"),
    [
        pytest.param("ab-123", "ab-123", "AB123", id="kept-lower-case"),
        pytest.param("  AB 123  ", "AB 123", "AB123", id="outer-spaces-trimmed"),
        pytest.param("-AB-123-", "AB-123", "AB123", id="outer-dashes-trimmed"),
        pytest.param("M  AB 12", "M  AB 12", "MAB12", id="inner-spaces-kept"),
        pytest.param("ÄÖ-123", "ÄÖ-123", "ÄÖ123", id="umlauts"),
        pytest.param("京A12345", "京A12345", "京A12345", id="cjk"),
        pytest.param("A\u0308Ö-1", "ÄÖ-1", "ÄÖ1", id="decomposed-umlaut-composed"),
    ],
)
def test_the_display_form_is_kept_as_read(raw: str, shown: str, key: str) -> None:
    plate = clean_plate(raw)

    assert plate == shown
    assert normalise_plate(plate) == key


def test_decomposed_and_composed_umlauts_match() -> None:
    composed = clean_plate("\u00c4\u00d6-123")
    decomposed = clean_plate("A\u0308O\u0308-123")

    assert normalise_plate(composed) == normalise_plate(decomposed)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("=1+1", id="equals"),
        pytest.param('=HYPERLINK("x")', id="hyperlink"),
        pytest.param("+AB123", id="plus"),
        pytest.param("@SUM(A1)", id="at"),
        pytest.param("\tAB123", id="leading-tab"),
        pytest.param("\rAB123", id="leading-carriage-return"),
        pytest.param("AB=123", id="equals-inside"),
    ],
)
def test_formula_looking_plates_are_rejected(raw: str) -> None:
    with pytest.raises(ValueError, match="not allowed"):
        clean_plate(raw)


def test_a_leading_dash_is_trimmed_so_no_cell_starts_with_it() -> None:
    assert clean_plate("-123") == "123"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param("", "empty", id="empty"),
        pytest.param("   ", "empty", id="spaces"),
        pytest.param(" - -", "empty", id="separators"),
        pytest.param("A" * (MAX_PLATE_LENGTH + 1), "longer than 16", id="too-long"),
        pytest.param("AB\x00123", "not allowed", id="nul"),
        pytest.param("AB\n123", "not allowed", id="newline"),
        pytest.param("AB.123", "not allowed", id="dot"),
        pytest.param("AB_123", "not allowed", id="underscore"),
        pytest.param("AB\u200d123", "not allowed", id="zero-width-joiner"),
        pytest.param("AB\u202e321", "not allowed", id="right-to-left-override"),
        pytest.param("AB🚗1", "not allowed", id="emoji"),
    ],
)
def test_unusable_plates_are_rejected_naming_the_problem(
    raw: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        clean_plate(raw)


def test_a_plate_of_the_maximum_length_is_accepted() -> None:
    plate = "A" * MAX_PLATE_LENGTH

    assert clean_plate(plate) == plate
