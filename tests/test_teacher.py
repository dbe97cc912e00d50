"""Tests for the teacher side (docs/design.md, "Teacher rationales" and "Stages"): few-shot prompts, cutting teacher
outputs, dual-phase rationales with resume, CSQA keywords, and the teacher attention cache checked against eager
attention on each example alone (`attention.stepwise_attention`, the definition of Eq. 2), directly and through
train.py (train.training_examples, train.attention_cache, train.teacher_stage). The slow test runs gemma3-270m as the
teacher on 20 SVAMP items."""

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch

import attention
import capture
import data
import spans
import teacher
import train
from data import EXP_PROMPT
from plumbing import answers, files, flags, models, problems
from plumbing.files import save_atomic
from teacher import (
    CSQA_SHOTS,
    MATH_SHOTS,
    build_attention_cache,
    cot_prompt,
    cut_rationale,
    keyword_prompt,
    load_attention_cache,
    parse_keywords,
    split_answer,
    teacher_rationales,
    texts_hash,
)

DATA = Path(os.environ.get("MOLSAKI_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
MEAL = {"id": "m", "question": "Ann has 3 bags with 4 pens each. How many pens?", "answer": "12"}
TIRED = {"id": "c", "question": "How do you feel after a long day?\nAnswer Choices: (a) awake (b) tired (c) bored "
         "(d) hungry (e) cold", "answer": "(b) tired", "choices": ["awake", "tired", "bored", "hungry", "cold"]}


# ---------------------------------------------------------------------------------------------
# Prompts and cutting.


@pytest.mark.parametrize("phase", [1, 2])
def test_cot_prompt_math_layout(phase):
    prompt = cot_prompt(MEAL, with_gold=phase == 2)
    blocks = prompt.split("\n\n")
    assert len(blocks) == len(MATH_SHOTS) + 1
    for block, (q, r, a) in zip(blocks, MATH_SHOTS, strict=False):
        gold = f"Answer: {a}\n" if phase == 2 else ""
        assert block == f"Question: {q}\n{gold}Rationale: {r}"
    if phase == 1:  # the last block is exactly the student's rationale prompt: the teacher continues a rationale
        assert blocks[-1] == EXP_PROMPT.format(question=MEAL["question"])
        assert "Answer:" not in prompt
    else:
        assert blocks[-1] == "Question: Ann has 3 bags with 4 pens each. How many pens?\nAnswer: 12\nRationale:"


def test_cot_prompt_csqa_uses_csqa_shots():
    for phase2 in (False, True):
        prompt = cot_prompt(TIRED, with_gold=phase2)
        assert all(r in prompt for _, r, _, _ in CSQA_SHOTS)
        assert not any(r in prompt for _, r, _ in MATH_SHOTS)
        assert "Keywords" not in prompt  # keywords are a separate prompt
        assert prompt.endswith(TIRED["question"] + ("\nAnswer: (b) tired" if phase2 else "") + "\nRationale:")


def test_shots_are_right():
    """Our few-shot examples must themselves be correct: each math equation holds, the stated answer is read
    back, CSQA answers name the right choice and every keyword occurs in its rationale."""
    for q, r, a in MATH_SHOTS:
        for lhs, rhs in re.findall(r"([\d.]+ [-+*/] [\d.]+) = ([\d.]+)", r):
            assert answers.safe_eval(lhs) == pytest.approx(float(rhs))
        assert cut_rationale(r, {"question": q, "answer": a}) == (*split_answer(r), float(a))
    for q, r, a, keywords in CSQA_SHOTS:
        choices = re.findall(r"\([a-e]\) ([^(]+?)(?= \(|$)", q.split("Answer Choices: ")[1])
        assert len(choices) == 5 and f"({a[1]}) {choices['abcde'.index(a[1])]}" == a
        assert cut_rationale(r, {"question": q, "answer": a, "choices": choices}) == (*split_answer(r), a[1])
        assert 3 <= len(keywords) <= 8
        for k in keywords:  # in the rationale the student sees, without its answer statement
            assert spans.keyword_spans(split_answer(r)[0], [k]), k


@pytest.mark.parametrize("output, record, expected", [
    # run-on continuation: the teacher goes on with the next few-shot question
    # (r, the answer statement, its answer): r ends before the statement (docs/design.md, "Text layout")
    (" Ann has 3 * 4 = 12 pens. The answer is 12.\n\nQuestion: Bob has 2 cats. Rationale: The answer is 2.",
     MEAL, ("Ann has 3 * 4 = 12 pens.", "The answer is 12.", 12.0)),
    (" 3 * 4 = 12. The answer is 12.\nQuestion: next", MEAL, ("3 * 4 = 12.", "The answer is 12.", 12.0)),
    # text after the answer sentence on the same line is cut; decimals and money keep their points and commas
    (" The rope is 7.5 - 2.25 = 5.25 m. The answer is 5.25. Next, we", MEAL,
     ("The rope is 7.5 - 2.25 = 5.25 m.", "The answer is 5.25.", 5.25)),
    (" 12 * 100 = 1,200 dollars. The answer is $1,200.", MEAL,
     ("12 * 100 = 1,200 dollars.", "The answer is $1,200.", 1200.0)),
    # the last statement counts; an answer line without a final period, followed by another line
    (" The answer is 3 * 4. 3 * 4 = 12. the answer is 12\nAnswer: 12", MEAL,
     ("The answer is 3 * 4. 3 * 4 = 12.", "the answer is 12", 12.0)),
    (" The answer is 12", MEAL, ("", "The answer is 12", 12.0)),  # right, but nothing before it: not kept
    # no "answer is": no answer, even though the text has numbers
    (" Ann has 3 bags and 4 pens in each, 12 in all.\n\nQuestion: x", MEAL,
     ("Ann has 3 bags and 4 pens in each, 12 in all.", "", None)),
    # CSQA: the letter, or the choice text when the letter is missing; "So" belongs to the statement
    (" A long day uses up energy. So the answer is (b) tired.\n\nQuestion: Where", TIRED,
     ("A long day uses up energy.", "So the answer is (b) tired.", "b")),
    (" It was dull. So the answer is bored. Yes.", TIRED, ("It was dull.", "So the answer is bored.", "c")),
    (" People rest.", TIRED, ("People rest.", "", None)),
])
def test_cut_rationale(output, record, expected):
    assert cut_rationale(output, record) == expected


def test_keyword_prompt_and_parse():
    prompt = keyword_prompt("Q?", "R.")
    blocks = prompt.split("\n\n")
    assert len(blocks) == len(CSQA_SHOTS) + 1 and blocks[-1] == "Question: Q?\nRationale: R.\nKeywords:"
    assert blocks[0].endswith("\nKeywords: clean plate, stored, cupboard")
    for _, _, _, keywords in CSQA_SHOTS:  # what a shot shows is what we parse back
        assert parse_keywords(" " + ", ".join(keywords) + "\n\nQuestion: x, y") == keywords
    assert parse_keywords(" marathon , effort., energy,, tired.\nQuestion: a, b") == ["marathon", "effort", "energy",
                                                                                   "tired"]
    assert parse_keywords("a, b, a, c") == ["a", "b", "c"]
    assert parse_keywords(", ".join(f"w{i}" for i in range(12))) == [f"w{i}" for i in range(8)]
    assert parse_keywords("") == [] and parse_keywords(" ,\nx") == []


# ---------------------------------------------------------------------------------------------
# Dual-phase rationales: a fake teacher with known right and wrong outputs, then the tiny random teacher.


def NO_TEACHER():  # the stand-in where models.generate is faked: the model and tokenizer are never used
    return None, None


def _asked(prompt):
    """(question, phase) of a cot_prompt, read back from its last block."""
    last = prompt.split("\n\n")[-1]
    return last.split("\n")[0].removeprefix("Question: "), 2 if "\nAnswer: " in last else 1


class FakeTeacher:
    """Stands in for models.generate: right in phase 1 for `right1`, in phase 2 for `right2` (record indices).
    Records every call; raises on call number `fail_on` (1-based) to simulate a crash."""

    def __init__(self, records, right1, right2, fail_on=None):
        self.index = {r["question"]: i for i, r in enumerate(records)}
        self.records, self.right = records, {1: right1, 2: right2}
        self.fail_on, self.calls = fail_on, []

    def __call__(self, model, tokenizer, prompts, max_new_tokens, batch_size=16, desc=""):
        self.calls.append({"asked": [_asked(p) for p in prompts], "max_new_tokens": max_new_tokens,
                           "batch_size": batch_size})
        if len(self.calls) == self.fail_on:
            raise RuntimeError("teacher crashed")
        out = []
        for question, phase in self.calls[-1]["asked"]:
            i = self.index[question]
            r = self.records[i]
            if i in self.right[phase]:
                out.append(f" {r['rationale']}\n\nQuestion: Someone has 5 hats. Rationale: The answer is 5.")
            elif phase == 1:
                out.append(f" I guess. The answer is {float(r['answer']) + 1:g}.\n\nQuestion: x")
            else:
                out.append(" I am not sure about this one")
        return out

    def asked(self, phase):
        return [self.index[q] for c in self.calls for q, p in c["asked"] if p == phase]


@pytest.fixture
def six():
    return problems.make_problems(6, seed=3)


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _expected_kept(records, right1, right2):
    return [{"id": r["id"], "rationale": split_answer(r["rationale"])[0], "teacher_answer": r["answer"],
             "phase": 1 if i in right1 else 2} for i, r in enumerate(records) if i in right1 | right2]


def test_phase2_only_for_failures_and_only_correct_kept(six, tmp_path, monkeypatch):
    fake = FakeTeacher(six, right1={0, 2, 4}, right2={1, 3})
    monkeypatch.setattr(models, "generate", fake)
    path = tmp_path / "r.jsonl"
    kept = teacher_rationales(NO_TEACHER, six, path, batch_size=5, max_new_tokens=33)
    assert fake.asked(1) == [0, 1, 2, 3, 4, 5] and fake.asked(2) == [1, 3, 5]
    assert all(c["max_new_tokens"] == 33 and c["batch_size"] == 5 for c in fake.calls)
    assert kept == _expected_kept(six, {0, 2, 4}, {1, 3})
    rows = _rows(path)  # every attempt, right or wrong
    assert [(r["id"], r["phase"], r["correct"]) for r in rows] == (
        [(six[i]["id"], 1, i % 2 == 0) for i in range(6)] + [(six[i]["id"], 2, i != 5) for i in (1, 3, 5)])
    assert float(rows[1]["teacher_answer"]) == float(six[1]["answer"]) + 1
    assert rows[-1]["teacher_answer"] is None and rows[-1]["rationale"] == "I am not sure about this one"
    # a re-run reads the file and asks nothing: the teacher is not even loaded
    again = FakeTeacher(six, set(), set())
    monkeypatch.setattr(models, "generate", again)

    def not_loaded():
        raise AssertionError("the teacher loaded though every item was answered")

    assert teacher_rationales(not_loaded, six, path) == kept and again.calls == []


def test_correct_but_empty_rationale_goes_to_phase2(six, tmp_path, monkeypatch, capsys):
    """An attempt right in its answer but with nothing before the answer statement is not kept (docs/design.md,
    "Teacher rationales"): phase 2 asks again, and an item empty in both phases is counted as not kept."""
    def generate(model, tokenizer, prompts, max_new_tokens, batch_size=16, desc=""):
        out = []
        for question, phase in (_asked(p) for p in prompts):
            r = next(r for r in six if r["question"] == question)
            if phase == 2 and r is six[0]:
                out.append(f" {r['rationale']}")
            else:
                out.append(f" The answer is {r['answer']}.")  # right, nothing before it
        return out

    monkeypatch.setattr(models, "generate", generate)
    kept = teacher_rationales(NO_TEACHER, six, tmp_path / "r.jsonl")
    assert kept == _expected_kept(six, set(), {0})
    assert [(r["phase"], r["correct"], r["rationale"]) for r in _rows(tmp_path / "r.jsonl")][:2] == [(1, True, "")] * 2
    assert "1 of 6 items kept (0 phase 1, 1 phase 2); 5 correct but empty" in capsys.readouterr().out


def test_rationale_file_without_the_cut_statement_is_refused(six, tmp_path):
    """A rationales.jsonl whose rows kept the answer statement inside the rationale (no "statement" field) is
    an error, never mixed with rationales cut before it."""
    path = tmp_path / "r.jsonl"
    old = {"id": six[0]["id"], "rationale": six[0]["rationale"], "phase": 1, "teacher_answer": six[0]["answer"],
           "correct": True}
    path.write_text(json.dumps(old) + "\n")
    with pytest.raises(ValueError, match="without the answer statement they were cut at"):
        teacher_rationales(NO_TEACHER, six, path)


def test_crash_resume_asks_only_for_the_rest(six, tmp_path, monkeypatch):
    path = tmp_path / "r.jsonl"
    crashing = FakeTeacher(six, right1={0, 2, 4}, right2={1, 3}, fail_on=2)
    monkeypatch.setattr(models, "generate", crashing)
    with pytest.raises(RuntimeError, match="teacher crashed"):
        teacher_rationales(NO_TEACHER, six, path, chunk=2)
    assert [(r["id"], r["phase"]) for r in _rows(path)] == [(six[0]["id"], 1), (six[1]["id"], 1)]
    resumed = FakeTeacher(six, right1={0, 2, 4}, right2={1, 3})
    monkeypatch.setattr(models, "generate", resumed)
    kept = teacher_rationales(NO_TEACHER, six, path, chunk=2)
    assert [c["asked"] for c in resumed.calls] == [  # the rest of phase 1 in chunks of 2, then phase 2
        [(six[i]["question"], 1) for i in (2, 3)], [(six[i]["question"], 1) for i in (4, 5)],
        [(six[i]["question"], 2) for i in (1, 3)], [(six[5]["question"], 2)]]
    assert kept == _expected_kept(six, {0, 2, 4}, {1, 3})
    assert len(_rows(path)) == 9  # no attempt twice


@pytest.fixture(scope="module")
def sdpa_teacher(tiny_teacher_dir):
    return models.load_model(tiny_teacher_dir)


def test_tiny_teacher_runs_both_phases_and_resumes(sdpa_teacher, six, tmp_path, monkeypatch):
    model, tok = sdpa_teacher
    real, asked = models.generate, []

    def spy(model, tokenizer, prompts, *args, **kwargs):
        asked.extend(_asked(p) for p in prompts)
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(models, "generate", spy)
    path = tmp_path / "r.jsonl"
    kept = teacher_rationales(lambda: (model, tok), six, path, batch_size=4, max_new_tokens=6)
    rows = _rows(path)
    phase1 = {r["id"]: r for r in rows if r["phase"] == 1}
    failed = [r["question"] for r in six if not phase1[r["id"]]["correct"]]
    assert asked == [(r["question"], 1) for r in six] + [(q, 2) for q in failed]
    assert len(rows) == len(six) + len(failed)
    assert {r["id"] for r in rows if r["phase"] == 2} == {r["id"] for r in six if r["question"] in failed}
    assert [k["id"] for k in kept] == [r["id"] for r in six if any(x["correct"] for x in rows if x["id"] == r["id"])]
    asked.clear()
    assert teacher_rationales(lambda: (model, tok), six, path, batch_size=4, max_new_tokens=6) == kept
    assert asked == []


# ---------------------------------------------------------------------------------------------
# The teacher attention cache against eager attention, one example at a time.


@pytest.fixture(scope="module")
def capture_teacher(tiny_teacher_dir):
    return models.load_model(tiny_teacher_dir, attn_implementation=capture.register())


@pytest.fixture(scope="module")
def eager_teacher(tiny_teacher_dir):
    return models.load_model(tiny_teacher_dir, attn_implementation="eager")


def eager_oracle(model, tok, example, max_length, step_ids, word_ids):
    """Eq. 2 by its definition: the example alone (unpadded), eager attention probabilities of every layer."""
    text, steps, words = spans.example_spans(example["question"], example["rationale"], EXP_PROMPT,
                                             example.get("keywords"))
    ids, st, wt = spans.encode(tok, text, steps, words, max_length)
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_attentions=True)
    A = torch.stack([attention.stepwise_attention(P[0].double(), [st[k] for k in step_ids],
                                                  [wt[k] for k in word_ids]) for P in out.attentions])
    return A, sorted(st), sorted(wt), len(steps), len(words)  # [L, S, W]


@pytest.mark.parametrize("max_length", [512, 100, 48])
def test_cache_equals_eager_stepwise_attention(capture_teacher, eager_teacher, max_length):
    model, tok = capture_teacher
    examples = problems.make_problems(8, seed=0)
    lengths = [len(tok(EXP_PROMPT.format(question=e["question"]) + " " + e["rationale"])["input_ids"])
               for e in examples]
    ordered = sorted(min(n, max_length) for n in lengths)  # batches of 3 are grouped by length
    padded = sum(len(set(ordered[i:i + 3])) > 1 for i in range(0, len(ordered), 3))
    assert padded == {512: 3, 100: 1, 48: 0}[max_length]  # 48: all truncated, one even loses every step
    meta = {"delimiters": ".", "teacher": "tiny"}
    cache = build_attention_cache(model, tok, examples, meta, max_length=max_length, batch_size=3)
    assert cache["meta"] == meta and set(cache["items"]) == {e["id"] for e in examples}
    sums = []
    for e, length in zip(examples, lengths, strict=True):
        item = cache["items"][e["id"]]
        A_ref, step_ids, word_ids, n_steps, n_words = eager_oracle(*eager_teacher, e, max_length,
                                                                   item["step_ids"], item["word_ids"])
        assert item["step_ids"] == step_ids and item["word_ids"] == word_ids
        if length <= max_length:  # nothing truncated: every step and word counts
            assert (step_ids, word_ids) == (list(range(n_steps)), list(range(n_words)))
        else:  # the last step loses its final token
            assert len(step_ids) < n_steps
        A = item["A"]
        assert A.dtype == torch.float32 and A.shape == (model.config.num_hidden_layers, len(step_ids), len(word_ids))
        torch.testing.assert_close(A.double(), A_ref, atol=1e-5, rtol=0)
        sums.append(A_ref.sum().item())
    assert sum(s > 0.1 for s in sums) >= 5  # mostly non-trivial; at 48 tokens one example keeps no step at all


def test_load_attention_cache_refuses_another_run(tmp_path):
    examples = problems.make_problems(3, seed=0)
    meta = {"teacher": "t", "exp_prompt": EXP_PROMPT, "delimiters": ".", "critical": "numbers", "max_length": 512,
            "texts": texts_hash(examples)}
    cache = {"meta": meta, "items": {"x": {"A": torch.rand(2, 3, 4), "step_ids": [0, 1, 2], "word_ids": [0, 2, 3, 5]}}}
    path = tmp_path / "cache.pt"
    save_atomic(cache, path)
    assert [p.name for p in tmp_path.iterdir()] == ["cache.pt"]  # no temporary file left behind
    loaded = load_attention_cache(path, dict(meta))
    assert loaded["meta"] == meta and loaded["items"]["x"]["word_ids"] == [0, 2, 3, 5]
    torch.testing.assert_close(loaded["items"]["x"]["A"], cache["items"]["x"]["A"], rtol=0, atol=0)
    changed = examples[:1] + [dict(examples[1], rationale=examples[1]["rationale"] + " Done.")] + examples[2:]
    other = {"teacher": "u", "exp_prompt": "Q: {question}\nR:", "delimiters": ".;", "critical": "keywords",
             "max_length": 256, "texts": texts_hash(changed)}
    for key, value in other.items():
        with pytest.raises(ValueError, match=f"differs in: {key}\\)"):
            load_attention_cache(path, dict(meta, **{key: value}))
    with pytest.raises(ValueError, match="differs in: seed"):
        load_attention_cache(path, dict(meta, seed=1))  # a key the cache lacks


class Touch:
    """Unpickled without weights_only, it creates the file `path`: code that runs from a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def test_a_cache_with_code_in_it_is_refused_and_never_run(tmp_path):
    meta = {"teacher": "t"}
    live = tmp_path / "live.pt"  # the oracle: this payload does run when code may
    torch.save({"meta": meta, "items": Touch(tmp_path / "ran")}, live)
    torch.load(live, weights_only=False)
    assert (tmp_path / "ran").exists()
    path = tmp_path / "teacher_cache.pt"
    torch.save({"meta": meta, "items": Touch(tmp_path / "pwned")}, path)
    with pytest.raises(ValueError) as err:
        load_attention_cache(path, meta)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path} cannot be read (") and "delete it" in message
    assert not (tmp_path / "pwned").exists()


def test_a_truncated_cache_is_one_line_naming_it(tmp_path):
    meta = {"teacher": "t"}
    path = tmp_path / "teacher_cache.pt"
    save_atomic({"meta": meta, "items": {"x": {"A": torch.rand(2, 3, 4), "step_ids": [0, 1, 2], "word_ids": [0]}}},
                path)
    whole = path.read_bytes()
    assert load_attention_cache(path, meta)["items"]["x"]["step_ids"] == [0, 1, 2]  # weights_only reads it
    for cut in (whole[: len(whole) // 2], b"", b"not a torch file"):
        path.write_bytes(cut)
        with pytest.raises(ValueError) as err:
            load_attention_cache(path, meta)
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"{path} cannot be read (") and "delete it" in message


def test_big_integer_answers_are_kept_and_compared_exactly(tmp_path, monkeypatch):
    """12345678901234567890 is 12345678901234567168 as a float: the teacher's answer keeps every digit, and one
    off by 1 is wrong."""
    records = [{"id": "a", "question": "How many grains?", "answer": "12345678901234567890"},
               {"id": "b", "question": "How many stars?", "answer": "12345678901234567890"}]

    def generate(model, tokenizer, prompts, max_new_tokens, batch_size=16, desc=""):
        stated = {"How many grains?": "12345678901234567890", "How many stars?": "12345678901234567891"}
        return [f" I counted. The answer is {stated[_asked(p)[0]]}." for p in prompts]

    monkeypatch.setattr(models, "generate", generate)
    kept = teacher_rationales(NO_TEACHER, records, tmp_path / "r.jsonl")
    assert kept == [{"id": "a", "rationale": "I counted.", "teacher_answer": "12345678901234567890", "phase": 1}]
    assert [(r["id"], r["phase"], r["teacher_answer"], r["correct"]) for r in _rows(tmp_path / "r.jsonl")] == [
        ("a", 1, "12345678901234567890", True), ("b", 1, "12345678901234567891", False),
        ("b", 2, "12345678901234567891", False)]


def test_texts_hash():
    examples = problems.make_problems(3, seed=0)
    h = texts_hash(examples)
    assert texts_hash([dict(e) for e in examples]) == h
    assert texts_hash(list(reversed(examples))) != h
    for key, value in [("rationale", "The answer is 1."), ("question", "Q?"), ("id", "other"),
                       ("keywords", ["cake"])]:
        assert texts_hash([dict(examples[0], **{key: value})] + examples[1:]) != h, key
    assert texts_hash([dict(examples[0], answer="99")] + examples[1:]) == h  # the answer is not in the text


# ---------------------------------------------------------------------------------------------
# The teacher side through train.py: train.training_examples and train.attention_cache, and train.teacher_stage, which
# calls them with a teacher that loads on first use.


def _args(teacher_dir, out, *extra):
    return flags.parse_args(["--data", "builtin", "--teacher", teacher_dir, "--out", str(out), "--n-train", "9",
                             "--teacher-batch-size", "4", "--max-length", "256", *extra])


def _spy_loads(monkeypatch):
    """Every models.load_model call from now on, as (name, attn_implementation); the models load as usual."""
    real_load, loads = models.load_model, []

    def spy_load(name, *args, **kwargs):
        loads.append((name, kwargs.get("attn_implementation")))
        return real_load(name, *args, **kwargs)

    monkeypatch.setattr(models, "load_model", spy_load)
    return loads


def _no_teacher(*args, **kwargs):
    raise AssertionError("the teacher must not run")


def test_train_teacher_cache_written_then_reused(tiny_teacher_dir, tmp_path, monkeypatch, capsys):
    loads = _spy_loads(monkeypatch)
    args = _args(tiny_teacher_dir, tmp_path, "--rationales", "builtin")
    examples = train.training_examples(args, _no_teacher)  # built-in rationales need no teacher
    assert [(e["id"], e["rationale"]) for e in examples] == [(p["id"], p["rationale"].rsplit(" The answer is", 1)[0])
                                                            for p in problems.make_problems(9, seed=0)]
    assert loads == []
    staged, cache = train.teacher_stage(args)
    assert staged == examples
    assert loads == [(tiny_teacher_dir, capture.register())]  # once, for the cache, with the capturing attention
    assert (tmp_path / "teacher_cache.pt").exists() and set(cache["items"]) == {e["id"] for e in examples}
    assert cache["meta"]["teacher"] == tiny_teacher_dir and cache["meta"]["texts"] == texts_hash(examples)
    for item in cache["items"].values():
        assert item["A"].shape == (3, len(item["step_ids"]), len(item["word_ids"])) and len(item["word_ids"]) > 1

    monkeypatch.setattr(models, "load_model", _no_teacher)
    monkeypatch.setattr(teacher, "build_attention_cache", _no_teacher)
    _, again = train.teacher_stage(args)  # reused: the teacher is not loaded
    assert again["meta"] == cache["meta"] and again["items"].keys() == cache["items"].keys()
    for k, item in cache["items"].items():
        torch.testing.assert_close(again["items"][k]["A"], item["A"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="max_length"):
        train.attention_cache(_args(tiny_teacher_dir, tmp_path, "--rationales", "builtin", "--max-length", "128"),
                           examples, _no_teacher)
    changed = [dict(examples[0], rationale="The answer is 1.")] + examples[1:]
    with pytest.raises(ValueError, match="texts"):
        train.attention_cache(args, changed, _no_teacher)
    # a cache of rationales that still hold their answer statement (docs/design.md, "Text layout") is refused;
    # through train.py, in one line
    before = [dict(e, rationale=p["rationale"]) for e, p in zip(examples, problems.make_problems(9, seed=0),
                                                                strict=True)]
    assert all(b["rationale"].startswith(e["rationale"] + " The answer is ") for b, e in zip(before, examples,
                                                                                             strict=True))
    files.save_atomic(dict(cache, meta=dict(cache["meta"], texts=texts_hash(before))), tmp_path / "teacher_cache.pt")
    with pytest.raises(ValueError, match="differs in: texts"):
        train.attention_cache(args, examples, _no_teacher)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        train.teacher_stage(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and "differs in: texts" in err and err.count("\n") == 1


def test_train_teacher_rationales_written_then_reused(tmp_path, monkeypatch):
    records = problems.make_problems(9, seed=0)
    fake = FakeTeacher(records, right1={0, 1, 5}, right2={2, 8})
    monkeypatch.setattr(models, "generate", fake)
    args = _args("unused-teacher", tmp_path, "--rationales", "teacher")

    def teacher():  # models.generate is the fake: the model itself is never run
        return None, None

    examples = train.training_examples(args, teacher)
    assert fake.asked(2) == [2, 3, 4, 6, 7, 8] and fake.calls[0]["batch_size"] == 4
    # joined with the records, in record order, each rationale without its answer statement
    assert examples == [dict(records[i], rationale=records[i]["rationale"].rsplit(" The answer is", 1)[0])
                        for i in (0, 1, 2, 5, 8)]
    assert len(_rows(tmp_path / "rationales.jsonl")) == 15
    monkeypatch.setattr(models, "generate", FakeTeacher(records, set(), set(), fail_on=1))
    assert train.training_examples(args, teacher) == examples  # resumed from the file: the teacher is not asked


# ---------------------------------------------------------------------------------------------
# Slow: gemma3-270m as the teacher on 20 SVAMP items.


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason=f"no data directory at {DATA}")
def test_gemma_teacher_on_svamp(tmp_path):
    records = data.load_dataset("svamp", "train", DATA)[:20]
    model, tok = models.load_model("gemma3-270m", attn_implementation=capture.register())
    t0 = time.time()
    kept = teacher_rationales(lambda: (model, tok), records, tmp_path / "r.jsonl", batch_size=10, max_new_tokens=96)
    seconds = time.time() - t0
    rows = _rows(tmp_path / "r.jsonl")
    n1 = sum(r["correct"] for r in rows if r["phase"] == 1)
    n2 = sum(r["correct"] for r in rows if r["phase"] == 2)
    print(f"\n[gemma3-270m teacher] kept {len(kept)}/20: phase 1 {n1}/20, phase 2 {n2}/{20 - n1}; {seconds:.0f} s")
    for r in rows[:3] + [x for x in rows if x["phase"] == 2][:2]:
        print(f"  {r['id']} phase {r['phase']} correct={r['correct']} answer={r['teacher_answer']}: {r['rationale']!r}")
    assert sum(r["phase"] == 1 for r in rows) == 20 and sum(r["phase"] == 2 for r in rows) == 20 - n1
    assert [k["phase"] for k in kept].count(1) == n1 and len(kept) == n1 + n2
    by_id = {r["id"]: r for r in records}
    for k in kept:
        assert abs(float(k["teacher_answer"]) - float(by_id[k["id"]]["answer"])) < 1e-4 and k["rationale"]
        assert "\nQuestion:" not in k["rationale"] and "\n\n" not in k["rationale"]

    source = [dict(by_id[k["id"]], rationale=k["rationale"]) for k in kept]
    if len(source) < 3:
        palm = {p["id"]: p for p in data.load_palm_rationales("svamp", "train", DATA)}
        source = [dict(r, rationale=palm[r["id"]]["rationale"]) for r in records if r["id"] in palm]
    t0 = time.time()
    cache = build_attention_cache(model, tok, source, {"delimiters": "."}, batch_size=4)
    print(f"[gemma3-270m teacher] attention cache of {len(source)} examples in {time.time() - t0:.1f} s")
    L = model.config.num_hidden_layers
    for e in source:
        item = cache["items"][e["id"]]
        S, W = len(item["step_ids"]), len(item["word_ids"])
        assert item["A"].dtype == torch.float32 and item["A"].shape == (L, S, W) and S > 0 and W > 0
        assert item["step_ids"] == sorted(item["step_ids"]) and item["word_ids"] == sorted(item["word_ids"])
        assert torch.isfinite(item["A"]).all() and (item["A"] >= 0).all()
    e = min(source, key=lambda x: len(x["question"]) + len(x["rationale"]))  # one example against eager
    item = cache["items"][e["id"]]
    model.set_attn_implementation("eager")
    A_ref = eager_oracle(model, tok, e, 512, item["step_ids"], item["word_ids"])[0]
    torch.testing.assert_close(item["A"].double(), A_ref, atol=1e-4, rtol=1e-4)


def test_resume_drops_a_line_cut_by_a_hard_kill(six, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "generate", FakeTeacher(six, right1={0, 1, 2, 3, 4, 5}, right2=set()))
    path = tmp_path / "r.jsonl"
    teacher_rationales(NO_TEACHER, six[:3], path)
    path.write_text(path.read_text() + '{"id": "builtin-3-3", "ratio')  # killed mid-write
    again = FakeTeacher(six, right1={0, 1, 2, 3, 4, 5}, right2=set())
    monkeypatch.setattr(models, "generate", again)
    kept = teacher_rationales(NO_TEACHER, six, path)
    assert again.asked(1) == [3, 4, 5] and len(kept) == 6
    assert len(_rows(path)) == 6


def test_teacher_keywords_are_kept_and_reused(tmp_path, monkeypatch):
    from teacher import teacher_keywords

    examples = [{"id": f"q{i}", "question": f"Where is thing {i}?", "rationale": "It is in a box."} for i in range(3)]
    calls = []

    def fake(model, tok, prompts, max_new_tokens, batch_size, desc=""):
        calls.append(prompts)
        return [" box, thing, place\nQuestion: more"] * len(prompts)

    monkeypatch.setattr(models, "generate", fake)
    path = tmp_path / "k.jsonl"
    assert teacher_keywords(NO_TEACHER, examples[:2], path) == {"q0": ["box", "thing", "place"],
                                                               "q1": ["box", "thing", "place"]}
    assert teacher_keywords(NO_TEACHER, examples, path)["q2"] == ["box", "thing", "place"]
    assert [len(p) for p in calls] == [2, 1]  # the second call only asked for q2
    assert calls[0][0].endswith("Question: Where is thing 0?\nRationale: It is in a box.\nKeywords:")


# ---------------------------------------------------------------------------------------------
# The teacher's dtype (--teacher-dtype) and training on a file of problems (--data PATH).


def test_teacher_dtype(tiny_teacher_dir, tmp_path, monkeypatch):
    """Through train.teacher_stage: auto is float32 on this CPU; bfloat16 loads bfloat16 weights, and its cache
    (float32 A) stays close to the float32 teacher's."""
    real_load, loaded = models.load_model, []

    def spy_load(name, *args, **kwargs):
        model, tok = real_load(name, *args, **kwargs)
        loaded.append(model)
        return model, tok

    monkeypatch.setattr(models, "load_model", spy_load)
    caches = {}
    for flag, dtype in (("auto", torch.float32), ("bfloat16", torch.bfloat16)):
        (tmp_path / flag).mkdir()
        args = _args(tiny_teacher_dir, tmp_path / flag, "--rationales", "builtin", "--teacher-dtype", flag)
        caches[flag] = train.teacher_stage(args)[1]
        assert len(loaded) == 1 and next(loaded.pop().parameters()).dtype == dtype
    for k, item in caches["auto"]["items"].items():
        low = caches["bfloat16"]["items"][k]["A"]
        assert low.dtype == torch.float32 and low.shape == item["A"].shape
        torch.testing.assert_close(low, item["A"], atol=2e-2, rtol=0)


def test_train_on_a_file_of_problems(tiny_teacher_dir, tiny_student_dir, tmp_path, monkeypatch):
    records = problems.make_problems(6, seed=5)
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in records))
    args = flags.parse_args(["--data", str(path), "--teacher", tiny_teacher_dir, "--student", tiny_student_dir])
    assert args.out == Path("runs/mine-molsaki-s0") and args.eval_sets == "svamp,singleeq,asdiv,gsm8k"
    assert args.rationales == "teacher"
    file_records = [dict(r, rationale=p["rationale"]) for r, p in zip(data.load_file(path), records, strict=True)]
    fake = FakeTeacher(file_records, right1={0, 1, 2, 3}, right2={4})
    monkeypatch.setattr(models, "generate", fake)
    out = tmp_path / "run"
    train.main(["--data", str(path), "--teacher", tiny_teacher_dir, "--student", tiny_student_dir, "--out", str(out),
                "--method", "dss", "--batch-size", "2", "--max-steps", "2", "--eval-sets", "", "--lr", "1e-3"])
    kept = [json.loads(line) for line in (out / "rationales.jsonl").read_text().splitlines()]
    assert {r["id"] for r in kept if r["correct"]} == {f"mine-{i}" for i in range(5)}
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
