"""Tests for plots.py: every figure is drawn from a tiny run (MoL and the --layer-map ablation) as a real, non-blank
PNG, with p_s from the saved router or one-hot; the App. B.1 means match a hand example and, on a tiny model, the
capture route of Eq. 2/3; a run's saved flags rebuild the same arguments; a missing matplotlib is a clear error,
and so is a run file with code in it, which never runs."""

import math
import signal
import sys
from pathlib import Path

import pytest
import torch

mpimg = pytest.importorskip("matplotlib.image")

import capture  # noqa: E402
import spans  # noqa: E402
import train  # noqa: E402
from experiments import plots  # noqa: E402
from plumbing import flags, models, problems  # noqa: E402

FIGURES = ["heatmap", "teacher_layers", "column_gradient", "layer_weights", "router_over_steps", "numeric_share",
           "losses"]


def tiny_run(teacher, student, out, *extra):
    handler = signal.getsignal(signal.SIGTERM)  # train.main turns SIGTERM into KeyboardInterrupt
    try:
        train.main(["--teacher", teacher, "--student", student, "--data", "builtin", "--n-train", "8",
                    "--batch-size", "4", "--max-steps", "3", "--lr", "3e-3", "--eval-sets", "", "--out", str(out),
                    *extra])
    finally:
        signal.signal(signal.SIGTERM, handler)
    return out


@pytest.mark.parametrize("extra", [(), ("--layer-map", "2:1")], ids=["mol", "layer-map"])
def test_draws_every_figure(extra, tiny_teacher_dir, tiny_student_dir, tmp_path, capsys):
    run = tiny_run(tiny_teacher_dir, tiny_student_dir, tmp_path / "run", *extra)
    paths = plots.main([str(run)])
    assert [p.name for p in paths] == [f"{name}.png" for name in FIGURES]
    printed = capsys.readouterr().out
    for name in FIGURES:
        path = run / "figures" / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert str(path) in printed
        image = mpimg.imread(path)[..., :3]  # [H, W, RGB] in [0, 1]
        assert image.std() > 0.02, f"{name} looks blank"
        assert (image.min(-1) < 0.9).mean() > 0.005, f"{name} is almost all white"
    args, state, *_ = plots.load_run(run)
    values = torch.randn(3, 5, 16)  # [L2, N, d]: the tiny student has 3 layers, 2 kv heads x 8 dims
    p_s = plots.student_weights(args, state, values, n_teacher=3)
    if extra:  # the SL ablation: student layer 1 only
        assert torch.equal(p_s, torch.tensor([1.0, 0.0, 0.0]))
    else:  # the saved router: a distribution that depends on the values
        assert p_s.sum().item() == pytest.approx(1.0) and not torch.allclose(p_s, plots.student_weights(
            args, state, torch.randn(3, 5, 16), n_teacher=3))


def test_numeric_share_hand_example():
    P = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                      [0.5, 0.5, 0.0, 0.0],
                      [0.2, 0.3, 0.5, 0.0],
                      [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    # step 0 = token 1 sees critical token 1 only (0.5) and no other token; step 1 = tokens 2, 3 see token 1
    # (0.3, 0.2) and the other tokens (2, 2) 0.5, (3, 2) 0.3, (3, 3) 0.4; token 0 is in neither set.
    m = plots.numeric_share(P, [[1], [2, 3]], [1], [2, 3])
    assert m[0, 0].item() == pytest.approx(0.5) and math.isnan(m[0, 1].item())
    assert m[1].tolist() == pytest.approx([0.25, 0.4])
    assert plots.numeric_share(P, [[]], [1], [2, 3]).isnan().all()  # a step no model kept


def test_critical_attention_matches_capture(tiny_student_dir):
    """Sum over the visible critical pairs of the layer-mean eager P = sum over words of the layer-mean A (Eq. 3)."""
    model, tok = models.load_model(tiny_student_dir, attn_implementation=capture.register())
    e = problems.make_problems(1, seed=3)[0]
    text, steps, words = spans.example_spans(e["question"], e["rationale"], plots.data.EXP_PROMPT)
    ids, st, wt = spans.encode(tok, text, steps, words, 256)
    with torch.no_grad(), capture.capture(model, [([st[k] for k in sorted(st)], [wt[k] for k in sorted(wt)])]) as cap:
        model(torch.tensor([ids]))
    expected = cap.stepwise()[0].mean(0).sum(-1)  # [S]: layer-mean A summed over the words
    m = plots.critical_attention(model, tok, text, steps, words, 256)
    critical = sorted({t for tokens in wt.values() for t in tokens})
    assert 0 not in critical and len(st) == len(steps) >= 2
    for s, k in enumerate(sorted(st)):
        pairs = sum(j <= i for i in st[k] for j in critical)
        got = m[k, 0].item() * pairs if pairs else 0.0
        assert got == pytest.approx(expected[s].item(), abs=1e-5), s
        assert 0 < m[k, 1].item() < 1


def test_run_argv_rebuilds_the_arguments(tmp_path):
    args = flags.parse_args(["--teacher", "t", "--student", "s", "--layer-map", "2:1", "--eval-sets", "",
                            "--tau2", "1.0", "--max-steps", "7", "--out", "old/place"])
    saved = {k: str(v) for k, v in vars(args).items()}  # as rundir.save_checkpoint writes them
    again = flags.parse_args(plots.run_argv(saved, tmp_path))
    assert vars(again) == dict(vars(args), out=tmp_path)
    with_data = flags.parse_args(plots.run_argv(saved, tmp_path, data_dir="/data"))
    assert with_data.data_dir == "/data"


class Touch:
    """Unpickled without weights_only, it creates the file `path`: code that runs from a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


@pytest.mark.parametrize("bad", ["checkpoint/trainer_state.pt", "teacher_cache.pt"])
def test_a_run_file_with_code_in_it_is_refused_and_never_run(bad, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    args = flags.parse_args(["--method", "molsaki", "--out", str(run)])
    files = {"checkpoint/trainer_state.pt": {"args": {k: str(v) for k, v in vars(args).items()}},
             "teacher_cache.pt": {"meta": {}, "items": {}}}
    files[bad] = dict(files[bad], payload=Touch(tmp_path / "pwned"))
    for name, obj in files.items():
        torch.save(obj, run / name)
    with pytest.raises(ValueError, match=f"^{run / bad} cannot be read \\(it holds code"):
        plots.load_run(run)
    with pytest.raises(SystemExit) as exit_:
        plots.main([str(run)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(f"error: {run / bad} cannot be read") and err.count("\n") == 1
    assert not (tmp_path / "pwned").exists()


def test_missing_matplotlib_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plots._pyplot()
