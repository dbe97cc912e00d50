"""Command-line plumbing of train.py, eval.py and reproduce.py: a mistake gets one line, not a traceback.

No paper equation lives here.

- `Parser(...)`: an `argparse.ArgumentParser` whose errors (unknown flag, bad choice, a failed check
  through `parser.error`) print `error: <what and how to fix>` on stderr and exit with status 2.
- `fail(message)`: print that line and exit 2 (for checks that need more than the flags: files, configs).

Real failures (a NaN, out of memory, a bug) keep their traceback: only what the user can fix goes here.
"""

import argparse
import sys


def fail(message: str):
    """Print `error: message` (one line) on stderr and exit with status 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (see `fail`); `--help` is unchanged."""

    def error(self, message):
        fail(f"{message} (see {self.prog} --help)")
