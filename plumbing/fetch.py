"""Data files: every file the loaders of data.py read, downloaded from its public source and checked.

    python -m plumbing.fetch [NAME ...] [--data-dir DIR]   # the named data sets, no NAME: all

No paper equation lives here. Each file is a byte-for-byte copy of one file of a public GitHub repository at a
named commit, verified by its SHA-256 (`FILES` names repository, commit, path and hash of each):
    google-research/distilling-step-by-step @ ef94426  SVAMP's DSS split, CSQA's DSS order, the PaLM-540B CoT
                                                       (members of its datasets.zip, one download for all)
    openai/grade-school-math @ 3101c7d                 GSM8K
    chaochun/nlu-asdiv-dataset @ 883f90a               ASDiv, ASDiv-A's folds (CC BY-NC 4.0: its fetch says so)
    kojima-takeshi188/zero_shot_cot @ 5ef330f          copies of SingleEq and the official CommonsenseQA files

The data directory is --data-dir, else $MOLSAKI_DATA (either must exist), else ~/.cache/molsaki/data (created).
data.py's loaders fetch a missing file on first use and check a file's SHA-256 whenever they read it, so one cut
short or edited since is caught (hashing all 30 files takes about 20 ms, so nothing is memoized). A file comes from
`$MOLSAKI_DATA_URL` (default https://raw.githubusercontent.com) `/OWNER/REPO/COMMIT/PATH`, is written under a
temporary name and renamed only if its SHA-256 is right. No network, an HTTP error, a short body or another SHA-256
is `DataUnavailable`: a one-line message naming the command that fetches the file. On the command line, that error,
a wrong flag or name, or a missing --data-dir is one line, `error: ...`, and exit status 2.
"""

import argparse
import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from plumbing import cli

CACHE = Path.home() / ".cache" / "molsaki" / "data"  # the data directory without --data-dir or MOLSAKI_DATA


def resolve_data_dir(path: str | Path | None) -> Path:
    """The data directory: `path` (the --data-dir flag), else env MOLSAKI_DATA (either must exist), else
    ~/.cache/molsaki/data (created here). data.py's loaders fetch a file missing from it on first use."""
    path = path or os.environ.get("MOLSAKI_DATA")
    if not path:
        CACHE.mkdir(parents=True, exist_ok=True)
        return CACHE
    if not Path(path).is_dir():
        raise FileNotFoundError(f"data directory {path} not found: pass --data-dir or set MOLSAKI_DATA to an "
                                f"existing folder, or neither to use {CACHE}")
    return Path(path)


DATA_URL = "https://raw.githubusercontent.com"  # env MOLSAKI_DATA_URL replaces it; a file: BASE/OWNER/REPO/COMMIT/PATH
TIMEOUT = 60  # seconds a download may wait for the server


class Source(NamedTuple):
    """One file's origin (the values of `FILES`)."""

    dataset: str  # its name in data.SPLITS
    repo: str  # owner/name on GitHub
    commit: str
    path: str  # in the repository
    member: str | None  # the file inside the zip at `path`, by its path from "datasets/" (a leading folder is ok)
    sha256: str  # of the file (of the member, for a zip)


