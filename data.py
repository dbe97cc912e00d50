"""Datasets, teacher rationales, the teacher attention cache (Eq. 2), and the features training reads.

The files the loaders read, their sources and their download are fetch.py's: a loader reads the data directory
`fetch.resolve_data_dir(data_dir)` and calls `fetch.ensure_files` before reading, so data is fetched on first use
(`fetch.DataUnavailable`, one line, when it cannot be).

- `load_dataset(name, split, data_dir)`: records `{id, question, answer, choices?}` (names: `SPLITS`).
- `load_file(path)`: the same records from a JSON / JSONL file of problems, its format detected (`FILE_FORMATS`).
- `load_palm_rationales(name, split, data_dir, keep)`: `{id, rationale, teacher_answer, phase}` from the PaLM-540B
  CoT of Distilling Step-by-Step (DSS), svamp or csqa: every item with a rationale (keep="all", as DSS trains),
  or only those whose PaLM answer equals gold (keep="correct").
- `split_answer(text)`: (r, statement), a teacher's output cut before its final answer statement;
  `cut_rationale(output, record)`: (r, statement, the answer it states) of one teacher output; `task_of(record)`:
  "math" or "csqa"; `cot_prompt(record, with_gold)`, `keyword_prompt(question, rationale)`: the teacher's
  few-shot prompts; `parse_keywords(output)`: its keywords.
- `answers.safe_eval(expr)`: the value of an arithmetic expression (numbers, + - * /, parentheses, unary minus).
  Gold numbers are written by `answers.format_number` ("42", "0.5", "0.666667"): one read from text is kept exactly
  ("12345678901234567890"), a float (an evaluated equation) is taken at its binary value.
- `teacher_rationales(teacher, records, path)`: dual-phase few-shot CoT (paper §3.1), resumable JSONL.
- `teacher_keywords(teacher, examples, path)`: the CSQA critical words (App. B.2), resumable JSONL. `teacher()`
  gives (model, tokenizer); it is called only when something is left to generate.
- `build_attention_cache(model, tok, examples, meta)`: `A_t [L1, S, W]` per example, from one no-grad
  teacher pass through `capture.capture`; `load_attention_cache(path, meta)` refuses a mismatched cache;
  `texts_hash(examples)` is the cache's fingerprint of the texts; `files.save_atomic(obj, path)` writes it whole.
- `files.load_torch(path, fix)`: a torch file of tensors, dicts, lists, numbers and strings (`weights_only`: no code in
  it runs), on the CPU; any failure is a one-line ValueError ending with `fix`.
- `files.read_appended(path)`: the rows of a JSONL file written row by row (the teacher's files, a run's step log); a
  last line cut by a hard kill is dropped from the file.
- What train.py reads, as its flags say: `training_examples(args, teacher)` (the examples with their rationales),
  `teacher_cache(args, examples, teacher)` (built or reused), `features(args, examples, tok, cache, n_layers)`
  (token ids and labels per task, `task_ids`; the student's token groups and the mixed A_t [S, W] under molsaki),
  `collate(batch, pad_id)` (right-padded tensors).

Choices the paper leaves open (docs/design.md has them all):
- svamp: the DSS 800/200 split; question = DSS's `input` verbatim; gold = its equation, evaluated (train.py's
  `--answer-target equation` trains on the equation itself, DSS's label).
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
- Rationales never hold their answer statement (docs/design.md, "Text layout"): the teacher's, PaLM's and the
  built-in ones are cut before the last "the answer is" / "so the answer is" (any case); the answer is learned by
  L_pre alone.
"""

import hashlib
import json
import re
import xml.etree.ElementTree as ET
from decimal import Decimal
from pathlib import Path

import torch
from tqdm import tqdm

import capture
import mol
import spans
from plumbing import answers, fetch, files, models, problems

PRE_PROMPT = "Question: {question}\nAnswer:"
EXP_PROMPT = "Question: {question}\nRationale:"
SPLITS = {"svamp": ("train", "test"), "gsm8k": ("train", "test"), "asdiv": ("test",),
          "singleeq": ("test",), "csqa": ("train", "test")}
