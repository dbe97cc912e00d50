"""Scoring a student checkpoint on the test sets: greedy answers, read and compared with gold (paper Table 1).

No paper equation lives here. The paper does not say how it reads answers: we follow Distilling Step-by-Step (DSS),
our choices are in docs/design.md, "Evaluation". Mode `answer` (the default) greedily writes up to 16 new tokens
after `data.PRE_PROMPT` and reads their first number (answer target `number`) or choice; under answer target
`equation` it writes up to 64 (DSS's generation length) and evaluates their first line as an arithmetic expression
(DSS's SVAMP labels; `answers.safe_eval`, never eval). Mode `cot` writes up to 128 new tokens of rationale after
`data.EXP_PROMPT` and reads the answer it states. Only the new tokens are read, and of them the first
`answers.READ_CHARS` (2048) characters; an output that cannot be read is wrong, never an error. A record with
`choices` is scored as CSQA, any other as math; `builtin` names the built-in word problems. In `out`:
eval_<set>_<mode>.jsonl (per item), beside it eval_<set>_<mode>.meta.json (the hashes of the weights and records
and the settings that made it: a rerun keeps a set whose meta matches) and eval_<mode>.json (the accuracy of every
set there of the same weights and answer target), all strict JSON: no NaN or Infinity.
"""

import hashlib
import json
from pathlib import Path

import torch

import data
from plumbing import answers, cli, fetch, models, problems
from plumbing.answers import TARGETS, check_mode, check_target, is_correct, parse_choice, parse_math
from plumbing.models import generate, load_model

NEW_TOKENS = {"answer": 16, "cot": 128}  # per mode (answers.MODES), answer target number
EQUATION_TOKENS = 64  # answer mode, answer target equation: DSS's generation_max_length (its --gen_max_len)


def _new_tokens(mode: str, answer_target: str) -> int:
    """The new tokens of a mode and answer target; ValueError for an unknown one or equation under cot."""
    check_mode(mode)
    check_target(answer_target)
    if answer_target == "equation" and mode != "answer":
        raise ValueError("answer target 'equation' is read in answer mode only (cot reads the number it states)")
    return EQUATION_TOKENS if answer_target == "equation" else NEW_TOKENS[mode]


def parse_equation(text: str) -> float | None:
    """The value of `text` as DSS reads an equation: the first line (up to the first newline) of its first
    answers.READ_CHARS characters, evaluated as an arithmetic expression by answers.safe_eval (an AST walk, never
    eval); None when it is not one."""
    try:
        return answers.safe_eval(text[:answers.READ_CHARS].split("\n", 1)[0])
    except ValueError:
        return None


def evaluate(model, tokenizer, records: list[dict], mode: str = "answer", batch_size: int = 16,
             max_new_tokens: int | None = None, name: str = "records",
             answer_target: str = "number") -> tuple[float, list[dict]]:
    """Greedy outputs for `records` (the set `name`, in progress lines), scored; returns (accuracy in [0, 1],
    per-item dicts). Under answer target `equation` a math output is read by `parse_equation`."""
    default_tokens = _new_tokens(mode, answer_target)
    if not records:
        raise ValueError("evaluate needs at least one record")
    template = data.PRE_PROMPT if mode == "answer" else data.EXP_PROMPT
    prompts = [template.format(question=r["question"]) for r in records]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=model.device.type == "cuda")
    with autocast:
        outputs = generate(model, tokenizer, prompts, max_new_tokens or default_tokens, batch_size,
                           desc=f"eval {name} {mode}")
    items = []
    for record, prompt, output in zip(records, prompts, outputs, strict=True):
        choices = record.get("choices")
        task = "csqa" if choices else "math"
        if choices:
            parsed = parse_choice(output, choices, mode)
        else:
            parsed = parse_equation(output) if answer_target == "equation" else parse_math(output, mode)
        items.append({"id": record["id"], "prompt": prompt, "output": output, "parsed": parsed,
                      "gold": record["answer"], "correct": is_correct(parsed, record["answer"], task)})
    return _accuracy(items), items


def load_set(name: str, data_dir) -> list[dict]:
    """Test records of a set name (`builtin` = the built-in word problems) or of a file of problems."""
    if name == "builtin":
        return problems.make_problems(200, seed=1)
    if name in cli.TEST_SETS:
        return data.load_dataset(name, "test", data_dir)
    return data.load_file(name)