_DSS = ("google-research/distilling-step-by-step", "ef944263c9ddfd40a9888557f3e7d17513fd1a7e", "datasets.zip")
_GSM8K = ("openai/grade-school-math", "3101c7d5072418e28b9008a6636bde82a006892c")
_ASDIV = ("chaochun/nlu-asdiv-dataset", "883f90a9a65bf00304ba8f37423910fe743abc47")
_ZS_COT = ("kojima-takeshi188/zero_shot_cot", "5ef330fcdeec0cd26aee27943504f91f8ec1c33c")  # copies of SingleEq, CSQA
FILES = {  # path in the data directory (the layout the loaders read) -> its source
    "svamp/distilling_step_by_step/svamp_train.json":
        Source("svamp", *_DSS, "datasets/svamp/svamp_train.json",
               "641fc0f69864e1376fc2e29675affd15fa641f3b40279dcd6a595f3780f4e721"),
    "svamp/distilling_step_by_step/svamp_test.json":
        Source("svamp", *_DSS, "datasets/svamp/svamp_test.json",
               "b73cba2c53b1e9b1c8aa512a8928c12d0524d1acba560f8c526756185044054c"),
    "svamp/distilling_step_by_step/llm/train_CoT_0.json":
        Source("svamp", *_DSS, "datasets/svamp/llm/train_CoT_0.json",
               "9aa813b5653131e53bfe0477fa2cb3f90fb3d1b7a5226433218cb7b85998f094"),
    "svamp/distilling_step_by_step/llm/train_CoT_1.json":
        Source("svamp", *_DSS, "datasets/svamp/llm/train_CoT_1.json",
               "db0131252436d0487ff8642d94abad23636c080258da60097d5c6f15b1e32639"),
    "svamp/distilling_step_by_step/llm/test_CoT_0.json":
        Source("svamp", *_DSS, "datasets/svamp/llm/test_CoT_0.json",
               "fd536719c09b0cc97bfeee5775b212f8e4541ffe012bcd99c893a99e7e46df37"),
    "gsm8k/train.jsonl":
        Source("gsm8k", *_GSM8K, "grade_school_math/data/train.jsonl", None,
               "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"),
    "gsm8k/test.jsonl":
        Source("gsm8k", *_GSM8K, "grade_school_math/data/test.jsonl", None,
               "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"),
    "asdiv/ASDiv.xml":
        Source("asdiv", *_ASDIV, "dataset/ASDiv.xml", None,
               "ef8904068482919ac48c8eeaaf6df344b8a308ba66d048c2d4d87eab82dc4929"),
    "asdiv/nfolds/asdiv-a/fold0.txt":
        Source("asdiv", *_ASDIV, "dataset/nfolds/asdiv-a/fold0.txt", None,
               "1e4e8c670e461e9d59beee13e64e28d7f92e3be8ba6766d3bbeb40818e03e8d6"),
    "asdiv/nfolds/asdiv-a/fold1.txt":
        Source("asdiv", *_ASDIV, "dataset/nfolds/asdiv-a/fold1.txt", None,
               "81bb372c89696d8d0a253d8ac73500208a801c35670112d682c2f2306ef35fd2"),
    "asdiv/nfolds/asdiv-a/fold2.txt":
        Source("asdiv", *_ASDIV, "dataset/nfolds/asdiv-a/fold2.txt", None,
               "56ffc96a9eead77224f782d7c4c84205c21079b3588b08e4a68d2deabf50febc"),
    "asdiv/nfolds/asdiv-a/fold3.txt":
        Source("asdiv", *_ASDIV, "dataset/nfolds/asdiv-a/fold3.txt", None,
               "68733651260332fa6ae89155aa5e15d20a4b11833023712d0a9b2a2d06551e54"),
    "asdiv/nfolds/asdiv-a/fold4.txt":
        Source("asdiv", *_ASDIV, "dataset/nfolds/asdiv-a/fold4.txt", None,
               "103d2091eab4ee825e55353af817af006ddd2fee4948b0ef7fa1df0f6a33723b"),
    "singleeq/questions.json":
        Source("singleeq", *_ZS_COT, "dataset/SingleEq/questions.json", None,
               "051507bd2b489c257057b485774a83d2710c23a4bc0f4a58e1822ae2773ef05e"),
    "commonsenseqa/official/train_rand_split.jsonl":
        Source("csqa", *_ZS_COT, "dataset/CommonsenseQA/train_rand_split.jsonl", None,
               "58ffa3c8472410e24b8c43f423d89c8a003d8284698a6ed7874355dedd09a2fb"),
    "commonsenseqa/official/dev_rand_split.jsonl":
        Source("csqa", *_ZS_COT, "dataset/CommonsenseQA/dev_rand_split.jsonl", None,
               "3210497fdaae614ac085d9eb873dd7f4d49b6f965a93adadc803e1229fd8a02a"),
    "commonsenseqa/distilling_step_by_step/cqa_train.json":
        Source("csqa", *_DSS, "datasets/cqa/cqa_train.json",
               "09601f7b3239eb4c0a3be16c4b897d0c30905e9bc38cf36c77831d98bd37d9fb"),
    "commonsenseqa/distilling_step_by_step/cqa_test.json":
        Source("csqa", *_DSS, "datasets/cqa/cqa_test.json",
               "caf4f47b8afac62a80f0517e1af3eba2af11de0c7c6f3baf3742fb6390d99dfb"),
    "commonsenseqa/distilling_step_by_step/llm/train_CoT_0.json":
        Source("csqa", *_DSS, "datasets/cqa/llm/train_CoT_0.json",
               "632167edcb645336a0ff1194fe87a1821fefdb02515679d178b167619903fff1"),
    "commonsenseqa/distilling_step_by_step/llm/train_CoT_1.json":
        Source("csqa", *_DSS, "datasets/cqa/llm/train_CoT_1.json",
               "8d14f619696c2bf3f0989d3a47ee8120f047af4eddaf23eb64610941cb453796"),
    "commonsenseqa/distilling_step_by_step/llm/train_CoT_2.json":
        Source("csqa", *_DSS, "datasets/cqa/llm/train_CoT_2.json",
               "25e559368c7e69dba359245395463a669f2fcef91a3b7b89613ff41bed0fbd8f"),
    "commonsenseqa/distilling_step_by_step/llm/train_CoT_3.json":
        Source("csqa", *_DSS, "datasets/cqa/llm/train_CoT_3.json",
               "db2a50477c463dd84a4b7ee2dedae323ff8746f20ca0c4a4619c03e04140ddf5"),
    "commonsenseqa/distilling_step_by_step/llm/train_CoT_4.json":
        Source("csqa", *_DSS, "datasets/cqa/llm/train_CoT_4.json",
               "52ccbf961db874a47968599f8411372a39f280f91413df7d90bcbcea291b9836"),
    "commonsenseqa/distilling_step_by_step/llm/train_CoT_5.json":
        Source("csqa", *_DSS, "datasets/cqa/llm/train_CoT_5.json",
               "0d238b1c5c4be3630bf14c15a176985b4a2e7bcf5fa5a93d24e9d89ccde06974"),
    "commonsenseqa/distilling_step_by_step/llm/train_CoT_6.json":
        Source("csqa", *_DSS, "datasets/cqa/llm/train_CoT_6.json",
               "af81b051cefa61be0b513f9e002b9eeab7160c18731732b59138fede91fccee4"),
    "commonsenseqa/distilling_step_by_step/llm/train_CoT_7.json":
        Source("csqa", *_DSS, "datasets/cqa/llm/train_CoT_7.json",
               "0cd6eba4d2449fb295d66e3dd9998ab59f6246820ca07e0fd1cc61dfcc3e6b3d"),
    "commonsenseqa/distilling_step_by_step/llm/train_CoT_8.json":
        Source("csqa", *_DSS, "datasets/cqa/llm/train_CoT_8.json",
               "02c156f92540f7b2469d252c814a2a87dad47616f828db3e7e236edd72f21b61"),
    "commonsenseqa/distilling_step_by_step/llm/train_CoT_9.json":
        Source("csqa", *_DSS, "datasets/cqa/llm/train_CoT_9.json",
               "7448c4cd5a9416ccb1e0c021e2b3bf2e697dc70173ff6f08d5b64b56d5fe8038"),
    "commonsenseqa/distilling_step_by_step/llm/test_CoT_0.json":
        Source("csqa", *_DSS, "datasets/cqa/llm/test_CoT_0.json",
               "02860e4fa44b4c1f08ed29513abf74f433345e534c51418448b40869ed752a01"),
    "commonsenseqa/distilling_step_by_step/llm/test_CoT_1.json":
        Source("csqa", *_DSS, "datasets/cqa/llm/test_CoT_1.json",
               "44f1fc36088d5beed937c204ae43ca09d74fd0ea6a784fa89207b7e88c37fb15"),
}
DATASETS = tuple(dict.fromkeys(s.dataset for s in FILES.values()))  # the data sets, in FILES's order
_NOTICES = {"asdiv": "ASDiv is licensed CC BY-NC 4.0 (chaochun/nlu-asdiv-dataset): for non-commercial use only"}
_OFFLINE = "or point --data-dir or MOLSAKI_DATA at an offline copy of the data"  # the end of each error message


