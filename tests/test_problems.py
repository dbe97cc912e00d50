"""Tests for problems.py: every rationale is re-derived from its equations with answers.safe_eval, each operand
traced to the question or an earlier step, and the set's properties (determinism, variety) checked."""

import collections
import re

import pytest

from plumbing.answers import format_number, safe_eval
from plumbing.problems import make_problems

NUM = r"\d+(?:\.\d+)?"
EQUATION = re.compile(rf"({NUM}) ([-+*/]) ({NUM}) = ({NUM})")


def recompute(problem) -> tuple[str, int]:
    """(answer re-derived from the rationale, number of operations), checking every step on the way."""
    *steps, last = re.split(r"(?<=\.) ", problem["rationale"])
    known = set(re.findall(NUM, problem["question"]))
    for step in steps:
        assert step.endswith("."), step
        (a, op, b, c), *more = EQUATION.findall(step) or [(None,) * 4]
        assert a is not None and not more, f"expected one equation in {step!r}"
        assert a in known and b in known, f"{step!r} uses a number not in the question or earlier steps"
        assert abs(safe_eval(f"{a} {op} {b}") - float(c)) < 1e-9, step
        known.add(c)
    final = re.fullmatch(rf"The answer is ({NUM})\.", last)
    assert final and final.group(1) == c, last
    return final.group(1), len(steps)


@pytest.fixture(scope="module")
def problems():
    return make_problems(400, seed=0)


def test_every_answer_is_rederived(problems):
    for p in problems:
        answer, _ = recompute(p)
        assert answer == p["answer"] == format_number(float(p["answer"]))


def test_hand_checked_rationale():
    # the recompute oracle must fail on a wrong step, an unknown operand and a wrong final answer
    good = {"question": "Ann has 3 bags of 4 pens.", "answer": "12", "rationale": "She has 3 * 4 = 12 pens. "
            "The answer is 12."}
    assert recompute(good) == ("12", 1)
    for bad in ("She has 3 * 4 = 13 pens. The answer is 13.", "She has 3 * 5 = 15 pens. The answer is 15.",
                "She has 3 * 4 = 12 pens. The answer is 13."):
        with pytest.raises(AssertionError):
            recompute({**good, "rationale": bad})


def test_operation_counts_and_decimals(problems):
    counts = collections.Counter(recompute(p)[1] for p in problems)
    assert set(counts) == {1, 2, 3} and min(counts.values()) > 60
    decimals = [p["answer"] for p in problems if "." in p["answer"]]
    assert len(decimals) > 40 and all(len(d.split(".")[1]) <= 2 for d in decimals)
    assert sum(" / " in p["rationale"] for p in problems) > 40  # exact divisions occur


def test_ids_questions_and_variety(problems):
    assert [p["id"] for p in problems] == [f"builtin-0-{i}" for i in range(400)]
    assert len({p["question"] for p in problems}) == 400
    first_words = collections.Counter(p["question"].split()[0] for p in problems)
    assert len(first_words) >= 8  # names, "A", "Adult", ...
    assert all(set(p) == {"id", "question", "answer", "rationale"} for p in problems)


def test_determinism_and_seeds():
    assert make_problems(50, seed=7) == make_problems(50, seed=7)
    shared = {p["question"] for p in make_problems(50, seed=8)} & {p["question"] for p in make_problems(50, seed=7)}
    assert len(shared) < 5
    assert make_problems(0) == []
    with pytest.raises(ValueError):
        make_problems(-1)
