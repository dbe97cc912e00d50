"""The teacher's side (paper §3.1, Eq. 2): the rationales it writes, the critical words it names, and its stepwise
attention A_t, computed once before training and cached.

The rationales come from the built-in problems, from PaLM-540B's outputs as DSS released them (data.py reads
them), or from the teacher LM itself by dual-phase few-shot CoT: phase 1 asks for a rationale, phase 2 shows the
gold answer first, and an attempt is kept when the answer it states is gold. Every rationale is cut before its
answer statement, so the answer is learned by L_pre alone. Under molsaki the teacher then reads each training text
once, without gradients, and the capture keeps A_t [L1, S, W] of every layer (Eq. 2): the cache the step mixes by
Eq. 4. What the teacher generates is appended to the run directory as it comes, so a stopped teacher stage
continues where it stopped, and a cache is reused only for the same teacher, prompt, delimiters, length and texts.
"""

import hashlib
import json
import re
from pathlib import Path

import torch
from tqdm import tqdm

import capture
import data
import spans
from plumbing import answers, files, models, problems

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


def cot_prompt(record: dict, with_gold: bool) -> str:
    """Few-shot prompt; phase 2 (`with_gold`) also shows the gold answer before the rationale."""
    shots = MATH_SHOTS if data.task_of(record) == "math" else [s[:3] for s in CSQA_SHOTS]
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
    if data.task_of(record) == "csqa":
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
            raise ValueError(f"{path} holds rationales without the answer statement they were cut at, so they may "
                             "still hold their answer; delete it or choose another --out")
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
                           "correct": answers.is_correct(answer, r["answer"], data.task_of(r))}
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
        text, steps, words = spans.example_spans(e["question"], e["rationale"], data.EXP_PROMPT,
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
# What train.py asks of the teacher side: the examples it trains on, and their attention cache.


def training_examples(data_name: str, rationales: str | None, teacher, out, *, data_dir=None, n_train: int = 200,
                      palm_filter: str = "all", answer_target: str = "number", keywords: bool = False,
                      batch_size: int = 8) -> list[dict]:
    """The training records `{id, question, answer}` of `data_name` (builtin, a data set, or a file of problems)
    joined with their rationales from `rationales` (builtin, palm, teacher; None: no rationale, as vanilla trains)
    and, for CSQA with `keywords`, the teacher's critical words. Every rationale ends before its answer statement.
    L_pre's target is gold: the number, or with `answer_target` "equation" (svamp) DSS's label verbatim, put in
    `answer` once the rationales are chosen (the teacher's are checked against the number). `teacher()` gives
    (model, tokenizer), called only when the teacher must generate into `out`'s rationales.jsonl / keywords.jsonl."""
    equations = answer_target == "equation"
    if equations and data_name != "svamp":
        raise ValueError(f"--answer-target equation: equations exist for --data svamp only, not {data_name!r}")
    if data_name == "builtin":
        records = problems.make_problems(n_train, seed=0)
    elif data_name in data.SPLITS:
        records = data.load_dataset(data_name, "train", data_dir, equations=equations)
    else:
        records = data.load_file(data_name)
    if rationales is None:
        examples = [dict(r, rationale="") for r in records]
    else:
        if rationales == "builtin":
            kept = [{"id": r["id"], "rationale": split_answer(r["rationale"])[0]} for r in records]
        elif rationales == "palm":
            kept = data.load_palm_rationales(data_name, "train", data_dir, palm_filter)
        else:
            kept = teacher_rationales(teacher, records, Path(out) / "rationales.jsonl", batch_size)
        by_id = {r["id"]: r for r in records}
        examples = [dict(by_id[k["id"]], rationale=k["rationale"]) for k in kept if k["rationale"]]
        print(f"[train] {len(examples)} of {len(records)} items have a rationale ({rationales}); "
              f"{len(records) - len(examples)} not kept")
        if examples and keywords and data.task_of(records[0]) == "csqa":  # CSQA's critical words
            words = teacher_keywords(teacher, examples, Path(out) / "keywords.jsonl", batch_size)
            examples = [dict(e, keywords=words[e["id"]]) for e in examples]
    return [dict(e, answer=e["equation"]) for e in examples] if equations else examples


def cache_meta(teacher_name: str, examples: list[dict], delimiters: str = ".", max_length: int = 512) -> dict:
    """What a teacher cache is built from; a cache is reused only when all of it is the same."""
    return {"teacher": teacher_name, "exp_prompt": data.EXP_PROMPT, "delimiters": delimiters,
            "critical": "keywords" if data.task_of(examples[0]) == "csqa" else "numbers", "max_length": max_length,
            "steps": "tiled", "texts": texts_hash(examples)}  # steps: spans.token_groups' rule (Eq. 2 tiling)


def attention_cache(path, meta: dict, examples: list[dict], teacher, batch_size: int = 8) -> dict:
    """The cache at `path` when it was built from `meta` (`load_attention_cache`), else built by the teacher
    (`teacher()` gives (model, tokenizer)) and saved there."""
    path = Path(path)
    if path.exists():
        print(f"[train] reusing teacher attention cache {path}")
        return load_attention_cache(path, meta)
    cache = build_attention_cache(*teacher(), examples, meta, meta["max_length"], batch_size)
    files.save_atomic(cache, path)
    return cache