class DataUnavailable(RuntimeError):
    """A data file that is missing and cannot be fetched, or that has another SHA-256. One line."""


def files_of(name: str) -> list[str]:
    """Paths (relative to the data directory: keys of `FILES`) of the files the loaders of data set `name` read,
    PaLM's included."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; valid: {', '.join(DATASETS)}")
    return [path for path, s in FILES.items() if s.dataset == name]


def ensure_files(root: str | Path, paths: list[str]) -> int:
    """Fetch those of `paths` (keys of FILES) missing from `root`, and with a zip member the other missing files of
    its data set in that zip (one download); a file of `paths` already there with another SHA-256 (cut short,
    edited) is `DataUnavailable`. data.py's loaders call it before reading. Returns how many files were
    downloaded."""
    root = Path(root)
    missing = {p for p in paths if not (root / p).is_file()}
    for path in (p for p in paths if p not in missing):  # a downloaded file was checked as it was written
        if (got := sha256(root / path)) != FILES[path].sha256:
            raise DataUnavailable(f"data file {root / path} has SHA-256 {got}, not its source's "
                                  f"{FILES[path].sha256} (cut short or edited?); fetch it again with "
                                  f"`{_command(root, path)}`, {_OFFLINE}")
    zips = {(FILES[p].dataset, FILES[p].path) for p in missing if FILES[p].member}
    missing |= {p for p, s in FILES.items() if s.member and (s.dataset, s.path) in zips and not (root / p).is_file()}
    return _download(root, [p for p in FILES if p in missing])


def fetch(names: list[str], root: str | Path) -> int:
    """Every file of the data sets `names` into `root`: a file missing or with another SHA-256 is downloaded, the
    others are kept; returns how many were downloaded."""
    root = Path(root)
    todo = []
    for path in (p for name in names for p in files_of(name)):
        if (root / path).is_file() and sha256(root / path) == FILES[path].sha256:
            continue
        if (root / path).is_file():
            print(f"[data] {path} has another SHA-256: fetching it again")
        todo.append(path)
    return _download(root, todo)


def _download(root: Path, paths: list[str]) -> int:  # one request per source file (a zip's members together)
    groups = {}
    for p in paths:
        groups.setdefault(FILES[p][1:4], []).append(p)  # (repo, commit, path)
    for name in dict.fromkeys(FILES[p].dataset for p in paths):  # each licence notice once
        if name in _NOTICES:
            print(f"[data] {_NOTICES[name]}")
    for (repo, commit, path), group in groups.items():
        url = f"{os.environ.get('MOLSAKI_DATA_URL', DATA_URL).rstrip('/')}/{repo}/{commit}/{path}"
        for p in group:
            print(f"[data] fetching {p} from {url}" + (f" ({FILES[p].member})" if FILES[p].member else ""))
        try:
            if FILES[group[0]].member is None:
                with _verified(root, group[0], url) as out:
                    _get(url, out)
            else:
                _unzip(root, url, group)
        except (OSError, http.client.HTTPException, zipfile.BadZipFile) as e:
            what = group[0] if len(group) == 1 else f"{group[0]} (and {len(group) - 1} more)"
            raise DataUnavailable(f"data file {what} is missing from {root} and cannot be fetched from {url} "
                                  f"({_reason(e)}); fetch it with `{_command(root, group[0])}` once the source is "
                                  f"reachable, {_OFFLINE}") from None
    return len(paths)


def _get(url: str, out) -> None:
    """The body of `url` into the binary file `out`; a body shorter than its Content-Length is an error."""
    with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
        size, n = int(r.headers.get("Content-Length", -1)), 0
        while chunk := r.read(1 << 20):
            n += out.write(chunk)
    if size >= 0 and n != size:
        raise ConnectionError(f"the connection closed after {n} of {size} bytes")


def _unzip(root: Path, url: str, paths: list[str]) -> None:
    """Download the zip at `url` once and take the members of `paths` from it."""
    with tempfile.TemporaryFile(dir=root) as f:  # nameless: nothing is left behind
        _get(url, f)
        with zipfile.ZipFile(f) as z:
            for path in paths:
                entry = _entry(z, FILES[path].member)
                with _verified(root, path, f"{url} ({entry})") as out, z.open(entry) as src:
                    shutil.copyfileobj(src, out)


def _entry(z: zipfile.ZipFile, member: str) -> str:
    """The zip's entry for `member` ("datasets/svamp/..."): its path from "datasets/" may sit below any folder."""
    inside = member.removeprefix("datasets/")
    for entry in z.namelist():
        if entry == inside or entry.endswith("/" + inside):
            return entry
    raise zipfile.BadZipFile(f"the zip has no {member}")


