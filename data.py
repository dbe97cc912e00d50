"""Data: the benchmark sets the paper trains and tests on, and what one training step reads of them.

The sets (SVAMP, GSM8K, ASDiv-A, SingleEq, CommonsenseQA, PaLM-540B's rationales as Distilling Step-by-Step (DSS)
releases them) are read from the data directory and fetched there on first use (plumbing/fetch.py), each checked
by its SHA-256 on every read. A record is `{id, question, answer, choices (CSQA)}`; a file of one's own problems
is read in any of `FILE_FORMATS`. What the step reads: the token ids and labels of the answer task (Eq. 1 with the
gold answer) and of the rationale task (Eq. 1 with the teacher's rationale), and, under molsaki, the student's
token groups of the steps and critical words (Eq. 2) beside the teacher's cached A_t of each layer.

Choices the paper leaves open (docs/design.md has them all):
- svamp: the DSS 800/200 split; question = DSS's `input` verbatim; gold = its equation, evaluated (train.py's
  `--answer-target equation` trains on the equation itself, DSS's label).
- asdiv: ASDiv-A (the 1218 ids of nfolds/asdiv-a) in ASDiv.xml order, all as split "test" (no official
  split). Question = Body + " " + Question; answer = the number before the unit ("9 (apples)" -> "9").
  All ASDiv-A answers have that form (times, ordinals, yes/no occur in ASDiv-W only); any other raises
  ValueError. Remainder problems keep ASDiv's rounded answer ("200/28=7 r4" -> "8").
- csqa: the official v1.11 files (split "test" = dev), their order and ids. Ids elsewhere: "svamp-train-0",
  "gsm8k-test-0", "singleeq-<iIndex>", ASDiv's "nluds-0001".
- Gold numbers are written by `answers.format_number` ("42", "0.5", "0.666667"): one read from text is kept
  exactly ("12345678901234567890"), a float (an evaluated equation) is taken at its binary value.
- PaLM: the text before the first "Q:", split at the last "The answer is" (svamp) or "So the answer is"
  (csqa); r is the part before it (stripped), kept when the marker is there and r is not empty. PaLM's answer
  is the rest of that line: svamp evaluates the whole expression ("(16 * 17) * 4" -> 1088, where DSS's regex
  reads "(16 * 17)"); csqa's is the letter when the answer names exactly one ("(a) ocean or (b) sea" names
  none). It is correct when it equals gold; L_pre trains on gold whatever PaLM answered. phase = 0.
- Rationales never hold their answer statement (docs/design.md, "Text layout"): the answer is learned by L_pre
  alone.
"""

import re
import xml.etree.ElementTree as ET
from decimal import Decimal
from pathlib import Path

import torch

import spans
from plumbing import answers, fetch, files

PRE_PROMPT = "Question: {question}\nAnswer:"
EXP_PROMPT = "Question: {question}\nRationale:"
SPLITS = {"svamp": ("train", "test"), "gsm8k": ("train", "test"), "asdiv": ("test",),
          "singleeq": ("test",), "csqa": ("train", "test")}
LETTERS = "abcde"
_PALM_FILES = {("svamp", "train"): 2, ("svamp", "test"): 1, ("csqa", "train"): 10, ("csqa", "test"): 2}


QUOTE_CHARS = 80  # what an error message shows of a record's value


def _quote(value) -> str:
    """repr(value) for an error message: its first QUOTE_CHARS characters and the length of the whole when longer."""
    text = repr(value)
    return text if len(text) <= QUOTE_CHARS else f"{text[:QUOTE_CHARS]}... ({len(text)} characters)"


def _number(value) -> str:  # the gold text of a number from text ("1,200") or JSON (a number), exactly
    try:
        number = Decimal(str(value).strip().replace(",", ""))
    except ArithmeticError:
        raise ValueError(f"{_quote(value)} is not a number") from None
    try:
        return answers.format_number(number)
    except ValueError:
        raise ValueError(f"{_quote(value)} is not a finite number within float's range") from None


def _text(value) -> str:  # non-empty text, stripped
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected non-empty text, got {_quote(value)}")
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
                "answer": _number(number)}

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
            raise ValueError(f"answer {_quote(p.findtext('Answer'))} is not a number with an optional unit")
        question = _text(p.findtext("Body")) + " " + _text(p.findtext("Question"))
        return {"id": p.get("ID"), "question": question, "answer": _number(m.group(1))}

    return _convert([(f"{xml}, problem {p.get('ID')}", p) for p in problems], make)


def _singleeq(root: Path, split: str) -> list[dict]:
    fetch.ensure_files(root, ["singleeq/questions.json"])
    rows = files.read_json_array(root / "singleeq" / "questions.json")
    return _convert(rows, lambda i, r: {"id": f"singleeq-{r['iIndex']}", "question": _text(r["sQuestion"]),
                                        "answer": _number(r["lSolutions"][0])})