LETTERS = "abcde"
_PALM_FILES = {("svamp", "train"): 2, ("svamp", "test"): 1, ("csqa", "train"): 10, ("csqa", "test"): 2}


def _number(value) -> Decimal:  # a gold number from text ("1,200") or JSON (a number), exactly
    try:
        return Decimal(str(value).strip().replace(",", ""))
    except ArithmeticError:
        raise ValueError(f"{value!r} is not a number") from None


def _text(value) -> str:  # non-empty text, stripped
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected non-empty text, got {value!r}")
    return value.strip()


def _convert(rows, make) -> list:  # make(i, row) per row; a bad field -> ValueError naming where
    out = []
    for i, (where, row) in enumerate(rows):
        try:
            out.append(make(i, row))
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: malformed record ({type(e).__name__}: {e})") from None
    return out


def _svamp(root: Path, split: str, equations: bool = False) -> list[dict]:
    # DSS's rows: "input" (the question), "label" (the equation, "( 84.0 / 2.0 )"); gold = its value. With
    # `equations` each record also keeps the label as it stands in the file: "equation", DSS's answer-task target.
    path = f"svamp/distilling_step_by_step/svamp_{split}.json"
    fetch.ensure_files(root, [path])
    rows = files.read_jsonl(root / path)
    return _convert(rows, lambda i, r: {"id": f"svamp-{split}-{i}", "question": _text(r["input"]),
                                        "answer": answers.format_number(answers.safe_eval(r["label"])),
                                        **({"equation": r["label"]} if equations else {})})


def _gsm8k(root: Path, split: str) -> list[dict]:
    def make(i, r):
        _, sep, number = r["answer"].rpartition("####")
        if not sep:
            raise ValueError("no '####' before the final answer")
        return {"id": f"gsm8k-{split}-{i}", "question": _text(r["question"]),
                "answer": answers.format_number(_number(number))}

    fetch.ensure_files(root, [f"gsm8k/{split}.jsonl"])
    return _convert(files.read_jsonl(root / "gsm8k" / f"{split}.jsonl"), make)


def _asdiv(root: Path, split: str) -> list[dict]:
    folds = [f"asdiv/nfolds/asdiv-a/fold{k}.txt" for k in range(5)]
    fetch.ensure_files(root, ["asdiv/ASDiv.xml", *folds])
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
        return {"id": p.get("ID"), "question": question, "answer": answers.format_number(_number(m.group(1)))}

    return _convert([(f"{xml}, problem {p.get('ID')}", p) for p in problems], make)


def _singleeq(root: Path, split: str) -> list[dict]:
    fetch.ensure_files(root, ["singleeq/questions.json"])
    rows = files.read_json_array(root / "singleeq" / "questions.json")
    return _convert(rows, lambda i, r: {"id": f"singleeq-{r['iIndex']}", "question": _text(r["sQuestion"]),
                                        "answer": answers.format_number(_number(r["lSolutions"][0]))})


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
    fetch.ensure_files(root, [path])
    return _convert(files.read_jsonl(root / path), make)


_LOADERS = {"svamp": _svamp, "gsm8k": _gsm8k, "asdiv": _asdiv, "singleeq": _singleeq, "csqa": _csqa}


def load_dataset(name: str, split: str, data_dir: str | Path | None) -> list[dict]:
    """Records `{id, question, answer, choices (csqa only)}` of one split, in the source's order."""
    if split not in SPLITS.get(name, ()):
        valid = ", ".join(f"{n}/{s}" for n, splits in SPLITS.items() for s in splits)
        raise ValueError(f"unknown dataset/split {name!r}/{split!r}; valid: {valid}")
    return _LOADERS[name](fetch.resolve_data_dir(data_dir), split)


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
        answer = answers.format_number(_number(r["lSolutions"][0]))
        return {"id": id_, "question": _text(r["sQuestion"]), "answer": answer}
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
    return {"id": id_, "question": question, "answer": answers.format_number(_number(answer))}