@contextmanager
def _verified(root: Path, path: str, where: str):
    """A binary file to fill: on leaving, it becomes root/path if its SHA-256 is FILES's, else it is removed."""
    dest = root / path
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
        got, want = sha256(tmp), FILES[path].sha256
        if got != want:
            raise DataUnavailable(f"data file {path} fetched from {where} has SHA-256 {got}, expected {want}, so "
                                  f"it was not kept; try `{_command(root, path)}` again, {_OFFLINE}")
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _command(root: Path, path: str) -> str:  # the command that fetches `path` into `root`
    command = f"python -m plumbing.fetch {FILES[path].dataset}"
    if root != Path(os.environ.get("MOLSAKI_DATA") or CACHE):
        command += f" --data-dir {root}"
    return command


def sha256(path) -> str:
    """The hex SHA-256 of a file."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _reason(e: Exception) -> str:  # "HTTP 404 Not Found", "[Errno 111] Connection refused", "timed out", ...
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    return str(getattr(e, "reason", None) or e) or type(e).__name__


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.Parser(description="Download the data the loaders read: the files of the "
                                                 "named data sets (default: all), each checked by its SHA-256.")
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"a data set: {', '.join(DATASETS)}")
    parser.add_argument("--data-dir", default=None, help=f"default: $MOLSAKI_DATA, else {CACHE}")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in DATASETS]
    if unknown:
        parser.error(f"unknown data set {unknown[0]!r}; choose from {', '.join(DATASETS)}")
    return args


def main(argv=None) -> None:
    """`python -m plumbing.fetch [NAME ...] [--data-dir DIR]`: download the data sets (all without a NAME)."""
    args = parse_args(argv)
    try:
        root = resolve_data_dir(args.data_dir)
        n = fetch(args.names or list(DATASETS), root)
    except (DataUnavailable, FileNotFoundError) as e:
        cli.fail(e)
    print(f"[data] {n} files downloaded into {root}" if n else f"[data] nothing downloaded: every file is in {root}")


if __name__ == "__main__":
    main()