def _csqa(root: Path, split: str) -> list[dict]:
    def make(i, r):
        choices = r["question"]["choices"]
        if [c["label"] for c in choices] != list(LETTERS.upper()) or r["answerKey"] not in LETTERS.upper():
            raise ValueError(f"expected choices A-E and an answerKey among them, got {_quote(r['answerKey'])}")
        texts = [_text(c["text"]) for c in choices]
        listed = " ".join(f"({a}) {t}" for a, t in zip(LETTERS, texts, strict=True))
        k = LETTERS.upper().index(r["answerKey"])
        return {"id": _text(r["id"]), "question": f"{_text(r['question']['stem'])}\nAnswer Choices: {listed}",
                "answer": f"({LETTERS[k]}) {texts[k]}", "choices": texts}

    path = f"commonsenseqa/official/{'train' if split == 'train' else 'dev'}_rand_split.jsonl"
    fetch.ensure_files(root, [path])
    return _convert(files.read_jsonl(root / path), make)


_LOADERS = {"svamp": _svamp, "gsm8k": _gsm8k, "asdiv": _asdiv, "singleeq": _singleeq, "csqa": _csqa}


def load_dataset(name: str, split: str, data_dir: str | Path | None, equations: bool = False) -> list[dict]:
    """Records `{id, question, answer, choices (csqa only)}` of one split, in the source's order; `equations`
    (svamp only) also keeps DSS's label as "equation", its answer-task target ("( 84.0 / 2.0 )")."""
    if split not in SPLITS.get(name, ()):
        valid = ", ".join(f"{n}/{s}" for n, splits in SPLITS.items() for s in splits)
        raise ValueError(f"unknown dataset/split {name!r}/{split!r}; valid: {valid}")
    if equations and name != "svamp":
        raise ValueError(f"equations exist for svamp only, not {name!r}")
    root = fetch.resolve_data_dir(data_dir)
    return _svamp(root, split, equations) if equations else _LOADERS[name](root, split)


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
        return {"id": id_, "question": _text(r["sQuestion"]), "answer": _number(r["lSolutions"][0])}
    question, answer = _text(r["question"]), r["answer"]
    if "choices" in r:
        texts = [_text(c) for c in r["choices"]]
        found = re.fullmatch(r"\(([a-e])\)\s*(.*)", _text(answer))
        if not 2 <= len(texts) <= len(LETTERS) or not found or LETTERS.index(found.group(1)) >= len(texts):
            raise ValueError(f"expected 2-5 choices and an answer '(x) text' naming one, got {_quote(answer)}")
        listed = " ".join(f"({a}) {t}" for a, t in zip(LETTERS, texts, strict=False))  # texts: 2-5 of the 5
        k = LETTERS.index(found.group(1))
        return {"id": id_, "question": f"{question}\nAnswer Choices: {listed}", "answer": f"({LETTERS[k]}) {texts[k]}",
                "choices": texts}
    if isinstance(answer, str) and "####" in answer:
        answer = answer.rpartition("####")[2]
    if isinstance(answer, bool) or not isinstance(answer, (int, float, str)):
        raise ValueError(f"answer {_quote(answer)} is not a number")
    return {"id": id_, "question": question, "answer": _number(answer)}


def load_file(path: str | Path) -> list[dict]:
    """Records `{id, question, answer, choices?}` of a file of problems (`FILE_FORMATS`); a malformed record is
    a ValueError naming the file and the record, two records with one id a ValueError naming the id and both."""
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
    first = {}  # id -> where its first record is ("line 3", "item 2")
    for (where, _), r in zip(rows, records, strict=True):
        where = where.removeprefix(f"{path}, ")
        if r["id"] in first:
            raise ValueError(f"{path}: two records have the same id {_quote(r['id'])} ({first[r['id']]} and {where})")
        first[r["id"]] = where
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


def task_of(record: dict) -> str:
    """"csqa" for a record with choices, else "math"."""
    return "csqa" if record.get("choices") else "math"


# ---------------------------------------------------------------------------------------------
# What the step reads: token ids and labels of each task, the teacher's A_t where it is cached, padded batches.