def load_file(path: str | Path) -> list[dict]:
    """Records `{id, question, answer, choices?}` of a file of problems (`FILE_FORMATS`); a malformed record is
    a ValueError naming the file and the record."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read it ({e})") from None
    rows = files.read_json_array(path) if text.lstrip().startswith("[") else files.read_jsonl(path)
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
    root = fetch.resolve_data_dir(data_dir)
    records = load_dataset(name, split, root)
    folder = ("svamp" if name == "svamp" else "commonsenseqa") + "/distilling_step_by_step"
    paths = [f"{folder}/llm/{split}_CoT_{i}.json" for i in range(_PALM_FILES[name, split])]
    order = f"{folder}/cqa_{split}.json"  # csqa: the ids in DSS's order, which PaLM's outputs follow
    fetch.ensure_files(root, paths + [order] if name == "csqa" else paths)
    outputs = [row for path in paths for row in files.read_json_array(root / path)]
    ids = [r["id"] for r in records]  # svamp: PaLM follows the file order; csqa: DSS's, not the official one
    if name == "csqa":
        ids = [x["id"] for _, x in files.read_jsonl(root / order)]
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
                value = answers.safe_eval(answer.removesuffix("."))
            except ValueError:
                value = None
            teacher = None if value is None else answers.format_number(value)
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
# Teacher rationales (paper §3.1): dual-phase few-shot CoT, greedy, kept where the answer equals gold.

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
    ..." in any case; both stripped, statement "" when there is none."""
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


