"""Reading a model's answer: the number or the choice an output states, and whether it is right.

No paper equation lives here; eval.py scores with these functions and data.py reads the teacher's answers with
them (so neither imports the other). The paper does not say how it reads answers (our choices: docs/design.md,
"Evaluation"). Two modes: `answer`, the output of the answer task; `cot`, a rationale that ends with its answer
statement. Two answer targets (`TARGETS`) say what the answer task writes: `number`, the gold number (Eq. 1 with
a = the gold answer, read by `parse_math`); `equation`, an arithmetic expression whose value is the answer (DSS's
SVAMP labels, "( 45.0 * 10.0 )"), evaluated by eval.parse_equation with `safe_eval`.

Public functions:
    parse_math(text, mode) -> int | float | None   thousands commas removed; answer mode: the first number;
                                              cot mode: the number after the last "answer is", else the last;
                                              an int when it has no decimals (exact, up to float's range),
                                              else a float.
    parse_choice(text, choices, mode) -> str | None   the first "(x)" letter a-e, else the letter of the
                                              choice text found first in the output (cot mode: both looked
                                              for after the last "answer is" when there is one).
    is_correct(pred, gold, task) -> bool      math: pred == gold when both are integers (exact), else
                                              |pred - gold| < 1e-4; csqa: same letter as "(c) ...".
    check_mode(mode)                          ValueError unless mode is "answer" or "cot".
    check_target(target)                      ValueError unless target is "number" or "equation".
    format_number(x) -> str                   a number as answer text: "42", "0.5", "0.666667" (at most 6
                                              decimals, half to even); ints and Decimals exactly.
"""

import ast
import math
import re
from decimal import Context, Decimal

MODES = ("answer", "cot")
TARGETS = ("number", "equation")  # what the answer task writes: the gold number, or an expression (DSS's SVAMP)
NUMBER = re.compile(r"(?:(?<!\w)-)?(?:\d+(?:\.\d+)?|\.\d+)")  # "5-3" is 5 and 3; "x = -3" is -3
THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
ANSWER_IS = re.compile(r"answer is", re.IGNORECASE)
LETTER = re.compile(r"\(([a-eA-E])\)")
_OPS = {ast.Add: float.__add__, ast.Sub: float.__sub__, ast.Mult: float.__mul__, ast.Div: float.__truediv__}


def check_mode(mode: str) -> None:
    """ValueError unless `mode` is one of MODES."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")


def check_target(target: str) -> None:
    """ValueError unless `target` is one of TARGETS."""
    if target not in TARGETS:
        raise ValueError(f"answer target must be one of {list(TARGETS)}, got {target!r}")


def _after_last_answer_is(text: str) -> str | None:
    hits = list(ANSWER_IS.finditer(text))
    return text[hits[-1].end():] if hits else None


def _number(text: str) -> int | float:  # an int when `text` has no decimals and is within float's range
    value = float(text)
    return int(text) if "." not in text and math.isfinite(value) else value


def parse_math(text: str, mode: str = "answer") -> int | float | None:
    """The number a model's output answers with, or None when it has none."""
    check_mode(mode)
    text = THOUSANDS.sub("", text)
    if mode == "answer":
        found = NUMBER.search(text)
        return _number(found.group()) if found else None
    tail = _after_last_answer_is(text)
    found = NUMBER.search(tail) if tail is not None else None
    if found is None:
        numbers = NUMBER.findall(text)
        return _number(numbers[-1]) if numbers else None
    return _number(found.group())


def parse_choice(text: str, choices: list[str], mode: str = "answer") -> str | None:
    """The letter ("a".."e") a model's output picks, or None."""
    check_mode(mode)
    tail = _after_last_answer_is(text) if mode == "cot" else None
    for part in ([tail] if tail is not None else []) + [text]:
        found = LETTER.search(part)
        if found:
            return found.group(1).lower()
        lowered = part.lower()
        # earliest occurrence wins; at one position the longer text ("body of water" over "water")
        hits = [(lowered.find(c.lower()), -len(c), k) for k, c in enumerate(choices) if c and c.lower() in lowered]
        if hits:
            return "abcde"[min(hits)[2]]
    return None


def is_correct(pred, gold: str, task: str) -> bool:
    """Whether a parsed prediction matches the gold answer string."""
    if task == "math":
        gold = _number(gold.replace(",", ""))
        if isinstance(pred, int) and isinstance(gold, int):
            return pred == gold
        return pred is not None and abs(pred - gold) < 1e-4
    if task == "csqa":
        found = LETTER.search(gold)
        if found is None:
            raise ValueError(f"CSQA gold answer has no (x) letter: {gold!r}")
        return pred == found.group(1).lower()
    raise ValueError(f"task must be 'math' or 'csqa', got {task!r}")


def format_number(x: float | int | Decimal) -> str:
    """`x` as gold-answer text: integral -> "42", else rounded to 6 decimals (half to even), trailing zeros
    stripped. Exact: a float at its binary value, an int or a Decimal (`_number`, from text) as it is."""
    x = Decimal(x)
    if not x.is_finite() or not math.isfinite(float(x)):  # float's range: at most 309 digits
        raise ValueError(f"not a finite number: {x}")
    text = format(x.quantize(Decimal("1e-6"), context=Context(prec=max(x.adjusted(), 0) + 8)), "f")
    text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def safe_eval(expr: str) -> float:
    """Value of `expr` built from numbers, + - * /, parentheses and unary minus; walks the AST, never eval."""

    def walk(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        raise ValueError(f"not allowed in an arithmetic expression: {ast.dump(node)[:60]}")

    try:
        return walk(ast.parse(expr.strip(), mode="eval").body)
    except (SyntaxError, ZeroDivisionError, OverflowError) as e:
        raise ValueError(f"cannot evaluate {expr!r}: {e}") from None
