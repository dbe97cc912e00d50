"""train.py's command line: its flags, their defaults (the paper's schedule) and their checks.

No paper equation lives here. Defaults left open (None) are resolved here: the schedule (`SCHEDULE`: the paper's for
real data, a short one for the built-in problems), the method's beta, the rationale source, the test sets of the
training task (`EVAL_SETS`) and the run directory (runs/<data>[-palm]-<method>[-sl<T>-<S>][-eq]-s<seed>, one per
README command). A mistake is one line and exit status 2 (cli.py), before any file is read but a file of problems
named by --data (read for its task).
"""

import argparse
import math
import os
from pathlib import Path

import data
import mol
from plumbing import answers, cli, models

METHODS = ("vanilla", "dss", "mmi", "molsaki")
DATA_SETS = ("builtin", "svamp", "gsm8k", "csqa")  # --data names; anything else is a file of problems
EVAL_SETS = {"builtin": "builtin", "math": "svamp,singleeq,asdiv,gsm8k", "csqa": "csqa"}  # per task

# Schedule defaults: the paper's (its GPT-2 students; TinyLlama used --lr 1e-4 --max-steps 2000) for real data, and
# a short one for the built-in problems: about 15 minutes on 2 CPU cores, a minute on a GPU.
SCHEDULE = {"paper": {"lr": 5e-5, "batch_size": 16, "max_steps": 4000, "warmup": 0},
            "builtin": {"lr": 1e-4, "batch_size": 8, "max_steps": 50, "warmup": 5}}