def task_ids(tok, prompt: str, target: str, max_length: int) -> tuple[list[int], list[int]]:
    """ids and labels of prompt + target (+ EOS); labels only on target tokens (-100 elsewhere). A text longer than
    `max_length` tokens loses its end: the target's end first, then the prompt's."""
    enc = tok(prompt + target, return_offsets_mapping=True, truncation=True, max_length=max_length - 1)
    ids = enc["input_ids"] + [tok.eos_token_id]
    labels = [t if e > len(prompt) else -100 for t, (_, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]
    return ids, labels + [tok.eos_token_id]


def _target_cut(tok, prompt: str, target: str, labels: list[int], max_length: int) -> tuple[int, int]:
    """(kept, lost): the target tokens `task_ids` kept in `labels` and those its cut at `max_length` dropped."""
    kept = sum(t != -100 for t in labels[:-1])  # the last label is EOS
    if len(labels) < max_length:  # shorter than the cut: nothing dropped
        return kept, 0
    whole = tok(prompt + target, return_offsets_mapping=True, verbose=False)["offset_mapping"]
    return kept, sum(e > len(prompt) for _, e in whole) - kept


# task -> (its prompt, the example's field it trains on after the prompt, what that target is called)
TASKS = {"pre": (PRE_PROMPT, "answer", "answer target"), "exp": (EXP_PROMPT, "rationale", "rationale")}


def _report_cuts(cuts: dict[str, list[tuple[int, int]]], max_length: int) -> None:
    """One printed line counting the examples whose target the cut at `max_length` shortened (`cuts`: per task,
    (kept, lost) of each example's target tokens); ValueError when a task kept no target token of any example."""
    told, gone = [], []
    for task, c in cuts.items():
        shortened, whole = sum(lost > 0 for _, lost in c), sum(kept == 0 for kept, _ in c)
        if shortened:
            told.append(f"the {TASKS[task][2]} of {shortened} of {len(c)} examples, {whole} of them wholly")
        if c and whole == len(c):
            gone.append(TASKS[task][2])
    if told:
        print(f"[data] --max-length {max_length} cuts the end of longer texts: " + "; ".join(told))
    if gone:
        raise ValueError(f"--max-length {max_length} cuts the {' and the '.join(gone)} of all {len(cuts['pre'])} "
                         "examples wholly: their labels would hold the end token alone; raise --max-length")


def features(examples: list[dict], tok, max_length: int, rationale: bool = True, cache: dict | None = None,
             delimiters: str = ".") -> list[dict]:
    """One dict per example: ids and labels of the answer task and, with `rationale`, of the rationale task
    (`task_ids`); with a teacher cache (Eq. 2) also the student's token groups and the teacher's per-layer
    A_t [L1, S, W] over the steps and words both tokenizers keep (`spans.align`), in the groups' order. One line
    counts the targets cut at `max_length`; ValueError when a task has no target token left in any example."""
    out, cuts = [], {task: [] for task in (("pre", "exp") if rationale else ("pre",))}
    for e in examples:
        f = {"id": e["id"]}
        for task in cuts:
            template, field, _ = TASKS[task]
            prompt, target = template.format(question=e["question"]), " " + e[field]
            f[f"{task}_ids"], f[f"{task}_labels"] = task_ids(tok, prompt, target, max_length)
            cuts[task].append(_target_cut(tok, prompt, target, f[f"{task}_labels"], max_length))
        if cache is not None:
            text, steps, words = spans.example_spans(e["question"], e["rationale"], EXP_PROMPT, e.get("keywords"),
                                                     delimiters)
            _, st, wt = spans.encode(tok, text, steps, words, max_length - 1)
            item = cache["items"][e["id"]]
            step_ids = spans.align(st, dict.fromkeys(item["step_ids"]))
            word_ids = spans.align(wt, dict.fromkeys(item["word_ids"]))
            rows = [item["step_ids"].index(k) for k in step_ids]
            cols = [item["word_ids"].index(k) for k in word_ids]
            f["A_t"] = item["A"][:, rows][:, :, cols]  # [L1, S, W]
            f["groups"] = ([st[k] for k in step_ids], [wt[k] for k in word_ids])
        out.append(f)
    _report_cuts(cuts, max_length)
    return out


def collate(batch: list[dict], pad_id: int) -> dict:
    """A batch of `features`: per task right-padded `<task>_ids`, `<task>_labels` (-100 on padding) and
    `<task>_mask`; the example `ids`; and, where the features have them, the lists `groups` and `A_t` (per example,
    not one shape). Positions are not shifted, so the groups index the padded rows."""
    def pad(rows, value):  # [B, N]
        return torch.tensor([r + [value] * (max(map(len, rows)) - len(r)) for r in rows])

    out = {"ids": [f["id"] for f in batch]}
    for task in ("pre", "exp"):
        if f"{task}_ids" in batch[0]:
            ids = [f[f"{task}_ids"] for f in batch]
            out[f"{task}_ids"] = pad(ids, pad_id)
            out[f"{task}_labels"] = pad([f[f"{task}_labels"] for f in batch], -100)
            out[f"{task}_mask"] = pad([[1] * len(r) for r in ids], 0)
    for key in ("groups", "A_t"):
        if key in batch[0]:
            out[key] = [f[key] for f in batch]
    return out
