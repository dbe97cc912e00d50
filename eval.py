"""Evaluation (SPEC §8): greedy answers of the student on test sets, parsed and scored (paper Table 1).

No paper equation lives here. Two modes:
    answer  the answer task (`data.PRE_PROMPT`), greedy, up to 16 new tokens: Distilling Step-by-Step's
            protocol, the default (the paper does not say how it reads answers);
    cot     the rationale task (`data.EXP_PROMPT`), greedy, up to 128 new tokens, answer read from it.

Answers are read by answers.py (parse_math, parse_choice, is_correct). Public functions:
    evaluate(model, tokenizer, records, mode, batch_size, max_new_tokens) -> (accuracy, items)
    load_set(name, data_dir) -> records       a test set by name (`TEST_SETS`) or a file of problems
                                              (`data.FILE_FORMATS`); `set_label(name)` names its results.
    run(checkpoint, sets, data_dir, mode, batch_size, limit, out, dtype) -> {set: accuracy}   (in [0, 1])
                                              A set an interrupted run finished is kept (`finished_items`).
    parse_args(argv), main(argv)              the command line; a mistake is one line (cli.py).

A record is {id, question, answer, choices?}; a record with `choices` (the choice texts, in the order
a, b, c, ...) is scored as CSQA, any other as math. `builtin` names the built-in word problems
`problems.make_problems(200, seed=1)`. Only the answer's new tokens are read, never the prompt.
"""

import json
from pathlib import Path

import torch

import cli
import data
import fetch
import models
import problems
from answers import check_mode, is_correct, parse_choice, parse_math
from models import generate, load_model

TEST_SETS = ("svamp", "singleeq", "asdiv", "gsm8k", "csqa", "builtin")  # the names; anything else is a file
NEW_TOKENS = {"answer": 16, "cot": 128}  # per mode (answers.MODES)


def evaluate(model, tokenizer, records: list[dict], mode: str = "answer", batch_size: int = 16,
             max_new_tokens: int | None = None) -> tuple[float, list[dict]]:
    """Greedy outputs for `records`, scored; returns (accuracy in [0, 1], per-item dicts)."""
    check_mode(mode)
    if not records:
        raise ValueError("evaluate needs at least one record")
    template = data.PRE_PROMPT if mode == "answer" else data.EXP_PROMPT
    prompts = [template.format(question=r["question"]) for r in records]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=model.device.type == "cuda")
    with autocast:
        outputs = generate(model, tokenizer, prompts, max_new_tokens or NEW_TOKENS[mode], batch_size,
                           desc=f"eval {mode}")
    items = []
    for record, prompt, output in zip(records, prompts, outputs, strict=True):
        choices = record.get("choices")
        task = "csqa" if choices else "math"
        parsed = parse_choice(output, choices, mode) if choices else parse_math(output, mode)
        items.append({"id": record["id"], "prompt": prompt, "output": output, "parsed": parsed,
                      "gold": record["answer"], "correct": is_correct(parsed, record["answer"], task)})
    return sum(item["correct"] for item in items) / len(items), items


def set_label(name: str) -> str:
    """The name a set's results go under (eval_<label>_<mode>.jsonl): the set's name, or a file's stem."""
    return name if name in TEST_SETS else Path(name).stem


def check_sets(sets: list[str]) -> str | None:
    """Why `sets` cannot be evaluated from the flags alone (an unknown name, a missing file), or None."""
    if not sets:
        return "no test set given"
    for name in sets:
        if name not in TEST_SETS and not Path(name).is_file():
            return (f"unknown test set {name!r}: name one of {', '.join(TEST_SETS)} or a JSON / JSONL file of "
                    "problems that exists")
    labels = [set_label(s) for s in sets]
    if len(set(labels)) < len(labels):
        return f"two test sets would write the same results file: {', '.join(sets)}"
    return None


