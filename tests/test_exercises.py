"""widgets.exercises: a numeric answer is judged without the expected value being shown."""

from pathlib import Path

import numpy as np
import pytest

from widgets.exercises import answer_checker


def said(capsys) -> str:
    return capsys.readouterr().out.strip()


def test_right_answer_says_right_and_returns_true(capsys):
    check = answer_checker(4603.2, unit="steps")
    assert check(4603) is True
    out = said(capsys)
    assert out.startswith("right") and "steps" in out


def test_too_high_and_too_low_say_how_far_and_never_the_expected_value(capsys):
    check = answer_checker(36.99)
    assert check(36.99 * 1.12) is False
    high = said(capsys)
    assert high == "off by 12% (too high)"
    assert check(36.99 * 0.75) is False
    low = said(capsys)
    assert low == "off by 25% (too low)"
    assert "36.99" not in high + low and "37" not in high + low


def test_small_misses_are_given_to_a_tenth_of_a_percent(capsys):
    assert answer_checker(100.0, rel=0.01)(103.4) is False
    assert said(capsys) == "off by 3.4% (too high)"
    assert answer_checker(0.3)(0.3 * 1.09999) is False  # rounds to 10%, not "10.0%"
    assert said(capsys) == "off by 10% (too high)"


def test_negative_expected_values_keep_high_and_low_the_right_way_round(capsys):
    check = answer_checker(-2.0)
    assert check(-1.0) is False
    assert "too high" in said(capsys)
    assert check(-3.0) is False
    assert "too low" in said(capsys)


def test_relative_tolerance_is_the_edge_of_right():
    check = answer_checker(0.98144, rel=0.01)
    assert check(0.98144 * 1.009) and check(0.98144 * 0.991)
    assert not check(0.98144 * 1.011) and not check(0.98144 * 0.989)
    assert answer_checker(200, rel=0.1)(215) and not answer_checker(200, rel=0.05)(215)


def test_numpy_numbers_are_numbers_on_both_sides(capsys):
    check = answer_checker(np.float64(0.5) ** 2)
    assert check(np.float32(0.25)) and check(np.array(0.25)) and check(np.int64(1) / 4)
    assert "right" in said(capsys)


@pytest.mark.parametrize("answer", ["12", None, [1.0], True, float("nan"), np.ones(2), "abc"])
def test_non_numbers_get_a_clear_message_and_no_exception(capsys, answer):
    assert answer_checker(12.0)(answer) is False
    out = said(capsys)
    assert "is not a number" in out and "check(" in out


@pytest.mark.parametrize("expected", [0, float("inf"), "7", None])
def test_an_exercise_without_a_usable_expected_value_fails_when_written(expected):
    with pytest.raises(ValueError, match="expected"):
        answer_checker(expected)


def test_the_tolerance_must_be_a_fraction():
    with pytest.raises(ValueError, match="rel"):
        answer_checker(1.0, rel=5)


def test_notebook_01_checks_every_numeric_exercise_against_its_solution(capsys):
    """Each exercise of notebook 01 has a checker, and the solutions' numbers are right."""
    import nbformat

    from lessons import ema as E

    path = Path(__file__).parent.parent / "notebooks" / "01_discounting_half_life_ema.ipynb"
    cells = [c.source for c in nbformat.read(path, 4).cells if c.cell_type == "code"]
    cell = next(c for c in cells if "answer_checker(" in c)
    scope = {"E": E, "np": np}
    exec(cell, scope)
    solutions = {"check1": 0.98144, "check2": 0.98412, "check3": 4603, "check4": 69}
    for name, answer in solutions.items():
        assert scope[name](answer), name
    assert not scope["check1"](0.98) and not scope["check2"](0.984 * 1.001)
