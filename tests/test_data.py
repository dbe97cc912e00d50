"""Tests for data.py: loaders against counts and hand-read items of the real files, PaLM filtering against
DSS's own parse, safe_eval and format_number against hand-computed values, and the error messages."""

import hashlib
import json
import os
import re
import xml.etree.ElementTree as ET
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from tiny_tokenizers import bytelevel_tokenizer, metaspace_tokenizer

import data
import train
from data import (
    EXP_PROMPT,
    PRE_PROMPT,
    load_dataset,
    load_file,
    load_palm_rationales,
)
from plumbing import fetch, flags, problems
from plumbing.answers import format_number, safe_eval

DATA = Path(os.environ.get("MOLSAKI_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"no data directory at {DATA}")
_CACHE = {}


def load(name, split):
    if (name, split) not in _CACHE:
        _CACHE[name, split] = load_dataset(name, split, DATA)
    return _CACHE[name, split]


def test_prompts():
    assert PRE_PROMPT.format(question="q") == "Question: q\nAnswer:"
    assert EXP_PROMPT.format(question="q") == "Question: q\nRationale:"


def test_safe_eval_accepts_arithmetic():
    assert safe_eval("( 84.0 / 2.0 )") == 42.0
    assert safe_eval("-3+2*4") == 5.0
    assert safe_eval("(16 * 17) * 4") == 1088.0
    assert safe_eval("10 - (6 + -3)") == 7.0


@pytest.mark.parametrize("expr", ["__import__('os')", "2**8", "x", "some - 8", "7x = 14", "1,2", "3 % 2",
                                  "+3", "True", "1/0", "", "(1 + 2"])
def test_safe_eval_rejects(expr):
    with pytest.raises(ValueError):
        safe_eval(expr)


@pytest.mark.parametrize("x, text", [(42.0, "42"), (0.5, "0.5"), (1200, "1200"), (2 / 3, "0.666667"),
                                     (7.050000000000001, "7.05"), (-0.0, "0"), (-2.25, "-2.25"), (1e-7, "0"),
                                     (12345678901234567890, "12345678901234567890"),  # an int: exact
                                     (Decimal("12345678901234567890.0000015"), "12345678901234567890.000002"),
                                     (Decimal("-0.0000004"), "0")])
def test_format_number(x, text):
    assert format_number(x) == text


def test_format_number_rejects_nan():
    with pytest.raises(ValueError):
        format_number(float("nan"))


def test_unknown_dataset_or_split(tmp_path):
    with pytest.raises(ValueError, match="svamp/train"):
        load_dataset("mnist", "train", tmp_path)
    with pytest.raises(ValueError, match="asdiv/test"):
        load_dataset("asdiv", "train", tmp_path)
    with pytest.raises(ValueError, match="svamp or csqa"):
        load_palm_rationales("gsm8k", "train", tmp_path)


def register(monkeypatch, root, name, text):
    """A made-up data file at `root`/`name`, registered in the fetch table under its own SHA-256 so that it is read."""
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text)
    source = fetch.FILES[name]._replace(sha256=hashlib.sha256(text.encode()).hexdigest())
    monkeypatch.setitem(fetch.FILES, name, source)


def test_malformed_jsonl_names_file_and_line(tmp_path, monkeypatch):
    def write(text):
        register(monkeypatch, tmp_path, "gsm8k/train.jsonl", text)

    good = json.dumps({"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"})
    write(good + "\n" + '{"question": "broken' + "\n")
    with pytest.raises(ValueError, match=r"train\.jsonl, line 2"):
        load_dataset("gsm8k", "train", tmp_path)
    write(good + "\n\n" + json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(ValueError, match=r"train\.jsonl, line 3: malformed record.*####"):
        load_dataset("gsm8k", "train", tmp_path)
    write(json.dumps({"answer": "#### 2"}) + "\n")
    with pytest.raises(ValueError, match=r"train\.jsonl, line 1: malformed record.*question"):
        load_dataset("gsm8k", "train", tmp_path)
    write(good + "\n" + json.dumps({"question": "q", "answer": "#### 1,250"}) + "\n")
    assert [r["answer"] for r in load_dataset("gsm8k", "train", tmp_path)] == ["2", "1250"]


@pytest.mark.parametrize("text, where", [
    ("[" * 100_000, "deep.json"),  # a JSON array, cut
    ("[" * 100_000 + "]" * 100_000, "deep.json"),  # well-formed, but deeper than the parser recurses
    ('{"question": "Q?", "answer": "1"}\n' + '{"question": ' + "[" * 100_000 + "\n", "deep.json, line 2"),  # JSONL
])
def test_deeply_nested_json_is_one_line(text, where, tmp_path):
    path = tmp_path / "deep.json"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_file(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(tmp_path / where) + ": ") and "nested too deeply" in message


def test_gold_beyond_float_precision_is_kept_exactly(tmp_path):
    """float(12345678901234567890) is 12345678901234567168: every way of writing such a gold keeps its digits."""
    rows = [{"question": "Q1?", "answer": "12345678901234567890"},
            {"question": "Q2?", "answer": 12345678901234567890},  # a JSON integer
            {"question": "Q3?", "answer": "so #### 12,345,678,901,234,567,890"},
            {"sQuestion": "Q4?", "lSolutions": [12345678901234567890]},
            {"question": "Q5?", "answer": "-12345678901234567890.25"},
            {"question": "Q6?", "answer": "2.5"}]  # an ordinary decimal answer
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["answer"] for r in load_file(path)] == ["12345678901234567890"] * 4 + ["-12345678901234567890.25", "2.5"]


@needs_data
@pytest.mark.parametrize("name, split, count", [("svamp", "train", 800), ("svamp", "test", 200),
                                                ("gsm8k", "train", 7473), ("gsm8k", "test", 1319),
                                                ("asdiv", "test", 1218), ("singleeq", "test", 508),
                                                ("csqa", "train", 9741), ("csqa", "test", 1221)])
def test_counts_and_record_format(name, split, count):
    records = load(name, split)
    assert len(records) == count
    assert len({r["id"] for r in records}) == count
    for r in records:
        assert set(r) == ({"id", "question", "answer", "choices"} if name == "csqa" else {"id", "question", "answer"})
        assert r["question"] == r["question"].strip() and r["question"]
        if name != "csqa":
            assert format_number(float(r["answer"])) == r["answer"]  # a clean number string


@needs_data
def test_svamp_matches_the_dss_split_rebuilt_from_svamp_json():
    # the README's recipe: SVAMP.json order, RandomState(0).permutation(1000), train = first 800
    items = json.loads((DATA / "svamp" / "SVAMP.json").read_text())
    idx = np.random.RandomState(seed=0).permutation(len(items))
    for split, part in (("train", idx[:800]), ("test", idx[800:])):
        expected = [(f"{items[i]['Body']}\n{items[i]['Question']}".strip(), format_number(items[i]["Answer"]))
                    for i in part]
        got = [(r["question"], r["answer"]) for r in load("svamp", split)]
        wrong = [i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b]
        # one SVAMP "Answer" is wrong: chal-680, "( ( 4.0 - 2.0 ) + 3.0 )" with Answer 1.0; gold is the equation
        assert wrong == ([195] if split == "train" else [])
        if wrong:
            assert items[part[195]]["ID"] == "chal-680" and got[195][1] == "5" and expected[195][1] == "1"
    assert load("svamp", "train")[0]["answer"] == "42"  # "( 84.0 / 2.0 )"


@needs_data
def test_gsm8k_hand_read_item():
    janet = load("gsm8k", "test")[0]
    assert janet["id"] == "gsm8k-test-0" and janet["question"].startswith("Janet’s ducks lay 16 eggs")
    assert janet["answer"] == "18"


@needs_data
def test_asdiv_answers_against_hand_reads_and_formulas():
    by_id = {r["id"]: r for r in load("asdiv", "test")}
    assert by_id["nluds-0001"] == {"id": "nluds-0001", "answer": "9", "question": "Seven red apples and two green "
                                   "apples are in the basket. How many apples are in the basket?"}
    assert by_id["nluds-1008"]["answer"] == "14"  # "14  (seats)"
    assert by_id["nluds-1039"]["answer"] == "47"  # "47", no unit
    assert by_id["nluds-0575"]["answer"] == "3.333"  # "10/3=3.333"
    assert by_id["nluds-0756"]["answer"] == "12"  # "757/65=11 r42": 12 bags, ASDiv's rounding kept
    # independent: the number after the last "=" of each Formula, where it is one number (no "r" remainder)
    checked = 0
    for p in ET.parse(DATA / "asdiv" / "ASDiv.xml").getroot().iter("Problem"):
        rhs = p.findtext("Formula").split("=")[-1].strip()
        if p.get("ID") in by_id and re.fullmatch(r"\d+(\.\d+)?", rhs):
            assert abs(float(by_id[p.get("ID")]["answer"]) - float(rhs)) < 1e-9, p.get("ID")
            checked += 1
    assert checked == 1218 - 28  # the 28 remainder problems ("200/28=7 r4") are the only ones left out


@needs_data
def test_singleeq_hand_read_item():
    first = load("singleeq", "test")[0]
    assert first["id"] == "singleeq-0" and first["answer"] == "43"
    assert first["question"].startswith("Joan found 70 seashells")


@needs_data
def test_csqa_layout_and_answers_agree_with_the_dss_copy():
    beaver = {r["id"]: r for r in load("csqa", "test")}["080ef6941410139d6869e78122bc741e"]
    assert beaver["question"] == ("A beaver is know for building prowess, their supplies come from where?\n"
                                  "Answer Choices: (a) british columbia (b) body of water (c) wooded area "
                                  "(d) pay debts (e) zoo")
    assert beaver["answer"] == "(c) wooded area"
    for split in ("train", "test"):  # the cos_e copy is an independent source of every answer text
        dss = {}
        for line in (DATA / "commonsenseqa" / "distilling_step_by_step" / f"cqa_{split}.json").open():
            row = json.loads(line)
            dss[row["id"]] = row
        for r in load("csqa", split):
            letter, text = r["answer"][1], r["answer"][4:]
            assert r["answer"][:4] == f"({letter}) " and text == dss[r["id"]]["answer"].strip()
            assert r["choices"] == [c.strip() for c in dss[r["id"]]["choices"]]  # texts are stripped ("ice cream ")
            assert r["choices"]["abcde".index(letter)] == text


def palm_outputs(folder, split, files):
    return [o for i in range(files) for o in json.loads((folder / "llm" / f"{split}_CoT_{i}.json").read_text())]


@needs_data
def test_palm_svamp_against_the_dss_parse():
    records = load("svamp", "train")
    kept = load_palm_rationales("svamp", "train", DATA)  # keep="all": every item with a rationale, as DSS trains
    correct = load_palm_rationales("svamp", "train", DATA, keep="correct")
    print(f"PaLM svamp train kept {len(kept)} (all) / {len(correct)} (correct) of 800")
    gold = {r["id"]: r["answer"] for r in records}
    assert [k["id"] for k in kept] == [r["id"] for r in records if r["id"] in {k["id"] for k in kept}]
    for k in kept:  # r ends before the answer statement (docs/design.md, "Text layout")
        assert "answer is" not in k["rationale"].lower() and k["rationale"].count("Q:") == 0 and k["rationale"]
        assert k["rationale"] == k["rationale"].strip() and k["phase"] == 0
    assert {k["id"] for k in correct} == {k["id"] for k in kept if k["teacher_answer"] == gold[k["id"]]}
    assert kept[0]["rationale"] == ("Luke scored 84 points after 2 rounds. So he scored 84 points in 2 rounds. "
                                    "84 / 2 = 42.")
    # oracle: DSS's loader (text before "Q:", split at "The answer is", r the part before it) keeps every
    # output with the marker; 11 of 800 have none. For the correct filter, DSS's greedy "(...)" regex keeps 586.
    # The whole final expression keeps 594: 9 more, where the answer goes on after the first bracket
    # ("(16 * 17) * 4"), and 1 fewer, "(31 * 6) / 19" (= 9.79, gold 186), which DSS's regex reads as "(31 * 6)".
    outputs = palm_outputs(DATA / "svamp" / "distilling_step_by_step", "train", 2)
    dss, tails, with_marker = set(), {}, {}
    for r, out in zip(records, outputs, strict=True):
        parts = out.split("Q:")[0].rstrip().split("The answer is")
        if len(parts) > 1:
            with_marker[r["id"]] = "The answer is".join(parts[:-1]).strip()
        match = re.search(r"\(.*\)", parts[-1]) if len(parts) == 2 else None
        tails[r["id"]] = parts[-1].strip().split("\n")[0].removesuffix(".")
        try:
            if match and abs(safe_eval(match.group(0)) - float(r["answer"])) < 1e-4:
                dss.add(r["id"])
        except ValueError:
            pass
    assert {k["id"]: k["rationale"] for k in kept} == {i: t for i, t in with_marker.items() if t}
    assert len(kept) == 789
    ours = {k["id"] for k in correct}
    assert len(dss) == 586 and len(ours) == 594
    assert len(ours - dss) == 9 and all(re.search(r"\)\s*[-+*/]", tails[i]) for i in ours - dss)
    assert [tails[i] for i in dss - ours] == ["(31 * 6) / 19"]
    assert len(load_palm_rationales("svamp", "test", DATA)) == 198
    assert len(load_palm_rationales("svamp", "test", DATA, keep="correct")) == 155
    with pytest.raises(ValueError, match="keep"):
        load_palm_rationales("svamp", "test", DATA, keep="right")


@needs_data
def test_palm_csqa_against_the_dss_parse():
    records = load("csqa", "train")
    kept = load_palm_rationales("csqa", "train", DATA)
    correct = load_palm_rationales("csqa", "train", DATA, keep="correct")
    share = len(correct) / len(records)
    print(f"PaLM csqa train kept {len(kept)} (all) / {len(correct)} (correct) of {len(records)}")
    gold = {r["id"]: r["answer"] for r in records}
    assert len(kept) == len(records) == 9741  # every CSQA output has the marker and a rationale
    for k in kept:
        assert "So the answer is" not in k["rationale"] and k["rationale"]  # "the closest answer is" may stay
    assert all(k["teacher_answer"] == gold[k["id"]] for k in correct)
    by_id = {k["id"]: k for k in load_palm_rationales("csqa", "test", DATA)}
    assert by_id["080ef6941410139d6869e78122bc741e"]["rationale"] == (
        "The answer must be the place where beavers get their supplies. Of the above choices, only wooded areas "
        "have the supplies that beavers need.")
    # oracle: DSS compares the text after "(x)" with the answer text, case-sensitively: 74.3% (README).
    # The letter comparison keeps 7333 (75.3%): more, as "(c) California." names the gold "(c) california",
    # and fewer, as answers naming two letters ("(a) ocean or (b) sea.") are dropped.
    folder = DATA / "commonsenseqa" / "distilling_step_by_step"
    rows = [json.loads(line) for line in (folder / "cqa_train.json").open()]
    dss = set()
    for row, out in zip(rows, palm_outputs(folder, "train", 10), strict=True):
        parts = re.split(r"\(.\)", out.split("Q:")[0].rstrip().split("So the answer is")[1])
        if len(parts) > 1 and parts[1].strip().removesuffix(".") == row["answer"]:
            dss.add(row["id"])
    assert len(dss) == 7234 and round(len(dss) / len(records), 3) == 0.743
    assert len(correct) == 7333 and abs(share - 0.743) < 0.015
    assert len(load_palm_rationales("csqa", "test", DATA)) == 1221
    assert len(load_palm_rationales("csqa", "test", DATA, keep="correct")) == 957


# ---------------------------------------------------------------------------------------------
# --answer-target: L_pre learns the gold number (default) or SVAMP's equation as DSS trains it (its label verbatim).


def _pre_target(tok, feature):
    """The text L_pre is trained on: the labelled tokens of the answer task, without the final EOS."""
    return tok.decode([t for t in feature["pre_labels"] if t != -100][:-1])


@needs_data
@pytest.mark.parametrize("extra", [["--method", "vanilla"], ["--method", "dss", "--rationales", "palm"]])
def test_answer_target_equation_trains_on_dss_labels(extra):
    labels = [json.loads(line)["label"] for line in
              (DATA / "svamp" / "distilling_step_by_step" / "svamp_train.json").read_text().splitlines() if line]
    common = ["--data", "svamp", "--data-dir", str(DATA), *extra]
    by_target = {}
    for target in ([], ["--answer-target", "number"], ["--answer-target", "equation"]):
        args = flags.parse_args(common + target)
        by_target[tuple(target)] = args, train.training_examples(args, None)
    (_, default), (_, number), (equation_args, equation) = by_target.values()
    assert default == number and [e["id"] for e in equation] == [e["id"] for e in number]
    assert [e["rationale"] for e in equation] == [e["rationale"] for e in number]  # the same items kept
    gold = {r["id"]: r for r in load("svamp", "train")}
    for e in equation:  # the file's label, verbatim ("( 84.0 / 2.0 )"), of the item's own gold number
        label = labels[int(e["id"].rsplit("-", 1)[1])]
        assert e["answer"] == e["equation"] == label
        assert format_number(safe_eval(label)) == gold[e["id"]]["answer"]
    assert equation[0]["answer"] == "( 84.0 / 2.0 )" and number[0]["answer"] == "42"

    tok = bytelevel_tokenizer()
    number_args = by_target[("--answer-target", "number")][0]
    f_number = train.features(number_args, number[:20], tok, None)
    f_equation = train.features(equation_args, equation[:20], tok, None)
    assert [_pre_target(tok, f) for f in f_equation] == [" " + e["answer"] for e in equation[:20]]
    assert _pre_target(tok, f_equation[0]) == " ( 84.0 / 2.0 )" and _pre_target(tok, f_number[0]) == " 42"
    for f, e in zip(f_number, number[:20], strict=True):  # number: the gold number
        assert _pre_target(tok, f) == " " + gold[e["id"]]["answer"]
        assert (f["pre_ids"], f["pre_labels"]) == data.task_ids(tok, PRE_PROMPT.format(question=e["question"]),
                                                                " " + gold[e["id"]]["answer"], 512)
    if "exp_ids" in f_number[0]:  # the rationale task does not depend on the answer target
        assert [f["exp_ids"] for f in f_equation] == [f["exp_ids"] for f in f_number]


@needs_data
def test_answer_target_equation_needs_svamp_data():
    args = flags.parse_args(["--data", "svamp", "--data-dir", str(DATA), "--answer-target", "equation"])
    args.data = "gsm8k"  # past the flag checks
    with pytest.raises(ValueError, match="--answer-target equation: equations exist for --data svamp only"):
        train.training_examples(args, None)


# ---------------------------------------------------------------------------------------------
# An error about a bad record names the record and stays one readable line, whatever the record holds.


@pytest.mark.parametrize("name, text, where", [
    ("mine.jsonl", '{"question": "Q1?", "answer": "1", "id": "a"}\n\n{"question": "Q2?", "answer": "2", "id": "b"}\n'
     '{"question": "Q3?", "answer": "3", "id": "a"}\n', "'a' (line 1 and line 4)"),
    ("mine.jsonl", '{"question": "Q1?", "answer": "1"}\n{"question": "Q2?", "answer": "2"}\n'
     '{"question": "Q3?", "answer": "3", "id": "mine-0"}\n', "'mine-0' (line 1 and line 3)"),
    ("mine.json", '[{"question": "Q1?", "answer": "1", "id": 7},\n {"question": "Q2?", "answer": "2"},\n'
     ' {"question": "Q3?", "answer": "3", "id": "7"}]', "'7' (item 0 and item 2)")])
def test_duplicate_ids_name_the_id_and_both_places(name, text, where, tmp_path):
    """Hand-written files: ids given, and a given id equal to the default one (<stem>-<index>); JSON Lines count
    lines from 1 (a blank line counts), a JSON array counts items from 0."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_file(path)
    assert str(err.value) == f"{path}: two records have the same id {where}"

BIG = 1_000_000  # characters of the value in a record; an error line may hold 80 of them


def shown(value_repr):
    """What an error line shows of a value whose repr is `value_repr` (written out here, not taken from data.py)."""
    return value_repr[:80] + f"... ({len(value_repr)} characters)"


@pytest.mark.parametrize("record, expect", [
    ({"question": "Q?", "answer": "x" * BIG}, shown("'" + "x" * BIG + "'") + " is not a number"),
    ({"question": "Q?", "answer": "9" * BIG}, shown("'" + "9" * BIG + "'") + " is not a finite number"),
    ({"question": "Q?", "answer": "#### " + "x" * BIG}, shown("' " + "x" * BIG + "'") + " is not a number"),
    ({"question": "Q?", "answer": {"k": "x" * BIG}}, "answer " + shown("{'k': '" + "x" * BIG + "'}")),
    ({"question": ["x" * BIG], "answer": "1"}, "expected non-empty text, got " + shown("['" + "x" * BIG + "']")),
    ({"question": "Q?", "choices": ["a", "b"], "answer": "(c) " + "x" * BIG}, shown("'(c) " + "x" * BIG + "'")),
    ({"question": "Q?", "choices": ["a", "x" * BIG], "answer": "(c) x"}, "got '(c) x'"),
    ({"sQuestion": "Q?", "lSolutions": ["x" * BIG]}, shown("'" + "x" * BIG + "'") + " is not a number"),
])
def test_a_huge_value_in_a_record_is_cut_in_its_error(tmp_path, record, expect):
    path = tmp_path / "big.jsonl"
    path.write_text('{"question": "Q0?", "answer": "1"}\n' + json.dumps(record) + "\n")
    with pytest.raises(ValueError) as err:
        load_file(path)
    message = str(err.value)
    assert message.startswith(f"{path}, line 2: malformed record") and expect in message, message[:300]
    assert "\n" not in message and len(message) - len(str(path)) < 250, message[:300]


def test_a_huge_duplicate_id_is_cut(tmp_path):
    path = tmp_path / "ids.jsonl"
    path.write_text("".join(json.dumps({"question": f"Q{k}?", "answer": "1", "id": "x" * BIG}) + "\n" for k in (1, 2)))
    with pytest.raises(ValueError) as err:
        load_file(path)
    assert str(err.value) == f"{path}: two records have the same id {shown(repr('x' * BIG))} (line 1 and line 2)"


@pytest.mark.parametrize("name, path, row, expect", [
    ("gsm8k", "gsm8k/train.jsonl", {"question": "Q?", "answer": "#### " + "9" * BIG},
     shown("' " + "9" * BIG + "'") + " is not a finite number"),
    ("csqa", "commonsenseqa/official/train_rand_split.jsonl",
     {"id": "c1", "answerKey": "F" * BIG, "question": {"stem": "Where?", "choices": [
         {"label": x, "text": x.lower()} for x in "ABCDE"]}}, "answerKey among them, got " + shown(repr("F" * BIG))),
])
def test_a_huge_value_in_a_data_set_is_cut_in_its_error(tmp_path, monkeypatch, name, path, row, expect):
    register(monkeypatch, tmp_path, path, json.dumps(row) + "\n")
    with pytest.raises(ValueError) as err:
        load_dataset(name, "train", tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / path}, line 1: malformed record") and expect in message, message[:300]
    assert "\n" not in message and len(message) - len(str(tmp_path / path)) < 250, message[:300]


# ---------------------------------------------------------------------------------------------
# --max-length: what the cut takes (the end of the text), the line counting the targets it cut, and the refusal when
# a task has no target token left.


def target_tokens(feature, task):
    """The labelled tokens of a task, without the final EOS: what is left of its target."""
    return sum(t != -100 for t in feature[f"{task}_labels"][:-1])


def test_max_length_counts_the_targets_it_cuts(capsys):
    """The oracle is the features at a length that cuts nothing: at a shorter length an example lost its target when
    fewer of its tokens are labelled, wholly when none is; every text keeps the beginning of its uncut tokens."""
    tok = bytelevel_tokenizer()
    examples = problems.make_problems(12, seed=0)
    whole = data.features(examples, tok, 10_000)
    assert capsys.readouterr().out == ""  # nothing cut, nothing said
    covered = set()
    for m in (30, 45, 60, 75, 100, 150):
        cut = data.features(examples, tok, m)
        told = []
        for task, name in (("pre", "answer target"), ("exp", "rationale")):
            for c, w in zip(cut, whole, strict=True):  # the end goes first: what is left is the text's beginning
                assert c[f"{task}_ids"][:-1] == w[f"{task}_ids"][:-1][:m - 1]
                assert c[f"{task}_labels"][:-1] == w[f"{task}_labels"][:-1][:m - 1]
                assert c[f"{task}_ids"][-1] == c[f"{task}_labels"][-1] == tok.eos_token_id
            left = [target_tokens(c, task) for c in cut]
            lost = sum(n < target_tokens(w, task) for n, w in zip(left, whole, strict=True))
            if lost:
                told.append(f"the {name} of {lost} of 12 examples, {left.count(0)} of them wholly")
                covered |= {(task, "partly")} if lost > left.count(0) else set()
                covered |= {(task, "wholly")} if left.count(0) else set()
        expect = f"[data] --max-length {m} cuts the end of longer texts: " + "; ".join(told) + "\n" if told else ""
        assert capsys.readouterr().out == expect
    assert {("pre", "partly"), ("pre", "wholly"), ("exp", "partly"), ("exp", "wholly")} <= covered


def test_max_length_refuses_a_task_left_without_target(capsys):
    tok = bytelevel_tokenizer()
    examples = problems.make_problems(12, seed=0)
    shortest = min(len(tok(PRE_PROMPT.format(question=e["question"]))["input_ids"]) for e in examples)
    m = shortest + 1  # every prompt fills the m - 1 tokens before EOS
    for rationale, gone in ((True, "the answer target and the rationale"), (False, "the answer target")):
        with pytest.raises(ValueError) as err:
            data.features(examples, tok, m, rationale)
        assert str(err.value) == (f"--max-length {m} cuts {gone} of all 12 examples wholly: their labels would hold "
                                  "the end token alone; raise --max-length")
    capsys.readouterr()

    # The rationale alone: under the SentencePiece-style tokenizer "Rationale:" is one token longer than "Answer:",
    # so a length that keeps the answer's first token leaves the rationale none.
    tok = metaspace_tokenizer()
    question = "What is 2 + 3?"
    examples = [{"id": f"r{k}", "question": question, "answer": "5", "rationale": r}
                for k, r in enumerate(["2 + 3 = 5.", "Two and three make five.", "Add them."])]
    m = len(tok(EXP_PROMPT.format(question=question))["input_ids"]) + 1  # the rationale's prompt fills m - 1
    pre = len(tok(PRE_PROMPT.format(question=question))["input_ids"])
    assert pre < m - 1 < len(tok(PRE_PROMPT.format(question=question) + " 5")["input_ids"])  # the answer: partly
    with pytest.raises(ValueError) as err:
        data.features(examples, tok, m)
    assert str(err.value).startswith(f"--max-length {m} cuts the rationale of all 3 examples wholly: ")
    assert capsys.readouterr().out == (f"[data] --max-length {m} cuts the end of longer texts: the answer target of 3 "
                                       "of 3 examples, 0 of them wholly; the rationale of 3 of 3 examples, 3 of them "
                                       "wholly\n")
    assert len(data.features(examples, tok, m, rationale=False)) == 3  # vanilla trains no rationale


def test_a_json_integer_past_pythons_digit_limit_is_one_short_line(tmp_path):
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"question": "Q?", "answer": 1}) + "\n" + '{"question": "Q?", "answer": ' + "9" * 5000
                    + "}\n")
    with pytest.raises(ValueError) as error:
        load_file(path)
    message = str(error.value)
    assert message.startswith(f"{path}, line 2: cannot read it (") and len(message) < len(str(path)) + 200