def load_set(name: str, data_dir) -> list[dict]:
    """Test records of a set name (`builtin` = the built-in word problems) or of a file of problems."""
    if name == "builtin":
        return problems.make_problems(200, seed=1)
    if name in TEST_SETS:
        return data.load_dataset(name, "test", data_dir)
    return data.load_file(name)


def finished_items(path, records: list[dict], checkpoint) -> list[dict] | None:
    """The per-item results in `path` when an earlier, interrupted run of this checkpoint finished that set: the
    file is newer than the checkpoint's weights and holds the same item ids in order. Else None (evaluate)."""
    weights = [f.stat().st_mtime_ns for f in Path(checkpoint).glob("*") if f.suffix in (".safetensors", ".bin")]
    if not path.is_file() or not weights or path.stat().st_mtime_ns <= max(weights):
        return None
    items = [json.loads(line) for line in path.read_text().splitlines()]
    return items if [i["id"] for i in items] == [r["id"] for r in records] else None


def run(checkpoint, sets: list[str], data_dir=None, mode: str = "answer", batch_size: int = 16,
        limit: int | None = None, out=None, dtype: str = "auto") -> dict[str, float]:
    """Evaluate the checkpoint on each set; print a markdown table; write eval_<mode>.json and JSONL."""
    check_mode(mode)
    out = Path(out if out is not None else checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    tests = {name: load_set(name, data_dir)[:limit] for name in sets}  # every set read before the model loads
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(str(checkpoint), dtype=models.resolve_dtype(dtype, device))
    model.to(device)
    accuracies, rows = {}, ["| set | n | accuracy % |", "|---|---|---|"]
    for name, records in tests.items():
        path = out / f"eval_{set_label(name)}_{mode}.jsonl"
        items = finished_items(path, records, checkpoint)
        if items is None:
            _, items = evaluate(model, tokenizer, records, mode, batch_size)
            part = path.with_suffix(".part")  # renamed when whole: a kill never leaves half a file
            with open(part, "w") as f:
                f.writelines(json.dumps(item) + "\n" for item in items)
            part.replace(path)
        else:
            print(f"[eval] {name}: kept {path}, written after the checkpoint's weights for the same items")
        accuracy = sum(item["correct"] for item in items) / len(items)
        accuracies[set_label(name)] = accuracy
        rows.append(f"| {name} | {len(items)} | {100 * accuracy:.2f} |")
    (out / f"eval_{mode}.json").write_text(json.dumps(accuracies, indent=2) + "\n")
    print("\n".join(rows))
    return accuracies


def parse_args(argv=None):
    parser = cli.Parser(description="Accuracy of a student checkpoint on test sets (SPEC §8).")
    parser.add_argument("--checkpoint", required=True,
                        help="save_pretrained folder (model + tokenizer), packaged name or hub id")
    parser.add_argument("--sets", default="svamp,singleeq,asdiv,gsm8k",
                        help=f"comma-separated: {', '.join(TEST_SETS)}, or paths to JSON / JSONL files of problems")
    parser.add_argument("--data-dir", default=None, help="default: $MOLSAKI_DATA, else ~/.cache/molsaki/data")
    parser.add_argument("--mode", choices=sorted(NEW_TOKENS), default="answer")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="first N items of each set")
    parser.add_argument("--dtype", default="auto", choices=["auto", *models.DTYPES],
                        help="weights: auto = bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--out", default=None, help="default: the checkpoint folder")
    args = parser.parse_args(argv)
    args.sets = [s for s in args.sets.split(",") if s]
    problem = check_sets(args.sets)
    if problem:
        parser.error(f"--sets: {problem}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be at least 1, got {args.limit}")
    return args


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    try:
        models.load_config(args.checkpoint)
        for name in args.sets:  # fetches a missing data file; a malformed file stops here, before the model
            load_set(name, args.data_dir)
    except (ValueError, FileNotFoundError, fetch.DataUnavailable) as e:
        cli.fail(e)
    return run(args.checkpoint, args.sets, args.data_dir, args.mode, args.batch_size, args.limit, args.out,
               args.dtype)


if __name__ == "__main__":
    main()
