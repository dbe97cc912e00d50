"""eval.py and answers.py: answer parsing on hand-checked outputs, batched generation against a one-by-one greedy loop,
scoring, and the command line end to end on a tiny random model."""

import builtins
import json
import os
import types
from pathlib import Path

import pytest
import torch
from tiny_tokenizers import bytelevel_tokenizer, metaspace_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import data
import eval as ev
from plumbing import answers, problems
from plumbing.models import generate

DATA = Path(os.environ.get("MOLSAKI_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.mark.parametrize("text, mode, expected", [
    ("$1,200.", "answer", 1200.0),
    (" 1,234,567 people", "answer", 1234567.0),
    ("1,2,3", "answer", 1.0),  # a list, not a thousands separator
    ("-3", "answer", -3.0),
    ("x = -3 degrees", "answer", -3.0),
    ("5-3 is 2", "answer", 5.0),  # a hyphen after a digit is no sign
    ("0.5", "answer", 0.5),
    (".5 of it", "answer", 0.5),
    ("The answer is 42.", "answer", 42.0),
    ("12 apples and 30 pears", "answer", 12.0),
    ("12 apples and 30 pears", "cot", 30.0),
    ("3 + 4 = 7. The answer is 42. Then 99 more", "cot", 42.0),
    ("the answer is 5. No wait, THE ANSWER IS 6 because of 7", "cot", 6.0),
    ("So 2 * 3 = 6 and the answer is $1,200.50.", "cot", 1200.5),
    ("We get 8. The answer is unknown.", "cot", 8.0),  # nothing after "answer is": the last number
    ("no number here", "answer", None),
    ("no number here, the answer is", "cot", None),
    ("", "cot", None),
])
def test_parse_math(text, mode, expected):
    assert answers.parse_math(text, mode) == expected


def test_bad_mode_is_an_error():
    with pytest.raises(ValueError, match="mode"):
        answers.parse_math("1", "rationale")


CHOICES = ["water", "body of water", "wooded area", "pay debts", "zoo"]


@pytest.mark.parametrize("text, mode, expected", [
    (" (C) wooded area", "answer", "c"),
    ("I would say (b) because", "answer", "b"),
    ("Beavers live by the wooded area", "answer", "c"),
    ("a body of water", "answer", "b"),  # starts earlier than "water"
    ("water, or a body of water", "answer", "a"),
    ("Pay Debts", "answer", "d"),
    ("nothing that matches", "answer", None),
    ("Not (a) water. So the answer is (e) zoo.", "answer", "a"),
    ("Not (a) water. So the answer is (e) zoo.", "cot", "e"),
    ("Not (a) water. So the answer is the zoo.", "cot", "e"),
    ("Not (a) water, I think.", "cot", "a"),  # no "answer is": the whole text
])
def test_parse_choice(text, mode, expected):
    assert answers.parse_choice(text, CHOICES, mode) == expected


def test_is_correct():
    assert answers.is_correct(3.00001, "3", "math")
    assert not answers.is_correct(3.001, "3", "math")
    assert answers.is_correct(1200.0, "1,200", "math")
    assert not answers.is_correct(None, "3", "math")
    assert answers.is_correct("c", "(c) wooded area", "csqa")
    assert not answers.is_correct("b", "(c) wooded area", "csqa")
    assert not answers.is_correct(None, "(c) wooded area", "csqa")
    with pytest.raises(ValueError):
        answers.is_correct(3.0, "3", "svamp")


@pytest.mark.skipif(not DATA.is_dir(), reason=f"no data at {DATA}")
@pytest.mark.parametrize("name", ["gsm8k", "svamp", "singleeq", "asdiv"])
def test_gold_answers_parse(name):
    if not hasattr(data, "load_dataset"):
        pytest.skip("data.load_dataset not written yet")
    golds = [r["answer"] for r in data.load_dataset(name, "test", DATA)]
    assert golds
    assert [g for g in golds if answers.parse_math(g) != float(g)] == []
    assert [g for g in golds if answers.parse_math(f"So we get 7. The answer is {g}.", "cot") != float(g)] == []


