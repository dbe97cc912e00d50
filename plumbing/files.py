"""Reading and writing the project's files: JSON and JSON Lines that name the line a problem is on, logs that a
hard kill may have cut, torch files that never run code, and writes that a crash cannot leave half done."""

import json
import os
import re
from pathlib import Path

import torch


def read_json(text: str, where: str):
    """json.loads; invalid or too deeply nested JSON is a ValueError naming `where`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply to read") from None
    except ValueError as e:  # an integer literal past Python's digit limit
        raise ValueError(f"{where}: cannot read it ({str(e)[:120]})") from None


def read_jsonl(path: Path) -> list[tuple[str, dict]]:
    """(location, object) of each non-blank line."""
    with open(path, encoding="utf-8") as f:
        return [(f"{path}, line {n}", read_json(line, f"{path}, line {n}"))
                for n, line in enumerate(f, 1) if line.strip()]


def read_json_array(path: Path) -> list[tuple[str, object]]:
    """(location, item) of each item of a JSON array."""
    data = read_json(path.read_text(encoding="utf-8"), str(path))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array")
    return [(f"{path}, item {i}", x) for i, x in enumerate(data)]


def read_appended(path: Path) -> list[dict]:
    """Rows of a JSONL file written line by line; a last line cut by a hard kill is dropped from the file."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        path.write_text(text, encoding="utf-8")
    return [row for _, row in read_jsonl(path)]


def load_torch(path, fix: str):
    """torch.load of `path` on the CPU with weights_only (tensors, dicts, lists, numbers, strings: no code in the
    file runs); any failure (truncated, not a torch file, code in it) is one line, "<path> cannot be read
    (<reason>); <fix>"."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # whatever torch, pickle or zip raise on a bad file
        raise ValueError(f"{path} cannot be read ({_load_reason(e)}); {fix}") from None


def _load_reason(e: Exception) -> str:  # torch.load's error in a few words
    code = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    if code:
        return f"it holds code ({code.group(1)}), which is never run"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    first = str(e).strip().split("\n")[0].split(". ")[0][:120]
    return f"not a complete torch file: {first}" if first else "not a complete torch file"


def save_atomic(obj, path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file."""
    tmp = Path(f"{path}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
