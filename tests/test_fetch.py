"""Tests for fetch.py against a real HTTP server on 127.0.0.1, started here, that serves the
offline copy at the URLs of `fetch.FILES` (Distilling Step-by-Step's datasets.zip built here from it): a full
fetch the loaders then read, a re-fetch that downloads nothing, and each fault (wrong bytes, 404, a connection
closed mid-file, a dead port) a one-line error that leaves nothing half-written, followed by a fetch that works;
a copy cut short or edited after its download refused by the loaders, until the command they name fetches it
again; and the data directory: --data-dir, else MOLSAKI_DATA, else the cache."""

import hashlib
import io
import os
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from data import SPLITS, load_dataset, load_palm_rationales
from plumbing import fetch
from plumbing.fetch import DATASETS, FILES, DataUnavailable, ensure_files, files_of, resolve_data_dir

DATA = Path(os.environ.get("MOLSAKI_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"no data directory at {DATA}")


def sources(paths, entry=lambda member: member, replace=None) -> dict[str, bytes]:
    """URL path -> body serving the offline copies of `paths` (keys of FILES); a zip member is stored under
    `entry(member)` in its zip; `replace` (path -> bytes) serves other bytes for a file."""
    bodies, zips = {}, {}
    for p in paths:
        s = FILES[p]
        url = f"/{s.repo}/{s.commit}/{s.path}"
        body = (replace or {}).get(p) or (DATA / p).read_bytes()
        if s.member:
            zips.setdefault(url, {})[entry(s.member)] = body
        else:
            bodies[url] = body
    for url, members in zips.items():
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
            z.writestr(entry("datasets/esnli/esnli_test.json"), b"{}\n")  # a member no loader reads
            for name, body in members.items():
                z.writestr(name, body)
        bodies[url] = buf.getvalue()
    return bodies


def url_of(path: str) -> str:
    s = FILES[path]
    return f"/{s.repo}/{s.commit}/{s.path}"


class Server:
    """`files`: URL path -> body (else 404); `requests`: the paths asked for; a path in `cut` is answered with its
    full Content-Length but only half its body, then the connection closes."""

    def __init__(self):
        self.files, self.requests, self.cut = {}, [], set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if self.path in outer.cut else body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    s = Server()
    monkeypatch.setenv("MOLSAKI_DATA_URL", s.url)
    yield s
    s.close()


@pytest.fixture
def root(tmp_path):
    (tmp_path / "data").mkdir()
    return tmp_path / "data"


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def listing(root: Path) -> list[str]:  # every file under root, hidden ones included
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@needs_data
def test_table_matches_the_offline_copy():
    for path, s in FILES.items():
        assert sha256(DATA / path) == s.sha256, path
        assert s.dataset in SPLITS and len(s.commit) == 40 and int(s.commit, 16) >= 0
        assert s.member is None or (s.path == "datasets.zip" and s.member.startswith("datasets/"))
    assert DATASETS == tuple(SPLITS)  # the loaders' data sets, in their order
    assert sorted(p for name in SPLITS for p in files_of(name)) == sorted(FILES)
    assert "svamp/distilling_step_by_step/llm/train_CoT_1.json" in files_of("svamp")
    assert "commonsenseqa/distilling_step_by_step/cqa_test.json" in files_of("csqa")
    assert len(files_of("asdiv")) == 6
    with pytest.raises(ValueError, match="svamp"):
        files_of("mnist")


@needs_data
def test_full_fetch_is_what_the_loaders_read_and_a_refetch_downloads_nothing(server, root, capsys):
    server.files = sources(FILES)
    fetch.main(["--data-dir", str(root)])
    out = capsys.readouterr().out
    assert f"{len(FILES)} files downloaded" in out and "CC BY-NC 4.0" in out
    assert f"fetching svamp/distilling_step_by_step/svamp_test.json from {server.url}" in out
    assert listing(root) == sorted(FILES)
    assert sorted(server.requests) == sorted(server.files)  # each source once: the zip for svamp and csqa
    assert all(sha256(root / p) == s.sha256 for p, s in FILES.items())

    server.requests.clear()
    assert len(load_dataset("svamp", "test", root)) == 200
    assert len(load_palm_rationales("svamp", "train", root)) == 789
    assert len(load_palm_rationales("csqa", "test", root)) > 900
    for name, splits in SPLITS.items():
        for split in splits:
            assert load_dataset(name, split, root)
    assert server.requests == []  # FILES holds every file the loaders read

    fetch.main(["--data-dir", str(root)])
    assert "nothing downloaded" in capsys.readouterr().out
    assert server.requests == []

    (root / "singleeq" / "questions.json").write_text("[]")  # a local file with another SHA-256 is fetched again
    assert fetch.fetch(["singleeq", "gsm8k"], root) == 1
    assert "another SHA-256" in capsys.readouterr().out
    assert sha256(root / "singleeq" / "questions.json") == FILES["singleeq/questions.json"].sha256


@needs_data
@pytest.mark.parametrize("fault", ["wrong bytes", "404", "cut", "dead port"])
@pytest.mark.parametrize("name", ["singleeq", "svamp"])  # a plain file; members of the zip
def test_fault_leaves_nothing_half_written_then_a_fetch_completes(fault, name, server, root, monkeypatch):
    paths = files_of(name)
    bad = paths[0]
    server.files = sources(paths, replace={bad: b"[]\n"} if fault == "wrong bytes" else None)
    if fault == "404":
        del server.files[url_of(bad)]
    elif fault == "cut":
        server.cut.add(url_of(bad))
    elif fault == "dead port":
        monkeypatch.setenv("MOLSAKI_DATA_URL", dead_url())
    with pytest.raises(DataUnavailable) as err:
        fetch.fetch([name], root)
    message = str(err.value)
    assert "\n" not in message and bad in message and "--data-dir" in message and "MOLSAKI_DATA" in message
    if fault == "wrong bytes":
        assert FILES[bad].sha256 in message and hashlib.sha256(b"[]\n").hexdigest() in message
    else:
        assert f"`python -m plumbing.fetch {name} --data-dir {root}`" in message
        assert {"404": "HTTP 404", "cut": "closed after", "dead port": "refused"}[fault] in message
    assert listing(root) == []  # no file, no temporary file

    server.files, server.cut = sources(paths), set()
    monkeypatch.setenv("MOLSAKI_DATA_URL", server.url)
    assert fetch.fetch([name], root) == len(paths)
    assert listing(root) == sorted(paths)
    assert all(sha256(root / p) == FILES[p].sha256 for p in paths)


@needs_data
@pytest.mark.parametrize("entry", [lambda m: "distilling-step-by-step-main/" + m,  # the zip's layout
                                   lambda m: m.removeprefix("datasets/")], ids=["below a folder", "no datasets/"])
def test_loaders_fetch_a_missing_file_on_first_use(entry, server, root, monkeypatch, capsys):
    monkeypatch.setenv("MOLSAKI_DATA", str(root))
    server.files = sources(files_of("singleeq") + files_of("svamp"), entry)
    assert len(load_dataset("singleeq", "test", None)) == 508
    out = capsys.readouterr().out
    assert f"fetching singleeq/questions.json from {server.url}/kojima-takeshi188/zero_shot_cot/" in out
    assert len(server.requests) == 1
    assert len(load_palm_rationales("svamp", "test", None)) > 100
    assert len(server.requests) == 2
    assert listing(root) == sorted(files_of("singleeq") + files_of("svamp"))  # the zip's other svamp files too
    assert len(load_dataset("svamp", "train", None)) == 800
    assert ensure_files(root, files_of("svamp")) == 0 and len(server.requests) == 2


def first_100(path: Path) -> None:  # a JSONL file cut to its first 100 records
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:100]))