def fake_generator(outputs, calls):
    def fake(model, tokenizer, prompts, max_new_tokens, batch_size, desc):
        calls.append((prompts, max_new_tokens, batch_size))
        return outputs
    return fake


def test_evaluate_scores_outputs(monkeypatch):
    calls = []
    monkeypatch.setattr(ev, "generate", fake_generator([" 5", " 7 apples, not 8", " none"], calls))
    records = [{"id": "a", "question": "Q1?", "answer": "5"}, {"id": "b", "question": "Q2?", "answer": "7"},
               {"id": "c", "question": "Q3?", "answer": "3"}]
    cpu = types.SimpleNamespace(device=torch.device("cpu"))
    accuracy, items = ev.evaluate(cpu, None, records, batch_size=4)
    assert accuracy == pytest.approx(2 / 3)
    assert calls == [(["Question: Q1?\nAnswer:", "Question: Q2?\nAnswer:", "Question: Q3?\nAnswer:"], 16, 4)]
    assert [(i["id"], i["parsed"], i["gold"], i["correct"]) for i in items] == [
        ("a", 5.0, "5", True), ("b", 7.0, "7", True), ("c", None, "3", False)]
    assert items[1]["prompt"] == "Question: Q2?\nAnswer:" and items[1]["output"] == " 7 apples, not 8"

    calls.clear()
    monkeypatch.setattr(ev, "generate", fake_generator([" 2 + 2 = 4. The answer is 4.", " (a) or (b)"], calls))
    records = [{"id": "m", "question": "Q?", "answer": "4"},
               {"id": "q", "question": "Where?", "answer": "(b) forest", "choices": ["city", "forest"]}]
    accuracy, items = ev.evaluate(cpu, None, records, mode="cot")
    assert calls[0][0] == [data.EXP_PROMPT.format(question="Q?"), data.EXP_PROMPT.format(question="Where?")]
    assert calls[0][1] == 128
    assert [i["parsed"] for i in items] == [4.0, "a"] and accuracy == 0.5


def tiny_llama(tok, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    # eos copies (x1.5) the output row of a token that seed 0 generates often, so that some greedy
    # continuations stop at eos early, inside a batch whose other rows go on
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = 1.5 * model.lm_head.weight[97]
    return model


def greedy_loop(model, tok, prompt, max_new_tokens):
    """The definition: one prompt (text or token ids), no padding, no cache; full forward pass and argmax per
    token."""
    ids, new = tok(prompt)["input_ids"] if isinstance(prompt, str) else prompt, []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tok.eos_token_id:
                break
            new.append(token)
    return tok.decode(new, skip_special_tokens=True), len(new)


PROMPTS = [
    "Question: Mary has 12 apples. She gives 3 apples to John. How many apples does she have left?",
    "Tom",
    "Question: A baker made 48 cookies.",
    "25 + 7.50 =",
    "Rationale: He reads 15 pages each day. In 4 days he reads",
    "The train travels 120 miles in 2 hours",
]


def test_generate_matches_one_by_one():
    tok = bytelevel_tokenizer()
    model = tiny_llama(tok)
    expected = [greedy_loop(model, tok, p, 12) for p in PROMPTS]
    lengths = [n for _, n in expected]
    assert min(lengths) < 12 and max(lengths) == 12, lengths  # some stop at eos inside a batch, some do not
    assert len({len(tok(p)["input_ids"]) for p in PROMPTS}) == len(PROMPTS)  # padding really happens
    model.train()  # generate must decode in eval mode and give the mode back
    assert generate(model, tok, PROMPTS, 12, batch_size=4) == [text for text, _ in expected]
    assert tok.padding_side == "right" and model.training
    assert generate(model, tok, PROMPTS[:1], 12, batch_size=1) == [expected[0][0]]


def short_context_model(arch, tok, context):
    """A tiny random GPT-2 (learned positions: a longer input fails) or Llama with a context of `context` tokens."""
    torch.manual_seed(0)
    special = dict(bos_token_id=tok.bos_token_id or tok.eos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=context, n_embd=32, n_layer=2, n_head=4,
                                          **special)).eval()
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=context, **special)).eval()


