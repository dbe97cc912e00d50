"""The README and the pages it links (docs/, experiments/) are the user's manual: every command they show parses
with the script's own argument parser, the flag table of train.py lists exactly the flags train.py has, every flag they
name exists, every file they link exists, and the make targets they name exist."""

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

import eval as eval_
import fetch
import train
import walkthrough
from experiments import bench, plots, reproduce

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "experiments").glob("*.md"))]
README = "\n".join(p.read_text() for p in PAGES)  # the manual: the README and its pages
USAGE = (ROOT / "docs" / "usage.md").read_text()
PARSERS = {"train.py": train.parse_args, "eval.py": eval_.parse_args, "experiments.plots": plots.parse_args,
           "experiments.bench": bench.parse_args, "experiments.reproduce": reproduce.parse_args,
           "walkthrough.py": walkthrough.parse_args, "fetch.py": fetch.parse_args}


def readme_commands():
    """Each command line of the README's bash blocks, split as the shell would (comments dropped)."""
    text = "\n".join(re.findall(r"```bash\n(.*?)```", README, re.S)).replace("\\\n", " ")
    return [argv for argv in (shlex.split(line, comments=True) for line in text.splitlines()) if argv]


def test_every_script_command_parses():
    seen = []
    for argv in readme_commands():
        script = next((a for a in argv if a in PARSERS), None)
        if script is None:
            continue
        args = PARSERS[script](argv[argv.index(script) + 1:])  # argparse exits (SystemExit) on a wrong flag
        seen.append(script)
        if argv[0].endswith("torchrun"):  # the global batch must split over the processes (train.train checks it)
            procs = int(argv[argv.index("--nproc_per_node") + 1])
            assert args.batch_size % (procs * args.grad_accum) == 0, argv
    assert set(seen) == set(PARSERS), seen


def _help_flags(parse):
    out = io.StringIO()
    with pytest.raises(SystemExit), contextlib.redirect_stdout(out):
        parse(["--help"])
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", out.getvalue())) - {"--help"}


def test_train_flag_table_is_complete():
    section = USAGE.split("## `train.py` flags", 1)[1].split("\n\n", 2)[1]  # the table after the heading
    table = set(re.findall(r"^\| `(--[a-z0-9-]+)`(?:, `(--[a-z0-9-]+)`)?", section, re.M))
    table = {f for row in table for f in row if f}
    assert table == _help_flags(train.parse_args)


def test_make_targets_exist():
    targets = set(re.findall(r"^([a-z]+):", (ROOT / "Makefile").read_text(), re.M))
    named = {argv[1] for argv in readme_commands() if argv[0] == "make"}
    assert named and named <= targets
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci  # CI runs the README's test command


def test_every_flag_named_exists():
    """Every --flag the README names anywhere (tables, usage lines, prose) is a flag of one of the scripts."""
    known = set().union(*(_help_flags(parse) for parse in PARSERS.values())) | {"--nproc_per_node"}  # torchrun's
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", README))
    assert named and named <= known, named - known


def test_readme_runs_write_to_different_directories():
    """Two README commands never share a default run directory (an ablation would overwrite the main run, or hit
    the cache of another run); the eval and plots examples read directories the train commands write."""
    commands = dict.fromkeys(tuple(argv[argv.index("train.py") + 1:]) for argv in readme_commands()
                             if "train.py" in argv and not argv[0].endswith("torchrun"))  # one command, one run
    outs = [train.parse_args(list(argv)).out for argv in commands]
    outs.append(train.parse_args([]).out)  # make demo
    assert len(outs) == len(set(outs)), outs
    evals = [argv for argv in readme_commands() if "eval.py" in argv or "experiments.plots" in argv]
    read = {Path(a).parent if a.endswith("checkpoint") else Path(a)
            for argv in evals for a in argv if a.startswith("runs/")}
    assert read and read <= set(outs), (read, outs)


def test_links_exist():
    """Every relative link of the README and its pages names a file of the repository."""
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not re.match(r"[a-z]+://", target):
                assert (page.parent / target).exists(), (page.name, target)
