"""Datasets, teacher rationales and the teacher attention cache (SPEC §1, §2, §7).

- `resolve_data_dir(path)`: the data directory (`--data-dir`, else env `MOLSAKI_DATA`, else `CACHE`,
  ~/.cache/molsaki/data).
- `FILES`: every file the loaders read (path in the data directory -> its `Source`: data set, GitHub repository,
  commit, path there, zip member, SHA-256); `files_of(name)`: the paths of one data set, PaLM files included.
- `ensure_files(root, paths)`: fetch those missing (the loaders call it before reading, so data is fetched on first
  use); `fetch(names, root)`: also fetch again a file whose SHA-256 differs. A file comes from
  `$MOLSAKI_DATA_URL` (default raw.githubusercontent.com) `/OWNER/REPO/COMMIT/PATH` (Distilling Step-by-Step's:
  members of its datasets.zip), is written under a temporary name and renamed only if its SHA-256 is right.
  No network, an HTTP error, a short body or another SHA-256: `DataUnavailable`, a one-line message.
- Command line: `python data.py fetch [NAME ...] [--data-dir DIR]` (no NAME: all).
- `load_dataset(name, split, data_dir)`: records `{id, question, answer, choices?}` (names: `SPLITS`).
- `load_file(path)`: the same records from a JSON / JSONL file of problems, its format detected (`FILE_FORMATS`).
- `load_palm_rationales(name, split, data_dir, keep)`: `{id, rationale, teacher_answer, phase}` from the PaLM-540B
  CoT of Distilling Step-by-Step (DSS), svamp or csqa: every item with a rationale (keep="all", as DSS trains),
  or only those whose PaLM answer equals gold (keep="correct").
- `split_answer(text)`: (r, statement), a teacher's output cut before its final answer statement (SPEC §2).
- `safe_eval(expr)`: the value of an arithmetic expression (numbers, + - * /, parentheses, unary minus).
- `format_number(x)`: a gold number as text ("42", "0.5", "0.666667": at most 6 decimals).
- `teacher_rationales(model, tok, records, path)`: dual-phase few-shot CoT (SPEC §7), resumable JSONL.
- `teacher_keywords(model, tok, examples, path)`: the CSQA critical words (App. B.2), resumable JSONL.
- `build_attention_cache(model, tok, examples, meta)`: `A_t [L1, S, W]` per example, from one no-grad
  teacher pass through `attention.capture`; `load_attention_cache(path, meta)` refuses a mismatched cache.

Choices the spec leaves open:
- svamp: the DSS 800/200 split; question = DSS's `input` verbatim; gold = its equation, evaluated.
- asdiv: ASDiv-A (the 1218 ids of nfolds/asdiv-a) in ASDiv.xml order, all as split "test" (no official
  split). Question = Body + " " + Question; answer = the number before the unit ("9 (apples)" -> "9").
  All ASDiv-A answers have that form (times, ordinals, yes/no occur in ASDiv-W only); any other raises
  ValueError. Remainder problems keep ASDiv's rounded answer ("200/28=7 r4" -> "8").
- csqa: the official v1.11 files (split "test" = dev), their order and ids. Ids elsewhere: "svamp-train-0",
  "gsm8k-test-0", "singleeq-<iIndex>", ASDiv's "nluds-0001".
- PaLM: the text before the first "Q:", split at the last "The answer is" (svamp) or "So the answer is"
  (csqa); r is the part before it (stripped), kept when the marker is there and r is not empty. PaLM's answer
  is the rest of that line: svamp evaluates the whole expression ("(16 * 17) * 4" -> 1088, where DSS's regex
  reads "(16 * 17)"); csqa's is the letter when the answer names exactly one ("(a) ocean or (b) sea" names
  none). It is correct when it equals gold; L_pre trains on gold whatever PaLM answered. phase = 0.
- Rationales never hold their answer statement (SPEC §2): the teacher's, PaLM's and the built-in ones are cut
  before the last "the answer is" / "so the answer is" (any case); the answer is learned by L_pre alone.
"""

import argparse
import ast
import hashlib
import http.client
import json
import math
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

import answers
import attention
import models
import spans

PRE_PROMPT = "Question: {question}\nAnswer:"
EXP_PROMPT = "Question: {question}\nRationale:"
SPLITS = {"svamp": ("train", "test"), "gsm8k": ("train", "test"), "asdiv": ("test",),
          "singleeq": ("test",), "csqa": ("train", "test")}
LETTERS = "abcde"
_PALM_FILES = {("svamp", "train"): 2, ("svamp", "test"): 1, ("csqa", "train"): 10, ("csqa", "test"): 2}
CACHE = Path.home() / ".cache" / "molsaki" / "data"  # the data directory without --data-dir or MOLSAKI_DATA
_OPS = {ast.Add: float.__add__, ast.Sub: float.__sub__, ast.Mult: float.__mul__, ast.Div: float.__truediv__}


def resolve_data_dir(path: str | Path | None) -> Path:
    """The data directory: `path` (the --data-dir flag), else env MOLSAKI_DATA (either must exist), else
    ~/.cache/molsaki/data (created here). The loaders fetch a file missing from it on first use."""
    path = path or os.environ.get("MOLSAKI_DATA")
    if not path:
        CACHE.mkdir(parents=True, exist_ok=True)
        return CACHE
    if not Path(path).is_dir():
        raise FileNotFoundError(f"data directory {path} not found: pass --data-dir or set MOLSAKI_DATA to an "
                                f"existing folder, or neither to use {CACHE}")
    return Path(path)


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