LONG = "Mary has 12 apples and gives 3 apples to John. " * 8


@pytest.mark.parametrize("arch, tokenizer", [("gpt2", bytelevel_tokenizer), ("llama", metaspace_tokenizer)])
def test_prompts_longer_than_the_context_are_cut_from_the_left(arch, tokenizer, capsys):
    """Each prompt that leaves no room for the new tokens keeps its last tokens (and the tokenizer's leading BOS):
    the tokenizer's own ids of the whole prompt, sliced; one printed line per set counts them."""
    tok, context = tokenizer(), 48
    model = short_context_model(arch, tok, context)
    records = [{"id": "long", "question": LONG + "How many apples does she have left?", "answer": "84"},
               {"id": "short", "question": "What is 2 + 3?", "answer": "5"},
               {"id": "longer", "question": LONG * 2 + "How many does John get?", "answer": "24"}]
    real, given = model.generate, []

    def spy(**kwargs):
        given.append(kwargs["input_ids"][kwargs["attention_mask"].bool()].tolist())
        return real(**kwargs)

    model.generate = spy
    _, items = ev.evaluate(model, tok, records, batch_size=1, name="mine")
    lines = [line for line in capsys.readouterr().out.splitlines() if "cut from the left" in line]
    assert len(lines) == 1 and "eval mine answer: 2 of 3 prompts longer than the context" in lines[0], lines
    expected = []
    for item in items:
        ids = tok(item["prompt"])["input_ids"]
        head = ids[:1] if tok.bos_token_id is not None else []
        expected.append(ids if item["id"] == "short" else head + ids[len(head) - (context - 16):])
        assert len(expected[-1]) <= context - 16 and item["prompt"].endswith("\nAnswer:")
        assert item["output"] == greedy_loop(model, tok, expected[-1], 16)[0]
    assert sorted(given) == sorted(expected)
    first = tok(items[0]["prompt"])["input_ids"][0]
    assert (expected[0][0] == first) == (arch == "llama")  # the BOS kept; GPT-2's "Question" cut


def test_no_room_for_a_prompt_is_an_error():
    tok = bytelevel_tokenizer()
    with pytest.raises(ValueError, match="16 new tokens leave no room for a prompt in the model's context of 16"):
        generate(short_context_model("gpt2", tok, 16), tok, ["What is 2 + 3?"], 16)


def save_tiny_checkpoint(folder):
    tok = bytelevel_tokenizer()
    model = tiny_llama(tok)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