def parse_args(argv=None) -> argparse.Namespace:
    """train.py's flags, their defaults resolved (`SCHEDULE`, the method's beta, the run directory) and checked
    (`_flag_problem`): a mistake is one line, before any file is read but a file of problems named by --data."""
    p = cli.Parser(prog="train.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                   description="Train a student by CoT distillation: L = alpha L_pre + (1 - alpha) L_exp + beta L_att "
                               "(Eq. 7).")
    a = p.add_argument
    a("--teacher", default="gemma3-270m", help="hub id, folder, or a packaged name (gemma3-270m, smollm2-135m)")
    a("--student", default="smollm2-135m", help="hub id, folder, or a packaged name (gemma3-270m, smollm2-135m)")
    a("--teacher-dtype", default="auto", choices=["auto", *models.DTYPES],
      help="teacher weights for its rationale and attention passes: auto = bfloat16 on CUDA, float32 on CPU")
    a("--teacher-device-map", default=None, choices=["auto"],
      help="None = the teacher on one device (the GPU, else the CPU); auto = its layers spread over the visible "
           "GPUs, then the CPU (accelerate), for a teacher no single GPU holds")
    a("--data", default="builtin", help=f"training set: {', '.join(DATA_SETS)}, or a JSON / JSONL file of problems")
    a("--data-dir", default=None, help="folder of the data sets (else $MOLSAKI_DATA, else ~/.cache/molsaki/data)")
    a("--rationales", default=None, choices=["builtin", "teacher", "palm"],
      help="rationale source (builtin: --data builtin only; palm: svamp or csqa); None = builtin or teacher")
    a("--palm-filter", default="all", choices=["all", "correct"],
      help="PaLM items kept: every one with a rationale (all, as DSS) or only those PaLM answered right")
    a("--n-train", type=int, default=200, help="number of built-in training problems")
    a("--answer-target", default="number", choices=answers.TARGETS,
      help="L_pre's target, and how the final evaluation reads answers: number = the gold number (Eq. 1); equation "
           "= SVAMP's equation as DSS trains it (its label, '( 45.0 * 10.0 )'), read by its value (--data svamp)")
    a("--method", default="molsaki", choices=METHODS, help="training objective")
    a("--alpha", type=float, default=0.5, help="weight of L_pre; L_exp gets 1 - alpha (Eq. 7)")
    a("--beta", type=float, default=None, help="weight of L_att (molsaki) or L_MMI (mmi); None = 1.0 or 0.1")
    a("--tau1", type=float, default=0.1, help="teacher MoL temperature (Eq. 4)")
    a("--tau2", type=float, default=0.5, help="student router temperature (Eq. 5)")
    a("--layer-map", default=None, help="single-layer ablation instead of MoL: 'T:S' (1-based) or 'last'")
    a("--delimiters", default=".", help="characters that end a step (Eq. 2's M1)")
    a("--lr", type=float, default=None, help="AdamW learning rate; None = 5e-5 (paper), 1e-4 (builtin)")
    a("--batch-size", type=int, default=None, help="global batch (all processes); None = 16 (paper), 8 (builtin)")
    a("--grad-accum", type=int, default=1, help="micro-batches per process and step")
    a("--max-steps", type=int, default=None, help="optimizer steps; None = 4000 (paper), 50 (builtin)")
    a("--warmup", type=int, default=None, help="linear warmup steps, then linear decay; None = 0 (paper), 5")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay (0, as the HF Trainer DSS used)")
    a("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    a("--seed", type=int, default=0, help="model init of the router and data order")
    a("--max-length", type=int, default=512, help="tokens per text (student and teacher)")
    a("--save-every", type=int, default=500, help="checkpoint every K steps (and at the end)")
    a("--resume", action="store_true", help="continue from --out/checkpoint, with the run's own training flags")
    a("--overwrite", action="store_true", help="start again in an --out that holds a run: its checkpoint, log "
      "and results are removed (its teacher-stage files are kept)")
    a("--teacher-batch-size", type=int, default=8, help="batch of the teacher's generation and attention pass")
    a("--eval-sets", default=None,
      help="comma-separated names or files, '' for none; None = the training task's sets (EVAL_SETS)")
    a("--eval-batch-size", type=int, default=16, help="batch of the final evaluation")
    a("--out", default=None, help="run directory; None = runs/<data>[-palm]-<method>[-sl<T>-<S>][-eq]-s<seed>")
    args = p.parse_args(argv)
    for k, v in SCHEDULE["builtin" if args.data == "builtin" else "paper"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    task = "math"
    if args.data not in DATA_SETS:
        if not Path(args.data).is_file():
            p.error(f"--data {args.data!r} is neither a training set ({', '.join(DATA_SETS)}) nor a file of problems")
        try:
            task = data.task_of(data.load_file(args.data)[0])
        except ValueError as e:
            p.error(f"--data: {e}")
    elif args.data == "csqa":
        task = "csqa"
    if args.eval_sets is None:
        args.eval_sets = EVAL_SETS["builtin" if args.data == "builtin" else task]
    if args.beta is None:
        args.beta = {"molsaki": 1.0, "mmi": 0.1}.get(args.method, 0.0)
    args.rationales = args.rationales or ("builtin" if args.data == "builtin" else "teacher")
    if args.out is None:  # each README command its own directory: an ablation never overwrites the main run
        name = args.data if args.data in DATA_SETS else Path(args.data).stem
        parts = [name, "palm" if args.rationales == "palm" else "", args.method,
                 f"sl{args.layer_map.replace(':', '-')}" if args.layer_map else "",
                 "eq" if args.answer_target == "equation" else "", f"s{args.seed}"]
        args.out = "runs/" + "-".join(part for part in parts if part)
    args.out = Path(args.out)
    problem = _flag_problem(args)
    if problem:
        p.error(problem)
    return args


def _flag_problem(args) -> str | None:
    """What is wrong with the flags alone (before any file is read or model loaded), or None."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    numbers = {"--alpha": args.alpha, "--beta": args.beta, "--tau1": args.tau1, "--tau2": args.tau2, "--lr": args.lr,
               "--weight-decay": args.weight_decay, "--max-grad-norm": args.max_grad_norm}
    checks = [
        *((not math.isfinite(v), f"{k} must be a finite number, got {v}") for k, v in numbers.items()),
        (args.rationales == "builtin" and args.data != "builtin", "--rationales builtin needs --data builtin"),
        (args.answer_target == "equation" and args.data != "svamp",
         f"--answer-target equation: equations (DSS's labels) exist for --data svamp only, not {args.data!r}"),
        (args.rationales == "palm" and args.data not in ("svamp", "csqa"),
         f"--rationales palm: PaLM rationales exist for --data svamp and csqa only, not {args.data!r}"),
        (args.batch_size < 1, f"--batch-size must be at least 1, got {args.batch_size}"),
        (args.grad_accum < 1, f"--grad-accum must be at least 1, got {args.grad_accum}"),
        (args.batch_size % (world * max(1, args.grad_accum)) != 0,
         f"--batch-size {args.batch_size} must be divisible by processes ({world}) x --grad-accum ({args.grad_accum})"),
        (args.max_steps < 1, f"--max-steps must be at least 1, got {args.max_steps}"),
        (not 0 <= args.alpha <= 1, f"--alpha must lie in [0, 1], got {args.alpha}"),
        (args.beta < 0, f"--beta must not be negative, got {args.beta}"),
        (args.tau1 <= 0 or args.tau2 <= 0, f"--tau1 and --tau2 must be positive, got {args.tau1}, {args.tau2}"),
        (args.lr <= 0, f"--lr must be positive, got {args.lr}"),
        (args.weight_decay < 0, f"--weight-decay must not be negative, got {args.weight_decay}"),
        (args.max_grad_norm <= 0, f"--max-grad-norm must be positive, got {args.max_grad_norm}"),
        (not args.delimiters, "--delimiters must name at least one character that ends a step"),
        (args.warmup < 0, f"--warmup must not be negative, got {args.warmup}"),
        (min(args.save_every, args.teacher_batch_size, args.eval_batch_size, args.n_train, args.max_length) < 1,
         "--save-every, --teacher-batch-size, --eval-batch-size, --n-train and --max-length must be at least 1"),
        (args.layer_map is not None and args.method != "molsaki", "--layer-map needs --method molsaki"),
        (args.resume and args.overwrite, "--resume continues the run in --out, --overwrite starts it again: pass one"),
    ]
    for bad, message in checks:
        if bad:
            return message
    if args.layer_map:
        try:
            mol.parse_layer_map(args.layer_map, 10**9, 10**9)  # its form; the range needs the models' configs
        except ValueError as e:
            return f"--layer-map: {e}"
    if args.eval_sets:
        problem = cli.check_sets(args.eval_sets.split(","))
        if problem:
            return f"--eval-sets: {problem}"
    return None


def set_names(data: str, eval_sets: str) -> list[str]:
    """The training set --data and the test sets --eval-sets of a run, each once: names of data.SPLITS, `builtin`,
    or files."""
    return list(dict.fromkeys([data, *filter(None, eval_sets.split(","))]))
