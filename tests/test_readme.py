"""The README and the pages it links (docs/, experiments/) are the user's manual: every command they show parses
with the script's own argument parser, the flag table of train.py lists exactly the flags train.py has, every flag they
name exists, every file they link exists, and the make targets they name exist."""

import contextlib
import io
import re
import shlex
import subprocess
from pathlib import Path

import pytest

import eval as eval_
import walkthrough
from examples import hf_trainer
from experiments import bench, plots, reproduce
from plumbing import fetch, flags

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "experiments").glob("*.md"))]
README = "\n".join(p.read_text() for p in PAGES)  # the manual: the README and its pages
USAGE = (ROOT / "docs" / "usage.md").read_text()
PARSERS = {"train.py": flags.parse_args, "eval.py": eval_.parse_args, "experiments.plots": plots.parse_args,
           "experiments.bench": bench.parse_args, "experiments.reproduce": reproduce.parse_args,
           "walkthrough.py": walkthrough.parse_args, "plumbing.fetch": fetch.parse_args,
           "examples.hf_trainer": hf_trainer.parse_args}


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
        if argv[0].endswith("torchrun"):  # the global batch must split over the processes (flags.parse_args checks it)
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
    assert table == _help_flags(flags.parse_args)


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
    outs = [flags.parse_args(list(argv)).out for argv in commands]
    outs.append(flags.parse_args([]).out)  # make demo
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


def _text_files():
    """The repository's text files (*.py, *.md, Makefile): tracked or new, never ignored ones (.venv, runs)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.splitlines()
        names = [ROOT / n for n in out]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file outside dot folders
        names = [p for p in ROOT.rglob("*") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]
    return sorted(p for p in names if p.is_file() and (p.suffix in (".py", ".md") or p.name == "Makefile"))


# Built from pieces, so that this file does not match itself.
_OUTSIDE = re.compile(r"\b" + "SP" + r"EC\b|\.\./" + "shared" + "|(?i:(?:this|earlier) " + "session)")


def test_repository_stands_alone():
    """No file points at a document outside the repository (an internal spec, a sibling folder) or dates a number
    by the working session that measured it: a measured number names its command, hardware and month instead."""
    files = _text_files()
    assert any(p.name == "README.md" for p in files), files
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()[:100]}" for p in files
            for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if _OUTSIDE.search(line)]
    assert not hits, "\n".join(hits)
