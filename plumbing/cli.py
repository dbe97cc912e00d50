"""Command-line plumbing of every script: one-line errors, and the test sets known by name.

No paper equation lives here, and nothing of the project is imported. A mistake the user can fix (an unknown flag,
a bad choice, a failed check of the flags, a file or config that will not do) prints one line, `error: <what and how
to fix>`, on stderr and exits with status 2; `--help` is unchanged. Real failures (a NaN, out of memory, a bug) keep
their traceback. eval.py knows the test sets of `TEST_SETS` by name; any other name is a JSON / JSONL file of
problems, whose results go under the file's stem.
"""

import argparse
import sys
from pathlib import Path


def fail(message: str):
    """Print `error: message` (one line) on stderr and exit with status 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (see `fail`); `--help` is unchanged."""

    def error(self, message):
        fail(f"{message} (see {self.prog} --help)")


TEST_SETS = ("svamp", "singleeq", "asdiv", "gsm8k", "csqa", "builtin")  # the names; anything else is a file


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
