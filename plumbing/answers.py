"""Reading a model's answer: the number or the choice an output states, the value of an arithmetic expression, and
whether an answer is right.

The paper does not say how it reads answers; these are our choices (docs/design.md, "Evaluation"). eval.py scores
with them and data.py reads the teacher's answers with them, so neither imports the other. Two modes (`MODES`):
`answer`, the output of the answer task, read for its first number or choice; `cot`, a rationale, read for what
follows its last "answer is". Two answer targets (`TARGETS`) say what the answer task writes: `number`, the gold
number (Eq. 1 with a = the gold answer); `equation`, an arithmetic expression whose value is the answer (DSS's SVAMP
labels, "( 45.0 * 10.0 )"), evaluated by `safe_eval`, an AST walk, never Python's eval. Integers are read and
compared exactly, other numbers within 1e-4. A reader of model output reads only its first `READ_CHARS` characters:
2048, 16 a token over cot's 128 new tokens, where SmolLM2's tokenizer gives SVAMP's questions 3.9 characters a token
and GSM8K's rationales 2.3 (its longest token has 81). It returns None for what it cannot read (no number, a number
or a value beyond float's range, an expression nested too deep for Python): no string makes it raise.
"""

import ast
import math
import re
import warnings
from decimal import Context, Decimal

MODES = ("answer", "cot")
TARGETS = ("number", "equation")  # what the answer task writes: the gold number, or an expression (DSS's SVAMP)
READ_CHARS = 2048  # what a reader reads of an output; also keeps int() below Python's 4300-digit limit
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


def _number(text: str) -> int | float | None:
    """`text` (a NUMBER match) as an int when it has no decimals, else a float; None beyond float's range."""
    value = float(text)
    if not math.isfinite(value):
        return None
    return value if "." in text else int(text)


def parse_math(text: str, mode: str = "answer") -> int | float | None:
    """The number a model's output answers with (thousands commas removed; answer mode: the first number; cot mode:
    the number after the last "answer is", else the last; an int when written without decimals), or None."""
    check_mode(mode)
    text = THOUSANDS.sub("", text[:READ_CHARS])
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
    """The letter ("a".."e") a model's output picks: the first "(x)", else the choice whose text comes first (cot
    mode: both looked for after the last "answer is" first); None when it picks none."""
    check_mode(mode)
    text = text[:READ_CHARS]
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
    """Whether a parsed prediction matches the gold answer string: math, equal when both are integers, else within
    1e-4; csqa, the letter of gold's "(c) ..."."""
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
    """The value of `expr` built from numbers, + - * /, parentheses and unary minus; walks the AST, never eval.
    ValueError, and no other error, when it is anything else: other syntax, a division by zero, a value beyond
    float's range at any step, nesting too deep for Python's parser or recursion (about a thousand operators)."""

    def walk(node) -> float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            value = float(node.value)
        elif isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            value = _OPS[type(node.op)](walk(node.left), walk(node.right))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            value = -walk(node.operand)
        else:
            raise ValueError(f"not allowed in an arithmetic expression: {type(node).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"beyond float's range: {value}")
        return value

    try:
        with warnings.catch_warnings():  # "5x": Python's SyntaxWarning on the way to the SyntaxError
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(expr.strip(), mode="eval")
        return walk(tree.body)
    except (SyntaxError, ZeroDivisionError, OverflowError, RecursionError, MemoryError) as e:
        raise ValueError(f"cannot evaluate {expr[:60]!r}: {type(e).__name__}: {str(e)[:100]}") from None