def teacher_rationales(teacher, records: list[dict], path, batch_size: int = 8,
                       max_new_tokens: int = 128, chunk: int = 64) -> list[dict]:
    """Dual-phase CoT (paper §3.1) with every attempt appended to the JSONL `path` as it is made, so that a
    re-run continues where it stopped. An attempt is kept when its answer equals gold and its rationale is
    not empty; phase 2 asks for the items phase 1 kept nothing of. `teacher()` gives (model, tokenizer), called
    once something is left to ask. Returns `{id, rationale, teacher_answer, phase}` of the kept items, in `records`
    order."""
    path = Path(path)
    attempts = {}  # id -> {phase: attempt}
    for row in files.read_appended(path):
        if "statement" not in row:
            raise ValueError(f"{path} holds rationales written before they were cut before their answer "
                             "statement; delete it or choose another --out")
        attempts.setdefault(row["id"], {})[row["phase"]] = row

    def kept(a):
        return a["correct"] and a["rationale"]

    for phase in (1, 2):
        todo = [r for r in records if phase not in attempts.get(r["id"], {})
                and not any(kept(a) for a in attempts.get(r["id"], {}).values())]
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            prompts = [cot_prompt(r, with_gold=phase == 2) for r in part]
            outputs = models.generate(*teacher(), prompts, max_new_tokens, batch_size,
                                      desc=f"rationales phase {phase} [{start}/{len(todo)}]")
            with open(path, "a") as f:
                for r, output in zip(part, outputs, strict=True):
                    rationale, statement, answer = cut_rationale(output, r)
                    row = {"id": r["id"], "rationale": rationale, "statement": statement, "phase": phase,
                           "teacher_answer": (answers.format_number(answer) if isinstance(answer, int | float)
                                              else answer),
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


def teacher_keywords(teacher, examples: list[dict], path, batch_size: int = 8) -> dict[str, list[str]]:
    """CSQA: the teacher's keywords for each example id (paper App. B.2), kept in the JSONL `path`; `teacher()` gives
    (model, tokenizer), called only when an example has none yet."""
    path = Path(path)
    done = {row["id"]: row["keywords"] for row in files.read_appended(path)}
    todo = [e for e in examples if e["id"] not in done]
    if todo:
        prompts = [keyword_prompt(e["question"], e["rationale"]) for e in todo]
        outputs = models.generate(*teacher(), prompts, 32, batch_size, desc="keywords")
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
# Teacher attention cache: one no-grad pass of the teacher over every training text (Eq. 2).


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
        with torch.no_grad(), capture.capture(model, groups) as cap:
            model(input_ids, attention_mask=mask, logits_to_keep=1)
        for (id_, _, st, wt), A in zip(batch, cap.stepwise(), strict=True):
            items[id_] = {"A": A.float().cpu(), "step_ids": sorted(st), "word_ids": sorted(wt)}
    return {"meta": meta, "items": items}


def load_attention_cache(path, meta: dict) -> dict:
    """The cache at `path`; a cache built for another run (teacher, prompt, texts, ...) or unreadable is an error."""
    cache = files.load_torch(path, "delete it (it is built again) or choose another --out")
    diff = sorted(k for k in set(meta) | set(cache["meta"]) if meta.get(k) != cache["meta"].get(k))
    if diff:
        raise ValueError(f"{path} was built for another run (differs in: {', '.join(diff)}); "
                         "delete it or choose another --out")
    return cache


# ---------------------------------------------------------------------------------------------
# What training reads: the examples with their rationales, the teacher cache, and the features of each example.


def training_examples(args, teacher) -> list[dict]:
    """Train records joined with their rationales (and CSQA keywords): `{id, question, answer, rationale}`, as
    train.py's flags say (`--data`, `--rationales`, `--method`, `--answer-target`). Every rationale ends before its
    answer statement; the answer target of L_pre is always gold: the number, or under `--answer-target equation`
    (--data svamp) SVAMP's equation as DSS trains it, its label verbatim ("( 84.0 / 2.0 )", also kept as
    "equation"), put in `answer` once the rationales are chosen (the teacher's are checked against the number).
    `teacher()` gives (model, tokenizer), called only when the teacher must generate; what it generates is appended
    to --out's rationales.jsonl / keywords.jsonl and reused."""

    def with_target(examples):  # L_pre's target: the gold number as read, or DSS's equation
        return [dict(e, answer=e["equation"]) for e in examples] if args.answer_target == "equation" else examples

    if args.answer_target == "equation" and args.data != "svamp":
        raise ValueError(f"--answer-target equation: equations exist for --data svamp only, not {args.data!r}")
    if args.data == "builtin":
        records = problems.make_problems(args.n_train, seed=0)
    elif args.answer_target == "equation":
        records = _svamp(fetch.resolve_data_dir(args.data_dir), "train", equations=True)
    elif args.data in SPLITS:
        records = load_dataset(args.data, "train", args.data_dir)
    else:
        records = load_file(args.data)
    if args.method == "vanilla":
        return with_target([dict(r, rationale="") for r in records])
    if args.rationales == "builtin":
        kept = [{"id": r["id"], "rationale": split_answer(r["rationale"])[0]} for r in records]
    elif args.rationales == "palm":
        kept = load_palm_rationales(args.data, "train", args.data_dir, args.palm_filter)
    else:
        kept = teacher_rationales(teacher, records, args.out / "rationales.jsonl", args.teacher_batch_size)
    by_id = {r["id"]: r for r in records}
    examples = [dict(by_id[k["id"]], rationale=k["rationale"]) for k in kept if k["rationale"]]
    print(f"[train] {len(examples)} of {len(records)} items have a rationale ({args.rationales}); "
          f"{len(records) - len(examples)} not kept")
    if examples and task_of(records[0]) == "csqa" and args.method == "molsaki":  # critical words: its keywords
        keywords = teacher_keywords(teacher, examples, args.out / "keywords.jsonl", args.teacher_batch_size)
        examples = [dict(e, keywords=keywords[e["id"]]) for e in examples]
    return with_target(examples)


def teacher_cache(args, examples: list[dict], teacher) -> dict:
    """--out/teacher_cache.pt: reused when its metadata are this run's (`load_attention_cache`), else built by the
    teacher (`teacher()` gives (model, tokenizer)) and saved."""
    meta = {"teacher": args.teacher, "exp_prompt": EXP_PROMPT, "delimiters": args.delimiters,
            "critical": "keywords" if task_of(examples[0]) == "csqa" else "numbers", "max_length": args.max_length,
            "steps": "tiled", "texts": texts_hash(examples)}  # steps: spans.token_groups' rule (Eq. 2 tiling)
    path = args.out / "teacher_cache.pt"
    if path.exists():
        print(f"[train] reusing teacher attention cache {path}")
        return load_attention_cache(path, meta)
    cache = build_attention_cache(*teacher(), examples, meta, args.max_length, args.teacher_batch_size)
    files.save_atomic(cache, path)
    return cache


def task_ids(tok, prompt: str, target: str, max_length: int) -> tuple[list[int], list[int]]:
    """ids and labels of prompt + target (+ EOS); labels only on target tokens (-100 elsewhere)."""
    enc = tok(prompt + target, return_offsets_mapping=True, truncation=True, max_length=max_length - 1)
    ids = enc["input_ids"] + [tok.eos_token_id]
    labels = [t if e > len(prompt) else -100 for t, (_, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]
    return ids, labels + [tok.eos_token_id]


def features(args, examples: list[dict], tok, cache: dict | None, n_student_layers: int) -> list[dict]:
    """One dict per example: the two tasks' ids and labels (`task_ids`); under molsaki also the student's step and
    word groups and the teacher's target, mixed by p_t (Eq. 4/6): A_t [S, W] over the steps and words both
    tokenizers keep (`spans.align`)."""
    out = []
    for e in examples:
        f = {"id": e["id"]}
        f["pre_ids"], f["pre_labels"] = task_ids(tok, PRE_PROMPT.format(question=e["question"]), " " + e["answer"],
                                                 args.max_length)
        if args.method != "vanilla":
            f["exp_ids"], f["exp_labels"] = task_ids(tok, EXP_PROMPT.format(question=e["question"]),
                                                     " " + e["rationale"], args.max_length)
        if args.method == "molsaki":
            text, steps, words = spans.example_spans(e["question"], e["rationale"], EXP_PROMPT, e.get("keywords"),
                                                     args.delimiters)
            _, st, wt = spans.encode(tok, text, steps, words, args.max_length - 1)
            item = cache["items"][e["id"]]
            step_ids = spans.align(st, dict.fromkeys(item["step_ids"]))
            word_ids = spans.align(wt, dict.fromkeys(item["word_ids"]))
            rows = [item["step_ids"].index(k) for k in step_ids]
            cols = [item["word_ids"].index(k) for k in word_ids]
            A_t = item["A"][:, rows][:, :, cols]  # [L1, S, W], the steps and words both models keep
            p_t = (mol.one_hot_weights(mol.parse_layer_map(args.layer_map, A_t.shape[0], n_student_layers)[0],
                                       A_t.shape[0]) if args.layer_map else mol.teacher_layer_weights(A_t, args.tau1))
            f.update(A_t=mol.mix_layers(A_t, p_t), p_t=p_t,  # [S, W], [L1]
                     groups=([st[k] for k in step_ids], [wt[k] for k in word_ids]))
        out.append(f)
    return out


def _pad(rows, value):
    N = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (N - len(r)) for r in rows])  # [B, N]


def collate(batch: list[dict], pad_id: int) -> dict:
    """Right-padded tensors of each task: `<task>_ids`, `<task>_labels` (-100 on padding), `<task>_mask`, with the
    example ids (positions are not shifted, so the groups stay valid)."""
    out = {"ids": [f["id"] for f in batch]}
    for task in ("pre", "exp"):
        if f"{task}_ids" in batch[0]:
            ids = [f[f"{task}_ids"] for f in batch]
            out[f"{task}_ids"] = _pad(ids, pad_id)
            out[f"{task}_labels"] = _pad([f[f"{task}_labels"] for f in batch], -100)
            out[f"{task}_mask"] = _pad([[1] * len(r) for r in ids], 0)
    return out