def test_cli_end_to_end(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    model, tok = save_tiny_checkpoint(ckpt)
    accuracies = ev.main(["--checkpoint", str(ckpt), "--sets", "builtin", "--limit", "8", "--batch-size", "3"])
    stdout = capsys.readouterr().out
    assert list(accuracies) == ["builtin"]
    assert json.loads((ckpt / "eval_answer.json").read_text()) == accuracies
    items = [json.loads(line) for line in (ckpt / "eval_builtin_answer.jsonl").read_text().splitlines()]
    records = problems.make_problems(200, seed=1)[:8]
    assert [i["id"] for i in items] == [r["id"] for r in records]
    for item, record in zip(items, records, strict=True):
        assert item["prompt"] == data.PRE_PROMPT.format(question=record["question"])
        assert item["output"] == greedy_loop(model, tok, item["prompt"], 16)[0]
        assert item["parsed"] == answers.parse_math(item["output"])
        assert item["gold"] == record["answer"]
        assert item["correct"] == answers.is_correct(item["parsed"], record["answer"], "math")
    accuracy = sum(i["correct"] for i in items) / 8
    assert accuracies["builtin"] == accuracy
    assert "| set | n | accuracy % |" in stdout and f"| builtin | 8 | {100 * accuracy:.2f} |" in stdout

    out = tmp_path / "elsewhere"
    ev.main(["--checkpoint", str(ckpt), "--sets", "builtin", "--limit", "2", "--mode", "cot", "--out", str(out)])
    items = [json.loads(line) for line in (out / "eval_builtin_cot.jsonl").read_text().splitlines()]
    assert sorted(p.name for p in out.iterdir()) == ["eval_builtin_cot.jsonl", "eval_builtin_cot.meta.json",
                                                     "eval_cot.json"]
    assert items[0]["prompt"] == data.EXP_PROMPT.format(question=records[0]["question"])


def test_interrupted_run_keeps_the_sets_it_finished(tmp_path, monkeypatch):
    """A kill between sets: the rerun evaluates only the sets without a results file, and gives the accuracies
    of an uninterrupted run. A file of other items, or of other weights, is evaluated again; weights saved again
    unchanged keep it."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    save_tiny_checkpoint(ckpt)
    mine = write_jsonl(tmp_path / "mine.jsonl", [{"question": "What is 2 + 3?", "answer": "5"}])
    sets = ["--checkpoint", str(ckpt), "--sets", f"builtin,{mine}", "--limit", "3", "--out", str(out)]
    whole = ev.main(sets)
    first = (out / "eval_builtin_answer.jsonl").read_text()
    (out / "eval_mine_answer.jsonl").unlink()
    (out / "eval_answer.json").unlink()  # as if killed while evaluating mine.jsonl

    real, evaluated = ev.evaluate, []

    def spy(model, tok, records, *args, **kwargs):
        evaluated.append([r["id"] for r in records])
        return real(model, tok, records, *args, **kwargs)

    monkeypatch.setattr(ev, "evaluate", spy)
    assert ev.main(sets) == whole
    assert evaluated == [["mine-0"]]
    assert (out / "eval_builtin_answer.jsonl").read_text() == first
    assert not list(out.glob("*.part"))

    evaluated.clear()
    ev.main(sets[:-4] + ["--limit", "2", "--out", str(out)])  # other items of builtin; mine.jsonl has only one
    builtin = [p["id"] for p in ev.problems.make_problems(200, seed=1)[:3]]
    assert evaluated == [builtin[:2]]
    evaluated.clear()
    ev.main(sets)
    assert evaluated == [builtin]  # the 2-item file was replaced
    evaluated.clear()
    weights = ckpt / "model.safetensors"
    later = max(f.stat().st_mtime_ns for f in out.iterdir()) + 1
    os.utime(weights, ns=(later, later))  # the same weights saved again after the results
    assert ev.main(sets) == whole
    assert evaluated == []
    tiny_llama(bytelevel_tokenizer(), seed=1).save_pretrained(ckpt)  # other weights
    ev.main(sets)
    assert evaluated == [builtin, ["mine-0"]]


def read_items(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_an_older_checkpoint_is_not_given_the_results_of_another(tmp_path):
    """Checkpoint A evaluated into --out, then B, saved before A, into the same --out: B's results are B's own
    greedy outputs, although A's file is newer than B's weights and of the same items."""
    tok = bytelevel_tokenizer()
    older = tiny_llama(tok, seed=1)
    older.save_pretrained(tmp_path / "b")
    tok.save_pretrained(tmp_path / "b")
    save_tiny_checkpoint(tmp_path / "a")
    out = tmp_path / "out"
    argv = ["--sets", "builtin", "--limit", "3", "--out", str(out)]
    ev.main(["--checkpoint", str(tmp_path / "a"), *argv])
    of_a = (out / "eval_builtin_answer.jsonl").read_text()
    ev.main(["--checkpoint", str(tmp_path / "b"), *argv])
    items = read_items(out / "eval_builtin_answer.jsonl")
    assert [i["output"] for i in items] == [greedy_loop(older, tok, i["prompt"], 16)[0] for i in items]
    assert (out / "eval_builtin_answer.jsonl").read_text() != of_a


def test_an_edited_problem_file_is_evaluated_again(tmp_path):
    """A problem file edited with its ids kept (a gold answer fixed, then a question): the results follow it."""
    ckpt = tmp_path / "ckpt"
    save_tiny_checkpoint(ckpt)
    mine = write_jsonl(tmp_path / "mine.jsonl", [{"question": "What is 2 + 3?", "answer": "5"}])
    argv = ["--checkpoint", str(ckpt), "--sets", str(mine)]
    ev.main(argv)
    write_jsonl(mine, [{"question": "What is 2 + 3?", "answer": "6"}])
    ev.main(argv)
    assert [(i["id"], i["gold"]) for i in read_items(ckpt / "eval_mine_answer.jsonl")] == [("mine-0", "6")]
    write_jsonl(mine, [{"question": "What is 2 + 4?", "answer": "6"}])
    ev.main(argv)
    [item] = read_items(ckpt / "eval_mine_answer.jsonl")
    assert item["id"] == "mine-0" and item["prompt"] == data.PRE_PROMPT.format(question="What is 2 + 4?")


@pytest.mark.parametrize("flags, again", [([], False), (["--batch-size", "2"], True), (["--dtype", "bfloat16"], True)])
def test_other_generation_settings_are_evaluated_again(tmp_path, monkeypatch, flags, again):
    ckpt = tmp_path / "ckpt"
    save_tiny_checkpoint(ckpt)
    argv = ["--checkpoint", str(ckpt), "--sets", "builtin", "--limit", "2"]
    ev.main(argv + ["--batch-size", "1"])
    real, evaluated = ev.evaluate, []

    def spy(*args, **kwargs):
        evaluated.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "evaluate", spy)
    ev.main(argv + ["--batch-size", "1", *flags])  # the last --batch-size counts
    assert evaluated == ([1] if again else [])


def test_summary_keeps_the_sets_scored_earlier(tmp_path):
    """eval_answer.json after two calls of one checkpoint (one set each) has both sets' accuracies, recounted from
    their results; after another checkpoint's call it has only that call's set (the other file is not its)."""
    save_tiny_checkpoint(tmp_path / "a")
    tok = bytelevel_tokenizer()
    tiny_llama(tok, seed=1).save_pretrained(tmp_path / "b")
    tok.save_pretrained(tmp_path / "b")
    out = tmp_path / "out"
    mine = write_jsonl(tmp_path / "mine.jsonl", [{"question": "What is 2 + 3?", "answer": "5"}])

    def accuracy(label):
        items = read_items(out / f"eval_{label}_answer.jsonl")
        return sum(i["correct"] for i in items) / len(items)

    ev.main(["--checkpoint", str(tmp_path / "a"), "--sets", "builtin", "--limit", "4", "--out", str(out)])
    assert ev.main(["--checkpoint", str(tmp_path / "a"), "--sets", str(mine), "--out", str(out)]) == {
        "mine": accuracy("mine")}
    assert json.loads((out / "eval_answer.json").read_text()) == {"builtin": accuracy("builtin"),
                                                                  "mine": accuracy("mine")}
    ev.main(["--checkpoint", str(tmp_path / "b"), "--sets", str(mine), "--out", str(out)])
    assert json.loads((out / "eval_answer.json").read_text()) == {"mine": accuracy("mine")}


@pytest.mark.parametrize("damage, expect", [("tokenizer", "has no tokenizer files"),
                                            ("weights", "model.safetensors is truncated or damaged")])
def test_a_damaged_checkpoint_is_one_error_line(tmp_path, capsys, damage, expect):
    ckpt = tmp_path / "ckpt"
    save_tiny_checkpoint(ckpt)
    if damage == "tokenizer":
        (ckpt / "tokenizer.json").unlink()
    else:
        weights = ckpt / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    capsys.readouterr()  # the saving's progress bar
    with pytest.raises(SystemExit) as stop:
        ev.main(["--checkpoint", str(ckpt), "--sets", "builtin", "--limit", "1"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], err


# ---------------------------------------------------------------------------------------------
# Any file of problems (data.FILE_FORMATS), and the weights' dtype.


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_file_formats(tmp_path):
    """Each format by hand: the records the loaders would make, ids from the file's stem when absent."""
    math = write_jsonl(tmp_path / "mine.jsonl", [
        {"question": "Q1?", "answer": "1,200"}, {"question": "Q2?", "answer": 2.5, "id": "own"},
        {"question": "Q3?", "answer": "Step. So 3 + 4 = 7.\n#### 7"}, {"sQuestion": "Q4?", "lSolutions": [43.0]}])
    assert data.load_file(math) == [
        {"id": "mine-0", "question": "Q1?", "answer": "1200"}, {"id": "own", "question": "Q2?", "answer": "2.5"},
        {"id": "mine-2", "question": "Q3?", "answer": "7"}, {"id": "mine-3", "question": "Q4?", "answer": "43"}]
    array = tmp_path / "arr.json"  # one JSON array, SingleEq's own layout
    array.write_text(json.dumps([{"iIndex": 0, "sQuestion": "Joan found 70 shells. How many?", "lSolutions": [70]}]))
    assert data.load_file(array) == [{"id": "arr-0", "question": "Joan found 70 shells. How many?", "answer": "70"}]
    csqa = write_jsonl(tmp_path / "cs.jsonl", [{"question": "Where?", "choices": ["home", "park", "sea"],
                                                 "answer": "(b) park"}])
    record = data.load_file(csqa)[0]
    assert record == {"id": "cs-0", "question": "Where?\nAnswer Choices: (a) home (b) park (c) sea",
                      "answer": "(b) park", "choices": ["home", "park", "sea"]}
    assert data.task_of(record) == "csqa"


@pytest.mark.parametrize("rows, expect", [
    ([{"question": "Q?", "answer": "12"}, {"question": "Q?"}], r"bad.jsonl, line 2: malformed record \(KeyError"),
    ([{"question": "Q?", "answer": "twelve"}], "line 1: malformed record"),
    ([{"question": "Q?", "choices": ["a", "b"], "answer": "(c) x"}], "line 1: malformed record .*2-5 choices"),
    ([{"question": "Q?", "answer": "1"}, {"question": "R?", "choices": ["x", "y"], "answer": "(a) x"}], "mixes"),
    ([{"question": "Q?", "answer": "1", "id": "a"}, {"question": "R?", "answer": "2", "id": "a"}], "same id"),
    ([], "no records"),
])
def test_load_file_errors_name_file_and_record(tmp_path, rows, expect):
    with pytest.raises(ValueError, match=expect):
        data.load_file(write_jsonl(tmp_path / "bad.jsonl", rows))


def test_eval_scores_a_file_and_names_it(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    model, tok = save_tiny_checkpoint(ckpt)
    path = write_jsonl(tmp_path / "my_test.jsonl", [{"question": "What is 2 + 3?", "answer": "5"},
                                                    {"question": "What is 10 - 4?", "answer": 6}])
    accuracies = ev.main(["--checkpoint", str(ckpt), "--sets", f"{path},builtin", "--limit", "2"])
    assert list(accuracies) == ["my_test", "builtin"]
    items = [json.loads(line) for line in (ckpt / "eval_my_test_answer.jsonl").read_text().splitlines()]
    assert [(i["id"], i["gold"]) for i in items] == [("my_test-0", "5"), ("my_test-1", "6")]
    for item in items:
        assert item["output"] == greedy_loop(model, tok, item["prompt"], 16)[0]
    assert f"| {path} | 2 |" in capsys.readouterr().out


def test_dtype_flag(tmp_path, monkeypatch):
    assert ev.models.resolve_dtype("auto", "cpu") == torch.float32
    assert ev.models.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert ev.models.resolve_dtype("float32", "cuda") == torch.float32
    ckpt = tmp_path / "ckpt"
    save_tiny_checkpoint(ckpt)
    real, dtypes = ev.load_model, []

    def spy(name, dtype=torch.float32, **kwargs):
        model, tok = real(name, dtype=dtype, **kwargs)
        dtypes.append(next(model.parameters()).dtype)
        return model, tok

    monkeypatch.setattr(ev, "load_model", spy)
    for flag in ("auto", "bfloat16"):
        ev.main(["--checkpoint", str(ckpt), "--sets", "builtin", "--limit", "1", "--dtype", flag])
    assert dtypes == [torch.float32, torch.bfloat16]  # auto on this CPU: float32


# ---------------------------------------------------------------------------------------------
# --answer-target equation: DSS's reading, the output's first line evaluated as an arithmetic expression.


@pytest.mark.parametrize("output, value", [
    ("( 45.0 * 10.0 )", 450.0), (" ( 45.0 * 10.0 ) ", 450.0), (" 45 * 10", 450.0), (" 450", 450.0),
    ("-3 + 5", 2.0), (" ( 84.0 / 2.0 )\nQuestion: Tom has 3", 42.0),  # the first line only
    (" 45 *", None), ("1,200", None), ("450 apples", None), ("( 45.0 * 10.0 ) Question:", None), ("", None),
    ("\n450", None), ("2 ** 8", None), ("7 % 2", None), ("__import__('os')", None), ("1 / 0", None), ("x", None),
])
def test_parse_equation(output, value):
    assert ev.parse_equation(output) == value


def test_answer_target_equation_scores_values_without_eval(tmp_path, monkeypatch):
    """An output is right when its expression's value is the gold number ("( 45.0 * 10.0 )", "45 * 10" and "450"
    for 450), wrong when it is no expression ("45 *"); Python's eval never runs. The meta records the answer target:
    results of the other target are evaluated again, never reused, and the summary is of one target."""
    outputs, calls = [" ( 45.0 * 10.0 )", " 45 * 10", " 450", " 45 *"], []
    monkeypatch.setattr(ev, "generate", fake_generator(outputs, calls))
    records = [{"id": f"m-{k}", "question": f"Q{k}?", "answer": "450"} for k in range(4)]
    cpu = types.SimpleNamespace(device=torch.device("cpu"))

    def no_eval(*args, **kwargs):
        raise AssertionError("Python's eval must never read an output")

    with monkeypatch.context() as m:
        m.setattr(builtins, "eval", no_eval)
        accuracy, items = ev.evaluate(cpu, None, records, answer_target="equation")
    assert [(i["parsed"], i["correct"]) for i in items] == [(450.0, True), (450.0, True), (450.0, True), (None, False)]
    assert accuracy == 0.75 and calls[-1][1] == ev.EQUATION_TOKENS == 64
    _, items = ev.evaluate(cpu, None, records)  # number: the first number
    assert [i["parsed"] for i in items] == [45, 45, 450, 45] and calls[-1][1] == 16
    with pytest.raises(ValueError, match="answer mode only"):
        ev.evaluate(cpu, None, records, mode="cot", answer_target="equation")

    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    save_tiny_checkpoint(ckpt)
    mine = write_jsonl(tmp_path / "mine.jsonl", [{"question": r["question"], "answer": 450} for r in records])
    argv = ["--checkpoint", str(ckpt), "--sets", str(mine), "--out", str(out)]
    metas = {}
    calls.clear()
    for target, accuracy, evaluated in [("equation", 0.75, 1), ("number", 0.25, 2), ("equation", 0.75, 3),
                                        ("equation", 0.75, 3)]:  # the last one: kept, made with the same target
        assert ev.main([*argv, "--answer-target", target]) == {"mine": accuracy}
        assert len(calls) == evaluated
        assert json.loads((out / "eval_answer.json").read_text()) == {"mine": accuracy}
        metas[target] = json.loads((out / "eval_mine_answer.meta.json").read_text())
        assert [i["correct"] for i in read_items(out / "eval_mine_answer.jsonl")] == (
            [True, True, True, False] if target == "equation" else [False, False, True, False])
    assert metas["equation"]["answer_target"] == "equation" and metas["number"]["answer_target"] == "number"
    assert {k for k in metas["number"] if metas["number"][k] != metas["equation"][k]} == {"answer_target",
                                                                                        "max_new_tokens"}


@pytest.mark.skipif(not DATA.is_dir(), reason=f"no data at {DATA}")
def test_answer_target_equation_on_every_math_set(tmp_path, monkeypatch):
    """SVAMP, SingleEq, ASDiv, GSM8K and a file: an expression of the gold value is right, one of another value
    wrong."""
    ckpt = tmp_path / "ckpt"
    save_tiny_checkpoint(ckpt)
    mine = write_jsonl(tmp_path / "mine.jsonl", [{"question": "What is 2 + 3?", "answer": "5"}])
    sets = ["svamp", "singleeq", "asdiv", "gsm8k", str(mine)]
    gold = {data.PRE_PROMPT.format(question=r["question"]): r["answer"] for name in sets
            for r in ev.load_set(name, DATA)[:3]}

    def fake(model, tokenizer, prompts, max_new_tokens, batch_size, desc):
        return [f" ( {gold[p]} * 2.0 ) / 2" if k % 2 == 0 else f" ( {gold[p]} + 1.0 )" for k, p in enumerate(prompts)]

    monkeypatch.setattr(ev, "generate", fake)
    accuracies = ev.main(["--checkpoint", str(ckpt), "--sets", ",".join(sets), "--data-dir", str(DATA), "--limit",
                          "3", "--batch-size", "8", "--answer-target", "equation"])
    assert accuracies == {"svamp": 2 / 3, "singleeq": 2 / 3, "asdiv": 2 / 3, "gsm8k": 2 / 3, "mine": 1.0}


def strict_json(text):
    """JSON as strict readers take it: NaN, Infinity and -Infinity are refused."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("target", answers.TARGETS)
def test_a_degenerate_output_is_wrong_not_an_error(tmp_path, monkeypatch, target):
    """Outputs past what Python parses (17 of SmolLM2's 64-dash tokens, a thousand additions, deep parentheses) or
    past float's range are scored wrong, beside a right one, under either answer target; no NaN or Infinity is
    written to the results, their meta or the summary."""
    degenerate = [" " + "-" * 64 * 17 + "1", " " + "1+" * 1000 + "1", "(" * 1000 + "45 * 10" + ")" * 1000,
                  " " + "9" * 400, " 1e308 * 10", " 1e308 * 10 - 1e308 * 10", " 1e999"]
    monkeypatch.setattr(ev, "generate", fake_generator([" 450", *degenerate], []))
    ckpt = tmp_path / "ckpt"
    save_tiny_checkpoint(ckpt)
    mine = write_jsonl(tmp_path / "mine.jsonl", [{"question": f"Q{k}?", "answer": 450} for k in range(8)])
    assert ev.main(["--checkpoint", str(ckpt), "--sets", str(mine), "--answer-target", target]) == {"mine": 1 / 8}
    items = [strict_json(line) for line in (ckpt / "eval_mine_answer.jsonl").read_text().splitlines()]
    assert [i["correct"] for i in items] == [True] + [False] * 7
    if target == "equation":
        assert [i["parsed"] for i in items] == [450] + [None] * 7
    assert items[4]["parsed"] is None  # "99...9", 400 digits: no number within float's range
    assert strict_json((ckpt / "eval_mine_answer.meta.json").read_text())["answer_target"] == target
    assert strict_json((ckpt / "eval_answer.json").read_text()) == {"mine": 1 / 8}