def half(path: Path) -> None:  # the first half of its bytes
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit(path: Path) -> None:  # nluds-0001's answer 9 -> 8: same size, another SHA-256
    text = path.read_bytes()
    path.write_bytes(text.replace(b"<Answer>9 (apples)</Answer>", b"<Answer>8 (apples)</Answer>", 1))


@needs_data
@pytest.mark.parametrize("name, path, change, read, count", [
    ("svamp", "svamp/distilling_step_by_step/svamp_test.json", first_100, lambda r: load_dataset("svamp", "test", r),
     200),
    ("asdiv", "asdiv/ASDiv.xml", edit, lambda r: load_dataset("asdiv", "test", r), 1218),
    ("svamp", "svamp/distilling_step_by_step/llm/test_CoT_0.json", half,
     lambda r: load_palm_rationales("svamp", "test", r), 198),
], ids=["split cut short", "answer edited", "PaLM file cut short"])
def test_loader_refuses_a_changed_file_and_the_command_it_names_restores_it(name, path, change, read, count, server,
                                                                            root, capsys):
    for p in files_of(name):  # an intact offline copy: read, nothing fetched
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_bytes((DATA / p).read_bytes())
    assert len(read(root)) == count
    change(root / path)
    changed = (root / path).read_bytes()
    assert changed != (DATA / path).read_bytes()
    with pytest.raises(DataUnavailable) as err:
        read(root)
    message = str(err.value)
    command = f"python -m plumbing.fetch {name} --data-dir {root}"
    assert "\n" not in message and str(root / path) in message and f"`{command}`" in message
    assert sha256(root / path) in message and FILES[path].sha256 in message
    assert (root / path).read_bytes() == changed and server.requests == []  # refused as it is, nothing fetched

    server.files = sources(files_of(name))
    fetch.main(command.split()[3:])  # the command of the message
    assert "another SHA-256: fetching it again" in capsys.readouterr().out
    assert sha256(root / path) == FILES[path].sha256 and len(read(root)) == count


def test_loader_without_network_raises_one_line(root, monkeypatch):
    monkeypatch.setenv("MOLSAKI_DATA", str(root))
    monkeypatch.setenv("MOLSAKI_DATA_URL", dead_url())
    with pytest.raises(DataUnavailable) as err:
        load_dataset("gsm8k", "test", None)
    message = str(err.value)
    assert isinstance(err.value, RuntimeError) and "\n" not in message
    assert "gsm8k/test.jsonl" in message and "`python -m plumbing.fetch gsm8k`" in message
    assert "--data-dir" in message and "MOLSAKI_DATA" in message and "offline copy" in message
    assert listing(root) == []


def test_command_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        fetch.main(["svamp", "mnist"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: unknown data set 'mnist'") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_:
        fetch.main(["singleeq", "--data-dir", str(tmp_path / "nope")])
    assert exit_.value.code == 2 and capsys.readouterr().err.startswith("error: data directory")


def test_missing_data_dir_message(tmp_path, monkeypatch):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="--data-dir") as err:
        resolve_data_dir(missing)
    assert "MOLSAKI_DATA" in str(err.value) and str(missing) in str(err.value)
    monkeypatch.delenv("MOLSAKI_DATA", raising=False)
    monkeypatch.setattr(fetch, "CACHE", tmp_path / "cache" / "molsaki" / "data")
    assert resolve_data_dir(None) == tmp_path / "cache" / "molsaki" / "data" and fetch.CACHE.is_dir()  # created
    monkeypatch.setenv("MOLSAKI_DATA", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