def format_number(x: float) -> str:
    """`x` as gold-answer text: integral -> "42", else at most 6 decimals, trailing zeros stripped."""
    if not math.isfinite(x):
        raise ValueError(f"not a finite number: {x}")
    x = round(float(x), 6)
    if x == int(x):
        return str(int(x))
    return f"{x:.6f}".rstrip("0").rstrip(".")


def _text(value) -> str:  # non-empty text, stripped
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected non-empty text, got {value!r}")
    return value.strip()


def _jsonl(path: Path) -> list[tuple[str, dict]]:  # (location, object) of each non-blank line
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append((f"{path}, line {n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
    return rows


def _json_array(path: Path) -> list[tuple[str, object]]:  # (location, item) of each item
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array")
    return [(f"{path}, item {i}", x) for i, x in enumerate(data)]


def _convert(rows, make) -> list:  # make(i, row) per row; a bad field -> ValueError naming where
    out = []
    for i, (where, row) in enumerate(rows):
        try:
            out.append(make(i, row))
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: malformed record ({type(e).__name__}: {e})") from None
    return out


def _svamp(root: Path, split: str) -> list[dict]:
    path = f"svamp/distilling_step_by_step/svamp_{split}.json"
    ensure_files(root, [path])
    rows = _jsonl(root / path)
    return _convert(rows, lambda i, r: {"id": f"svamp-{split}-{i}", "question": _text(r["input"]),
                                        "answer": format_number(safe_eval(r["label"]))})


def _gsm8k(root: Path, split: str) -> list[dict]:
    def make(i, r):
        _, sep, number = r["answer"].rpartition("####")
        if not sep:
            raise ValueError("no '####' before the final answer")
        return {"id": f"gsm8k-{split}-{i}", "question": _text(r["question"]),
                "answer": format_number(float(number.strip().replace(",", "")))}

    ensure_files(root, [f"gsm8k/{split}.jsonl"])
    return _convert(_jsonl(root / "gsm8k" / f"{split}.jsonl"), make)


def _asdiv(root: Path, split: str) -> list[dict]:
    folds = [f"asdiv/nfolds/asdiv-a/fold{k}.txt" for k in range(5)]
    ensure_files(root, ["asdiv/ASDiv.xml", *folds])
    ids = {line.strip() for f in folds for line in (root / f).read_text(encoding="utf-8").splitlines() if line.strip()}
    xml = root / "asdiv" / "ASDiv.xml"
    problems = [p for p in ET.parse(xml).getroot().iter("Problem") if p.get("ID") in ids]
    if not ids or len(problems) != len(ids):
        raise ValueError(f"{xml}: {len(problems)} problems found for {len(ids)} ASDiv-A ids")

    def make(i, p):
        m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(?:\(.*\))?\s*", p.findtext("Answer") or "")
        if not m:
            raise ValueError(f"answer {p.findtext('Answer')!r} is not a number with an optional unit")
        question = _text(p.findtext("Body")) + " " + _text(p.findtext("Question"))
        return {"id": p.get("ID"), "question": question, "answer": format_number(float(m.group(1)))}

    return _convert([(f"{xml}, problem {p.get('ID')}", p) for p in problems], make)


def _singleeq(root: Path, split: str) -> list[dict]:
    ensure_files(root, ["singleeq/questions.json"])
    rows = _json_array(root / "singleeq" / "questions.json")
    return _convert(rows, lambda i, r: {"id": f"singleeq-{r['iIndex']}", "question": _text(r["sQuestion"]),
                                        "answer": format_number(float(r["lSolutions"][0]))})


def _csqa(root: Path, split: str) -> list[dict]:
    def make(i, r):
        choices = r["question"]["choices"]
        if [c["label"] for c in choices] != list(LETTERS.upper()) or r["answerKey"] not in LETTERS.upper():
            raise ValueError(f"expected choices A-E and an answerKey among them, got {r['answerKey']!r}")
        texts = [_text(c["text"]) for c in choices]
        listed = " ".join(f"({a}) {t}" for a, t in zip(LETTERS, texts, strict=True))
        k = LETTERS.upper().index(r["answerKey"])
        return {"id": _text(r["id"]), "question": f"{_text(r['question']['stem'])}\nAnswer Choices: {listed}",
                "answer": f"({LETTERS[k]}) {texts[k]}", "choices": texts}

    path = f"commonsenseqa/official/{'train' if split == 'train' else 'dev'}_rand_split.jsonl"
    ensure_files(root, [path])
    return _convert(_jsonl(root / path), make)


_LOADERS = {"svamp": _svamp, "gsm8k": _gsm8k, "asdiv": _asdiv, "singleeq": _singleeq, "csqa": _csqa}


def load_dataset(name: str, split: str, data_dir: str | Path | None) -> list[dict]:
    """Records `{id, question, answer, choices (csqa only)}` of one split, in the source's order."""
    if split not in SPLITS.get(name, ()):
        valid = ", ".join(f"{n}/{s}" for n, splits in SPLITS.items() for s in splits)
        raise ValueError(f"unknown dataset/split {name!r}/{split!r}; valid: {valid}")
    return _LOADERS[name](resolve_data_dir(data_dir), split)


FILE_FORMATS = """one JSON array or JSON Lines, every record in one of these formats:
  {question, answer}                math; answer a number ("42", 42, "1,200")
  {question, answer: "#### 42"}     GSM8K; the number after the last "####"
  {question, choices, answer}       CSQA; choices the option texts, answer "(c) text"
  {sQuestion, lSolutions}           SingleEq, AddSub, MultiArith; the first solution
and an optional "id" (default: <file name>-<index>)"""


def _file_record(stem: str, i: int, r: dict) -> dict:
    if not isinstance(r, dict):
        raise TypeError(f"expected an object, got {type(r).__name__}")
    id_ = str(r.get("id", f"{stem}-{i}"))
    if "sQuestion" in r:
        return {"id": id_, "question": _text(r["sQuestion"]), "answer": format_number(float(r["lSolutions"][0]))}
    question, answer = _text(r["question"]), r["answer"]
    if "choices" in r:
        texts = [_text(c) for c in r["choices"]]
        found = re.fullmatch(r"\(([a-e])\)\s*(.*)", _text(answer))
        if not 2 <= len(texts) <= len(LETTERS) or not found or LETTERS.index(found.group(1)) >= len(texts):
            raise ValueError(f"expected 2-5 choices and an answer '(x) text' naming one, got {answer!r}")
        listed = " ".join(f"({a}) {t}" for a, t in zip(LETTERS, texts, strict=False))  # texts: 2-5 of the 5
        k = LETTERS.index(found.group(1))
        return {"id": id_, "question": f"{question}\nAnswer Choices: {listed}", "answer": f"({LETTERS[k]}) {texts[k]}",
                "choices": texts}
    if isinstance(answer, str) and "####" in answer:
        answer = answer.rpartition("####")[2]
    if isinstance(answer, bool) or not isinstance(answer, (int, float, str)):
        raise ValueError(f"answer {answer!r} is not a number")
    return {"id": id_, "question": question, "answer": format_number(float(str(answer).strip().replace(",", "")))}


def load_file(path: str | Path) -> list[dict]:
    """Records `{id, question, answer, choices?}` of a file of problems (`FILE_FORMATS`); a malformed record is
    a ValueError naming the file and the record."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read it ({e})") from None
    try:
        rows = _json_array(path) if text.lstrip().startswith("[") else _jsonl(path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg})") from None
    if not rows:
        raise ValueError(f"{path}: no records")
    records = _convert(rows, lambda i, r: _file_record(path.stem, i, r))
    if len({task_of(r) for r in records}) > 1:
        raise ValueError(f"{path}: mixes CSQA records (with choices) and math records")
    if len({r["id"] for r in records}) != len(records):
        raise ValueError(f"{path}: two records have the same id")
    return records


def load_palm_rationales(name: str, split: str, data_dir: str | Path | None, keep: str = "all") -> list[dict]:
    """PaLM-540B CoT of DSS for svamp or csqa: `{id, rationale, teacher_answer, phase: 0}` in
    `load_dataset(name, split)` order, for every item whose output has the answer marker and a non-empty
    rationale before it (keep="all", DSS's use) or only those whose PaLM answer equals gold (keep="correct").
    `teacher_answer` is PaLM's answer ("42", "(c) wooded area") or None when it cannot be read."""
    if (name, split) not in _PALM_FILES:
        raise ValueError(f"no PaLM rationales for {name!r}/{split!r}; valid: svamp or csqa, train or test")
    if keep not in ("all", "correct"):
        raise ValueError(f"keep must be 'all' or 'correct', got {keep!r}")
    root = resolve_data_dir(data_dir)
    records = load_dataset(name, split, root)
    folder = ("svamp" if name == "svamp" else "commonsenseqa") + "/distilling_step_by_step"
    files = [f"{folder}/llm/{split}_CoT_{i}.json" for i in range(_PALM_FILES[name, split])]
    order = f"{folder}/cqa_{split}.json"  # csqa: the ids in DSS's order, which PaLM's outputs follow
    ensure_files(root, files + [order] if name == "csqa" else files)
    outputs = [row for path in files for row in _json_array(root / path)]
    ids = [r["id"] for r in records]  # svamp: PaLM follows the file order; csqa: DSS's, not the official one
    if name == "csqa":
        ids = [x["id"] for _, x in _jsonl(root / order)]
    if len(ids) != len(outputs) or set(ids) != {r["id"] for r in records}:
        raise ValueError(f"{root / folder}: {len(outputs)} PaLM outputs do not match the {len(records)} records")
    by_id = dict(zip(ids, outputs, strict=True))
    marker = "The answer is" if name == "svamp" else "So the answer is"
    usable = []  # (row, correct)
    for r in records:
        where, output = by_id[r["id"]]
        if not isinstance(output, str):
            raise ValueError(f"{where}: expected a string")
        reasoning, found, answer = output.split("Q:")[0].rpartition(marker)
        rationale, answer = reasoning.strip(), answer.strip().split("\n")[0].strip()  # the rest of the line
        if not found or not rationale:
            continue
        if name == "svamp":
            try:
                value = safe_eval(answer.removesuffix("."))
            except ValueError:
                value = None
            teacher = None if value is None else format_number(value)
            correct = value is not None and abs(value - float(r["answer"])) < 1e-4
        else:
            letters = re.findall(r"\(([a-e])\)", answer)
            teacher = f"({letters[0]}) {r['choices'][LETTERS.index(letters[0])]}" if len(letters) == 1 else None
            correct = letters == [r["answer"][1]]
        usable.append(({"id": r["id"], "rationale": rationale, "teacher_answer": teacher, "phase": 0}, correct))
    kept = [row for row, correct in usable if keep == "all" or correct]
    print(f"[data] PaLM {name}/{split}: {len(usable)} of {len(records)} items have a rationale before "
          f"{marker!r} (--palm-filter all), {sum(c for _, c in usable)} of them with PaLM's answer equal to gold "
          f"(--palm-filter correct); keeping {len(kept)} ({keep})")
    return kept


# ---------------------------------------------------------------------------------------------
# Data files (SPEC §11): every file the loaders read, from its public source, checked by its SHA-256.

DATA_URL = "https://raw.githubusercontent.com"  # env MOLSAKI_DATA_URL replaces it; a file: BASE/OWNER/REPO/COMMIT/PATH
TIMEOUT = 60  # seconds a download may wait for the server


class Source(NamedTuple):
    dataset: str  # its name in SPLITS
    repo: str  # owner/name on GitHub
    commit: str
    path: str  # in the repository
    member: str | None  # the file inside the zip at `path`, by its path from "datasets/" (a leading folder is ok)
    sha256: str  # of the file (of the member, for a zip)


_DSS = ("google-research/distilling-step-by-step", "ef944263c9ddfd40a9888557f3e7d17513fd1a7e", "datasets.zip")
_GSM8K = ("openai/grade-school-math", "3101c7d5072418e28b9008a6636bde82a006892c")
_ASDIV = ("chaochun/nlu-asdiv-dataset", "883f90a9a65bf00304ba8f37423910fe743abc47")
_ZS_COT = ("kojima-takeshi188/zero_shot_cot", "5ef330fcdeec0cd26aee27943504f91f8ec1c33c")  # copies of SingleEq, CSQA
FILES = {  # path in the data directory (the layout the loaders read) -> its source
    "svamp/distilling_step_by_step/svamp_train.json":
        Source("svamp", *_DSS, "datasets/svamp/svamp_train.json",
               "641fc0f69864e1376fc2e29675affd15fa641f3b40279dcd6a595f3780f4e721"),
    "svamp/distilling_step_by_step/svamp_test.json":
        Source("svamp", *_DSS, "datasets/svamp/svamp_test.json",
               "b73cba2c53b1e9b1c8aa512a8928c12d0524d1acba560f8c526756185044054c"),
    "svamp/distilling_step_by_step/llm/train_CoT_0.json":
        Source("svamp", *_DSS, "datasets/svamp/llm/train_CoT_0.json",
               "9aa813b5653131e53bfe0477fa2cb3f90fb3d1b7a5226433218cb7b85998f094"),
    "svamp/distilling_step_by_step/llm/train_CoT_1.json":
        Source("svamp", *_DSS, "datasets/svamp/llm/train_CoT_1.json",
               "db0131252436d0487ff8642d94abad23636c080258da60097d5c6f15b1e32639"),
    "svamp/distilling_step_by_step/llm/test_CoT_0.json":
        Source("svamp", *_DSS, "datasets/svamp/llm/test_CoT_0.json",
               "fd536719c09b0cc97bfeee5775b212f8e4541ffe012bcd99c893a99e7e46df37"),
    "gsm8k/train.jsonl":
        Source("gsm8k", *_GSM8K, "grade_school_math/data/train.jsonl", None,
               "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"),
    "gsm8k/test.jsonl":
        Source("gsm8k", *_GSM8K, "grade_school_math/data/test.jsonl", None,
               "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"),
    "asdiv/ASDiv.xml":
        Source("asdiv", *_ASDIV, "dataset/ASDiv.xml", None,
               "ef8904068482919ac48c8eeaaf6df344b8a308ba66d048c2d4d87eab82dc4929"),
    "asdiv/nfolds/asdiv-a/fold0.txt":
        Source("asdiv", *_ASDIV, "dataset/nfolds/asdiv-a/fold0.txt", None,
               "1e4e8c670e461e9d59beee13e64e28d7f92e3be8ba6766d3bbeb40818e03e8d6"),
    "asdiv/nfolds/asdiv-a/fold1.txt":
        Source("asdiv", *_ASDIV, "dataset/nfolds/asdiv-a/fold1.txt", None,
               "81bb372c89696d8d0a253d8ac73500208a801c35670112d682c2f2306ef35fd2"),
    "asdiv/nfolds/asdiv-a/fold2.txt":
        Source("asdiv", *_ASDIV, "dataset/nfolds/asdiv-a/fold2.txt", None,
               "56ffc96a9eead77224f782d7c4c84205c21079b3588b08e4a68d2deabf50febc"),
    "asdiv/nfolds/asdiv-a/fold3.txt":
        Source("asdiv", *_ASDIV, "dataset/nfolds/asdiv-a/fold3.txt", None,
               "68733651260332fa6ae89155aa5e15d20a4b11833023712d0a9b2a2d06551e54"),
    "asdiv/nfolds/asdiv-a/fold4.txt":
        Source("asdiv", *_ASDIV, "dataset/nfolds/asdiv-a/fold4.txt", None,
               "103d2091eab4ee825e55353af817af006ddd2fee4948b0ef7fa1df0f6a33723b"),
    "singleeq/questions.json":
        Source("singleeq", *_ZS_COT, "dataset/SingleEq/questions.json", None,
               "051507bd2b489c257057b485774a83d2710c23a4bc0f4a58e1822ae2773ef05e"),
    "commonsenseqa/official/train_rand_split.jsonl":
        Source("csqa", *_ZS_COT, "dataset/CommonsenseQA/train_rand_split.jsonl", None,
               "58ffa3c8472410e24b8c43f423d89c8a003d8284698a6ed7874355dedd09a2fb"),
    "commonsenseqa/official/dev_rand_split.jsonl":
        Source("csqa", *_ZS_COT, "dataset/CommonsenseQA/dev_rand_split.jsonl", None,
               "3210497fdaae614ac085d9eb873dd7f4d49b6f965a93adadc803e1229fd8a02a"),
    "commonsenseqa/distilling_step_by_step/cqa_train.json":
        Source("csqa", *_DSS, "datasets/cqa/cqa_train.json",
               "09601f7b3239eb4c0a3be16c4b897d0c30905e9bc38cf36c77831d98bd37d9fb"),
    "commonsenseqa/distilling_step_by_step/cqa_test.json":
        Source("csqa", *_DSS, "datasets/cqa/cqa_test.json",
               "caf4f47b8afac62a80f0517e1af3eba2af11de0c7c6f3baf3742fb6390d99dfb"),
    "commonsenseqa/distilling_step_by_step/llm/train_CoT_0.json":
        Source("csqa", *_DSS, "datasets/cqa/llm/train_CoT_0.json",
               "632167edcb645336a0ff1194fe87a1821fefdb02515679d178b167619903fff1"),
    "commonsenseqa/distilling_step_by_step/llm/train_CoT_1.json":
        Source("csqa", *_DSS, "datasets/cqa/llm/train_CoT_1.json",
               "8d14f619696c2bf3f0989d3a47ee8120f047af4eddaf23eb64610941cb453796"),
    "commonsenseqa/distilling_step_by_step/llm/train_CoT_2.json":
        Source("csqa", *_DSS, "datasets/cqa/llm/train_CoT_2.json",
               "25e559368c7e69dba359245395463a669f2fcef91a3b7b89613ff41bed0fbd8f"),
    "commonsenseqa/distilling_step_by_step/llm/train_CoT_3.json":
        Source("csqa", *_DSS, "datasets/cqa/llm/train_CoT_3.json",
               "db2a50477c463dd84a4b7ee2dedae323ff8746f20ca0c4a4619c03e04140ddf5"),
    "commonsenseqa/distilling_step_by_step/llm/train_CoT_4.json":
        Source("csqa", *_DSS, "datasets/cqa/llm/train_CoT_4.json",
               "52ccbf961db874a47968599f8411372a39f280f91413df7d90bcbcea291b9836"),
    "commonsenseqa/distilling_step_by_step/llm/train_CoT_5.json":
        Source("csqa", *_DSS, "datasets/cqa/llm/train_CoT_5.json",
               "0d238b1c5c4be3630bf14c15a176985b4a2e7bcf5fa5a93d24e9d89ccde06974"),
    "commonsenseqa/distilling_step_by_step/llm/train_CoT_6.json":
        Source("csqa", *_DSS, "datasets/cqa/llm/train_CoT_6.json",
               "af81b051cefa61be0b513f9e002b9eeab7160c18731732b59138fede91fccee4"),
    "commonsenseqa/distilling_step_by_step/llm/train_CoT_7.json":
        Source("csqa", *_DSS, "datasets/cqa/llm/train_CoT_7.json",
               "0cd6eba4d2449fb295d66e3dd9998ab59f6246820ca07e0fd1cc61dfcc3e6b3d"),
    "commonsenseqa/distilling_step_by_step/llm/train_CoT_8.json":
        Source("csqa", *_DSS, "datasets/cqa/llm/train_CoT_8.json",
               "02c156f92540f7b2469d252c814a2a87dad47616f828db3e7e236edd72f21b61"),
    "commonsenseqa/distilling_step_by_step/llm/train_CoT_9.json":
        Source("csqa", *_DSS, "datasets/cqa/llm/train_CoT_9.json",
               "7448c4cd5a9416ccb1e0c021e2b3bf2e697dc70173ff6f08d5b64b56d5fe8038"),
    "commonsenseqa/distilling_step_by_step/llm/test_CoT_0.json":
        Source("csqa", *_DSS, "datasets/cqa/llm/test_CoT_0.json",
               "02860e4fa44b4c1f08ed29513abf74f433345e534c51418448b40869ed752a01"),
    "commonsenseqa/distilling_step_by_step/llm/test_CoT_1.json":
        Source("csqa", *_DSS, "datasets/cqa/llm/test_CoT_1.json",
               "44f1fc36088d5beed937c204ae43ca09d74fd0ea6a784fa89207b7e88c37fb15"),
}
_NOTICES = {"asdiv": "ASDiv is licensed CC BY-NC 4.0 (chaochun/nlu-asdiv-dataset): for non-commercial use only"}
_OFFLINE = "or point --data-dir or MOLSAKI_DATA at an offline copy of the data"  # the end of each error message


class DataUnavailable(RuntimeError):
    """A data file that is missing and cannot be fetched, or that was fetched with another SHA-256. One line."""


def files_of(name: str) -> list[str]:
    """Paths (relative to the data directory) of the files the loaders of data set `name` read, PaLM included."""
    if name not in SPLITS:
        raise ValueError(f"unknown data set {name!r}; valid: {', '.join(SPLITS)}")
    return [path for path, s in FILES.items() if s.dataset == name]


def ensure_files(root: str | Path, paths: list[str]) -> int:
    """Fetch those of `paths` (keys of FILES) missing from `root`, and with a zip member the other missing files of
    its data set in that zip (one download); returns how many files were downloaded."""
    root = Path(root)
    missing = {p for p in paths if not (root / p).is_file()}
    zips = {(FILES[p].dataset, FILES[p].path) for p in missing if FILES[p].member}
    missing |= {p for p, s in FILES.items() if s.member and (s.dataset, s.path) in zips and not (root / p).is_file()}
    return _download(root, [p for p in FILES if p in missing])


def fetch(names: list[str], root: str | Path) -> int:
    """Every file of the data sets `names` into `root`: a file missing or with another SHA-256 is downloaded, the
    others are kept; returns how many were downloaded."""
    root = Path(root)
    todo = []
    for path in (p for name in names for p in files_of(name)):
        if (root / path).is_file() and sha256(root / path) == FILES[path].sha256:
            continue
        if (root / path).is_file():
            print(f"[data] {path} has another SHA-256: fetching it again")
        todo.append(path)
    return _download(root, todo)


def _download(root: Path, paths: list[str]) -> int:  # one request per source file (a zip's members together)
    groups = {}
    for p in paths:
        groups.setdefault(FILES[p][1:4], []).append(p)  # (repo, commit, path)
    for name in dict.fromkeys(FILES[p].dataset for p in paths):  # each licence notice once
        if name in _NOTICES:
            print(f"[data] {_NOTICES[name]}")
    for (repo, commit, path), group in groups.items():
        url = f"{os.environ.get('MOLSAKI_DATA_URL', DATA_URL).rstrip('/')}/{repo}/{commit}/{path}"
        for p in group:
            print(f"[data] fetching {p} from {url}" + (f" ({FILES[p].member})" if FILES[p].member else ""))
        try:
            if FILES[group[0]].member is None:
                with _verified(root, group[0], url) as out:
                    _get(url, out)
            else:
                _unzip(root, url, group)
        except (OSError, http.client.HTTPException, zipfile.BadZipFile) as e:
            what = group[0] if len(group) == 1 else f"{group[0]} (and {len(group) - 1} more)"
            raise DataUnavailable(f"data file {what} is missing from {root} and cannot be fetched from {url} "
                                  f"({_reason(e)}); fetch it with `{_command(root, group[0])}` once the source is "
                                  f"reachable, {_OFFLINE}") from None
    return len(paths)


def _get(url: str, out) -> None:
    """The body of `url` into the binary file `out`; a body shorter than its Content-Length is an error."""
    with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
        size, n = int(r.headers.get("Content-Length", -1)), 0
        while chunk := r.read(1 << 20):
            n += out.write(chunk)
    if size >= 0 and n != size:
        raise ConnectionError(f"the connection closed after {n} of {size} bytes")


def _unzip(root: Path, url: str, paths: list[str]) -> None:
    """Download the zip at `url` once and take the members of `paths` from it."""
    with tempfile.TemporaryFile(dir=root) as f:  # nameless: nothing is left behind
        _get(url, f)
        with zipfile.ZipFile(f) as z:
            for path in paths:
                entry = _entry(z, FILES[path].member)
                with _verified(root, path, f"{url} ({entry})") as out, z.open(entry) as src:
                    shutil.copyfileobj(src, out)


def _entry(z: zipfile.ZipFile, member: str) -> str:
    """The zip's entry for `member` ("datasets/svamp/..."): its path from "datasets/" may sit below any folder."""
    inside = member.removeprefix("datasets/")
    for entry in z.namelist():
        if entry == inside or entry.endswith("/" + inside):
            return entry
    raise zipfile.BadZipFile(f"the zip has no {member}")


@contextmanager
def _verified(root: Path, path: str, where: str):
    """A binary file to fill: on leaving, it becomes root/path if its SHA-256 is FILES's, else it is removed."""
    dest = root / path
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
        got, want = sha256(tmp), FILES[path].sha256
        if got != want:
            raise DataUnavailable(f"data file {path} fetched from {where} has SHA-256 {got}, expected {want}, so "
                                  f"it was not kept; try `{_command(root, path)}` again, {_OFFLINE}")
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _command(root: Path, path: str) -> str:  # the command that fetches `path` into `root`
    command = f"python data.py fetch {FILES[path].dataset}"
    if root != Path(os.environ.get("MOLSAKI_DATA") or CACHE):
        command += f" --data-dir {root}"
    return command


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _reason(e: Exception) -> str:  # "HTTP 404 Not Found", "[Errno 111] Connection refused", "timed out", ...
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    return str(getattr(e, "reason", None) or e) or type(e).__name__


# ---------------------------------------------------------------------------------------------
# Teacher rationales (SPEC §7): dual-phase few-shot CoT, greedy, kept where the answer equals gold.

MATH_SHOTS = [  # our own few-shot examples: (question, rationale, answer)
    ("Tom has 3 boxes with 12 pencils in each box. He gives away 9 pencils. How many pencils does he have left?",
     "Tom has 3 * 12 = 36 pencils. After giving away 9 he has 36 - 9 = 27 pencils. The answer is 27.", "27"),
    ("A baker made 45 muffins and sold them in bags of 5. Each bag costs $2. How much money did she make?",
     "She filled 45 / 5 = 9 bags. The bags earned 9 * 2 = 18 dollars. The answer is 18.", "18"),
    ("Mia read 14 pages on Monday and twice as many on Tuesday. How many pages did she read in total?",
     "On Tuesday she read 2 * 14 = 28 pages. In total she read 14 + 28 = 42 pages. The answer is 42.", "42"),
    ("A rope is 7.5 meters long. Sam cuts off 2.25 meters. How long is the rope now?",
     "The rope is now 7.5 - 2.25 = 5.25 meters long. The answer is 5.25.", "5.25"),
]
CSQA_SHOTS = [  # (question with choices, rationale, answer, keywords)
    ("Where would you put a plate after washing it?\nAnswer Choices: (a) restaurant (b) cupboard (c) table "
     "(d) dishwasher (e) flea market",
     "A clean plate is stored until it is needed again. Plates are stored in a cupboard. "
     "So the answer is (b) cupboard.", "(b) cupboard", ["clean plate", "stored", "cupboard"]),
    ("What do people feel after running a marathon?\nAnswer Choices: (a) energetic (b) tired (c) bored "
     "(d) hungry for more (e) cold",
     "Running a marathon takes hours of effort. Long effort uses up energy and makes people tired. "
     "So the answer is (b) tired.", "(b) tired", ["marathon", "effort", "energy", "tired"]),
    ("If you want to learn about the past, what can you read?\nAnswer Choices: (a) newspaper (b) menu "
     "(c) history book (d) recipe (e) map",
     "The past is the subject of history. A history book describes what happened in the past. "
     "So the answer is (c) history book.", "(c) history book", ["past", "history", "history book"]),
]


def task_of(record: dict) -> str:
    return "csqa" if record.get("choices") else "math"


def cot_prompt(record: dict, with_gold: bool) -> str:
    """Few-shot prompt; phase 2 (`with_gold`) also shows the gold answer before the rationale."""
    shots = MATH_SHOTS if task_of(record) == "math" else [s[:3] for s in CSQA_SHOTS]
    gold = "Answer: {a}\n" if with_gold else ""
    parts = [f"Question: {q}\n{gold.format(a=a)}Rationale: {r}\n\n" for q, r, a in shots]
    return "".join(parts) + f"Question: {record['question']}\n{gold.format(a=record['answer'])}Rationale:"


ANSWER_STATEMENT = re.compile(r"(?:\bso\s+)?\bthe\s+answer\s+is\b", re.IGNORECASE)


def split_answer(text: str) -> tuple[str, str]:
    """(r, statement): `text` cut before its last answer statement, "The answer is ..." or "So the answer is
    ..." in any case (SPEC §2); both stripped, statement "" when there is none."""
    hits = list(ANSWER_STATEMENT.finditer(text))
    if not hits:
        return text.strip(), ""
    return text[:hits[-1].start()].strip(), text[hits[-1].start():].strip()


def cut_rationale(output: str, record: dict) -> tuple[str, str, object]:
    """(r, statement, answer) of a teacher output: its first block cut before the last answer statement, that
    statement up to the end of its sentence, and the answer it states (None when there is no statement)."""
    text = output.split("\nQuestion:")[0].split("\n\n")[0].strip()
    rationale, statement = split_answer(text)
    if not statement:
        return rationale, "", None
    statement = re.match(r"[^\n]*?(\.(?=\s|$)|$)", statement, re.MULTILINE).group(0)
    if task_of(record) == "csqa":
        return rationale, statement, answers.parse_choice(statement, record["choices"], "cot")
    return rationale, statement, answers.parse_math(statement, "cot")


def _resume(path: Path) -> list[dict]:
    """Rows of a JSONL file written line by line; a last line cut by a hard kill is dropped from the file."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        path.write_text(text, encoding="utf-8")
    return [row for _, row in _jsonl(path)]


def teacher_rationales(model, tokenizer, records: list[dict], path, batch_size: int = 8,
                       max_new_tokens: int = 128, chunk: int = 64) -> list[dict]:
    """Dual-phase CoT (SPEC §7) with every attempt appended to the JSONL `path` as it is made, so that a
    re-run continues where it stopped. An attempt is kept when its answer equals gold and its rationale is
    not empty; phase 2 asks for the items phase 1 kept nothing of. Returns `{id, rationale, teacher_answer,
    phase}` of the kept items, in `records` order."""
    path = Path(path)
    attempts = {}  # id -> {phase: attempt}
    for row in _resume(path):
        if "statement" not in row:
            raise ValueError(f"{path} holds rationales written before they were cut before their answer "
                             "statement (SPEC §2); delete it or choose another --out")
        attempts.setdefault(row["id"], {})[row["phase"]] = row

    def kept(a):
        return a["correct"] and a["rationale"]

    for phase in (1, 2):
        todo = [r for r in records if phase not in attempts.get(r["id"], {})
                and not any(kept(a) for a in attempts.get(r["id"], {}).values())]
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            prompts = [cot_prompt(r, with_gold=phase == 2) for r in part]
            outputs = models.generate(model, tokenizer, prompts, max_new_tokens, batch_size,
                                      desc=f"rationales phase {phase} [{start}/{len(todo)}]")
            with open(path, "a") as f:
                for r, output in zip(part, outputs, strict=True):
                    rationale, statement, answer = cut_rationale(output, r)
                    row = {"id": r["id"], "rationale": rationale, "statement": statement, "phase": phase,
                           "teacher_answer": format_number(answer) if isinstance(answer, float) else answer,
                           "correct": answers.is_correct(answer, r["answer"], task_of(r))}
                    attempts.setdefault(r["id"], {})[phase] = row
                    f.write(json.dumps(row) + "\n")
    chosen = [next(a for a in attempts[r["id"]].values() if kept(a)) for r in records
              if any(kept(a) for a in attempts.get(r["id"], {}).values())]
    empty = sum(any(a["correct"] for a in attempts.get(r["id"], {}).values()) for r in records) - len(chosen)
    print(f"[data] teacher rationales: {len(chosen)} of {len(records)} items kept "
          f"({sum(a['phase'] == 1 for a in chosen)} phase 1, {sum(a['phase'] == 2 for a in chosen)} phase 2); "
          f"{empty} correct but empty before the answer statement, {len(records) - len(chosen) - empty} wrong")
    return [{k: a[k] for k in ("id", "rationale", "teacher_answer", "phase")} for a in chosen]


def teacher_keywords(model, tokenizer, examples: list[dict], path, batch_size: int = 8) -> dict[str, list[str]]:
    """CSQA: the teacher's keywords for each example id (paper App. B.2), kept in the JSONL `path`."""
    path = Path(path)
    done = {row["id"]: row["keywords"] for row in _resume(path)}
    todo = [e for e in examples if e["id"] not in done]
    if todo:
        prompts = [keyword_prompt(e["question"], e["rationale"]) for e in todo]
        outputs = models.generate(model, tokenizer, prompts, 32, batch_size, desc="keywords")
        with open(path, "a") as f:
            for e, output in zip(todo, outputs, strict=True):
                done[e["id"]] = parse_keywords(output)
                f.write(json.dumps({"id": e["id"], "keywords": done[e["id"]]}) + "\n")
    return done


def keyword_prompt(question: str, rationale: str) -> str:
    """CSQA: ask the teacher for the 3-8 keywords crucial to its reasoning (paper App. B.2)."""
    parts = [f"Question: {q}\nRationale: {split_answer(r)[0]}\nKeywords: {', '.join(k)}\n\n"
             for q, r, _, k in CSQA_SHOTS]  # the rationale as the student sees it: without its answer
    return "".join(parts) + f"Question: {question}\nRationale: {rationale}\nKeywords:"


def parse_keywords(output: str) -> list[str]:
    """Unique comma-separated keywords of the first output line, at most 8."""
    words = [w.strip(" .") for w in output.strip().split("\n")[0].split(",")]
    return list(dict.fromkeys(w for w in words if w))[:8]


# ---------------------------------------------------------------------------------------------
# Teacher attention cache: one no-grad pass of the teacher over every training text (SPEC §1, §4).


def texts_hash(examples: list[dict]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e["id"], e["question"], e["rationale"], e.get("keywords")]).encode())
    return h.hexdigest()


def build_attention_cache(model, tokenizer, examples: list[dict], meta: dict, max_length: int = 512,
                          batch_size: int = 8) -> dict:
    """`A_t [L1, S, W]` (float32) with the step and word ids it covers, per example id. Batches are grouped
    by length and right-padded; the teacher runs under no_grad with `logits_to_keep=1`."""
    encoded = []
    for e in examples:
        text, steps, words = spans.example_spans(e["question"], e["rationale"], EXP_PROMPT,
                                                 e.get("keywords"), meta["delimiters"])
        ids, step_tokens, word_tokens = spans.encode(tokenizer, text, steps, words, max_length)
        encoded.append((e["id"], ids, step_tokens, word_tokens))
    encoded.sort(key=lambda x: len(x[1]))
    items = {}
    pad = tokenizer.pad_token_id
    for start in tqdm(range(0, len(encoded), batch_size), desc="teacher attention", unit="batch"):
        batch = encoded[start:start + batch_size]
        N = max(len(ids) for _, ids, _, _ in batch)
        input_ids = torch.tensor([ids + [pad] * (N - len(ids)) for _, ids, _, _ in batch], device=model.device)
        mask = torch.tensor([[1] * len(ids) + [0] * (N - len(ids)) for _, ids, _, _ in batch], device=model.device)
        groups = [([st[k] for k in sorted(st)], [wt[k] for k in sorted(wt)]) for _, _, st, wt in batch]
        with torch.no_grad(), attention.capture(model, groups) as cap:
            model(input_ids, attention_mask=mask, logits_to_keep=1)
        for (id_, _, st, wt), A in zip(batch, cap.stepwise(), strict=True):
            items[id_] = {"A": A.float().cpu(), "step_ids": sorted(st), "word_ids": sorted(wt)}
    return {"meta": meta, "items": items}


def load_attention_cache(path, meta: dict) -> dict:
    """The cache at `path`; a cache built for another run (teacher, prompt, texts, ...) is an error."""
    cache = torch.load(path, weights_only=False)
    diff = sorted(k for k in set(meta) | set(cache["meta"]) if meta.get(k) != cache["meta"].get(k))
    if diff:
        raise ValueError(f"{path} was built for another run (differs in: {', '.join(diff)}); "
                         "delete it or choose another --out")
    return cache


def save_atomic(obj, path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file."""
    tmp = Path(f"{path}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main(argv=None) -> None:
    """`python data.py fetch [NAME ...] [--data-dir DIR]`: download the data sets (all without a NAME)."""
    parser = argparse.ArgumentParser(description="Download the data the loaders read (SPEC §11).")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("fetch", help="download the files of the named data sets (default: all) and check them")
    p.add_argument("names", nargs="*", metavar="NAME", help=f"a data set: {', '.join(SPLITS)}")
    p.add_argument("--data-dir", default=None, help=f"default: $MOLSAKI_DATA, else {CACHE}")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in SPLITS]
    if unknown:
        p.error(f"unknown data set {unknown[0]!r}; choose from {', '.join(SPLITS)}")
    try:
        root = resolve_data_dir(args.data_dir)
        n = fetch(args.names or list(SPLITS), root)
    except (DataUnavailable, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")
    print(f"[data] {n} files downloaded into {root}" if n else f"[data] nothing downloaded: every file is in {root}")


if __name__ == "__main__":
    main()