def weights_hash(model) -> str:
    """SHA-256 over the names, dtypes and bytes of the model's weights (state dict, sorted by name)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(f"{key} {tensor.dtype} {list(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _meta_path(path: Path) -> Path:
    """The file beside results eval_<set>_<mode>.jsonl that records what made them."""
    return path.with_suffix(".meta.json")


def _read_items(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _accuracy(items: list[dict]) -> float:
    return sum(item["correct"] for item in items) / len(items)


def finished_items(path: Path, meta: dict) -> list[dict] | None:
    """The per-item results in `path` when they were made as `meta` says (same weights, records and settings):
    an earlier run, maybe interrupted after this set, finished it. Else None (evaluate)."""
    recorded = _meta_path(path)
    if not path.is_file() or not recorded.is_file() or json.loads(recorded.read_text()) != meta:
        return None
    return _read_items(path)


def _write_results(path: Path, items: list[dict], meta: dict) -> None:
    """Results and their meta file, each renamed into place when whole; the old meta goes first, so that a kill
    never leaves results beside a meta file that is not theirs."""
    _meta_path(path).unlink(missing_ok=True)
    for target, text in ((path, "".join(json.dumps(item, allow_nan=False) + "\n" for item in items)),
                         (_meta_path(path), json.dumps(meta, indent=2, allow_nan=False) + "\n")):
        part = target.with_suffix(".part")
        part.write_text(text)
        part.replace(target)


def _write_summary(out: Path, mode: str, weights: str, answer_target: str = "number") -> None:
    """eval_<mode>.json: {set: accuracy} of every eval_<set>_<mode>.jsonl in `out` made with these weights and this
    answer target (a meta file that names no answer target was scored as numbers)."""
    summary = {}
    for path in sorted(out.glob(f"eval_*_{mode}.jsonl")):
        recorded = _meta_path(path)
        meta = json.loads(recorded.read_text()) if recorded.is_file() else None
        if meta and meta["weights"] == weights and meta.get("answer_target", "number") == answer_target:
            summary[path.name[len("eval_"):-len(f"_{mode}.jsonl")]] = _accuracy(_read_items(path))
    (out / f"eval_{mode}.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")


def run(checkpoint, sets: list[str], data_dir=None, mode: str = "answer", batch_size: int = 16,
        limit: int | None = None, out=None, dtype: str = "auto", answer_target: str = "number") -> dict[str, float]:
    """Evaluate the checkpoint on each set; print a markdown table; write the files of the module doc."""
    new_tokens = _new_tokens(mode, answer_target)
    out = Path(out if out is not None else checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    tests = {name: load_set(name, data_dir)[:limit] for name in sets}  # every set read before the model loads
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:  # a tokenizer larger than the embedding
        model, tokenizer = load_model(str(checkpoint), dtype=models.resolve_dtype(dtype, device))
    except ValueError as e:
        cli.fail(e)
    weights = weights_hash(model)
    model.to(device)
    settings = {"mode": mode, "answer_target": answer_target, "max_new_tokens": new_tokens, "dtype": str(model.dtype),
                "batch_size": batch_size, "device": device}
    accuracies, rows = {}, ["| set | n | accuracy % |", "|---|---|---|"]
    for name, records in tests.items():
        path = out / f"eval_{cli.set_label(name)}_{mode}.jsonl"
        meta = {"weights": weights, "records": hashlib.sha256(json.dumps(records).encode()).hexdigest(), **settings}
        items = finished_items(path, meta)
        if items is None:
            _, items = evaluate(model, tokenizer, records, mode, batch_size, new_tokens, cli.set_label(name),
                                answer_target)
            _write_results(path, items, meta)
        else:
            print(f"[eval] {name}: kept {path}, made by the same weights from the same items and settings")
        accuracy = _accuracy(items)
        accuracies[cli.set_label(name)] = accuracy
        rows.append(f"| {name} | {len(items)} | {100 * accuracy:.2f} |")
    _write_summary(out, mode, weights, answer_target)
    print("\n".join(rows))
    return accuracies


def parse_args(argv=None):
    parser = cli.Parser(description="Accuracy of a student checkpoint on test sets.")
    parser.add_argument("--checkpoint", required=True,
                        help="save_pretrained folder (model + tokenizer), packaged name or hub id")
    parser.add_argument("--sets", default="svamp,singleeq,asdiv,gsm8k",
                        help=f"comma-separated: {', '.join(cli.TEST_SETS)}, or paths to JSON / JSONL files of problems")
    parser.add_argument("--data-dir", default=None, help="default: $MOLSAKI_DATA, else ~/.cache/molsaki/data")
    parser.add_argument("--mode", choices=sorted(NEW_TOKENS), default="answer")
    parser.add_argument("--answer-target", choices=TARGETS, default="number",
                        help="what answer mode reads: number = the first number (the gold number, Eq. 1); "
                             "equation = the first line as an arithmetic expression, its value (DSS's SVAMP labels)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="first N items of each set")
    parser.add_argument("--dtype", default="auto", choices=["auto", *models.DTYPES],
                        help="weights: auto = bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--out", default=None, help="default: the checkpoint folder")
    args = parser.parse_args(argv)
    args.sets = [s for s in args.sets.split(",") if s]
    problem = cli.check_sets(args.sets)
    if problem:
        parser.error(f"--sets: {problem}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be at least 1, got {args.limit}")
    if args.answer_target == "equation" and args.mode != "answer":
        parser.error("--answer-target equation is read in --mode answer only (cot reads the number it states)")
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
               args.dtype, args.answer_target)


if __name__ == "__main__":
    main()
