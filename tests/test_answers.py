"""Tests for answers.py beyond float precision: integers are read and compared exactly (Python's int is the
oracle), while answers with decimals keep the 1e-4 tolerance."""

from plumbing.answers import format_number, is_correct, parse_math

BIG = 12345678901234567890  # float(BIG) == 12345678901234567168.0


def test_integers_compare_exactly_and_decimals_within_1e_4():
    assert parse_math(f"So the answer is {BIG}.", "cot") == BIG and parse_math("12,345,678,901,234,567,891") == BIG + 1
    assert is_correct(parse_math(str(BIG)), str(BIG), "math")
    assert not is_correct(parse_math(str(BIG + 1)), str(BIG), "math")
    assert not is_correct(parse_math(str(BIG)), "12345678901234567891", "math")
    assert is_correct(parse_math("-7"), "-7", "math") and not is_correct(parse_math("-8"), "-7", "math")
    # answers with decimals keep the 1e-4 tolerance
    assert is_correct(parse_math("0.666667"), format_number(2 / 3), "math")  # 2/3 written with 6 decimals
    assert is_correct(parse_math("3.00001"), "3", "math") and not is_correct(parse_math("3.001"), "3", "math")
    assert is_correct(parse_math("42.0"), "42", "math") and is_correct(parse_math("42"), "42.00005", "math")
    assert parse_math("9" * 400) is None and not is_correct(parse_math("9" * 400), "1", "math")  # beyond float's range
