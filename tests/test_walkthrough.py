"""walkthrough.py on the tiny models (conftest): every number it prints equals the module functions' result on an
independent oracle (eager attention probabilities, value states from v_proj hooks, eager logits) to the printed
precision, its A_t is eager stepwise attention, the loss it prints is one call of train.step on data.features of the
example (and block 7's L_att, by the equation functions, is that call's), and the command line reads a SVAMP item
with its PaLM rationale (skipped without the data)."""

import os
import re
from pathlib import Path

import pytest
import torch

import attention
import capture
import data
import losses
import mol
import spans
import train
import walkthrough
from plumbing import flags, models, problems
from teacher import build_attention_cache, split_answer

TOL = 6e-5  # 4 decimals printed: half a unit of the last digit, plus float noise
DATA = Path(os.environ.get("MOLSAKI_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_data = pytest.mark.skipif(not (DATA / "svamp").is_dir(), reason=f"no SVAMP data at {DATA}")


class RandomRouter(mol.StudentRouter):
    """A router with random w, b and norm weight, so that p_s depends on the value states (a fresh one is uniform)."""

    def __init__(self, dim, n_layers, tau2=0.5):
        super().__init__(dim, n_layers, tau2)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.proj.weight.copy_(0.05 * torch.randn(self.proj.weight.shape, generator=g))
            self.bias.copy_(torch.randn(n_layers, generator=g))
            self.norm.weight.copy_(1 + 0.1 * torch.randn(dim, generator=g))


@pytest.fixture(scope="module")
def example():
    p = problems.make_problems(1, seed=0)[0]  # 6 steps, 9 numbers
    return dict(p, rationale=split_answer(p["rationale"])[0])


@pytest.fixture(scope="module")
def loaded(tiny_teacher_dir, tiny_student_dir):
    return (*models.load_model(tiny_teacher_dir, attn_implementation=capture.register()),
            *models.load_model(tiny_student_dir, attn_implementation=capture.register()))


@pytest.fixture(scope="module")
def steps_run():
    """(args, kwargs, (loss, parts)) of every train.step call the walk makes."""
    return []


@pytest.fixture(scope="module")
def walked(loaded, example, steps_run):
    real_step = train.step

    def spy(*args, **kwargs):
        out = real_step(*args, **kwargs)
        steps_run.append((args, kwargs, out))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mol, "StudentRouter", RandomRouter)
        mp.setattr(train, "step", spy)
        w = walkthrough.walk(*loaded, example)
    return w, walkthrough.report(w)


@pytest.fixture(scope="module")
def oracle(tiny_teacher_dir, tiny_student_dir, example, walked):
    """Every quantity again, from eager attention probabilities (output_attentions) and v_proj outputs."""
    teacher, t_tok = models.load_model(tiny_teacher_dir, attn_implementation="eager")
    student, s_tok = models.load_model(tiny_student_dir, attn_implementation="eager")
    text, steps, words = spans.example_spans(example["question"], example["rationale"], data.EXP_PROMPT)
    t_ids, t_st, t_wt = spans.encode(t_tok, text, steps, words)
    s_ids, s_st, s_wt = spans.encode(s_tok, text, steps, words)
    keep_s, keep_w = spans.align(t_st, s_st), spans.align(t_wt, s_wt)
    pre_ids, pre_labels = data.task_ids(s_tok, data.PRE_PROMPT.format(question=example["question"]),
                                        " " + example["answer"], 512)
    exp_ids, exp_labels = data.task_ids(s_tok, data.EXP_PROMPT.format(question=example["question"]),
                                        " " + example["rationale"], 512)
    assert exp_ids[:-1] == s_ids  # the L_exp input is the text + EOS

    def stepwise(out, st, wt):  # [L, S, W] from the eager probabilities [1, H, N, N] of each layer
        return torch.stack([attention.stepwise_attention(P[0], [st[k] for k in keep_s], [wt[k] for k in keep_w])
                            for P in out.attentions])

    values = []
    hooks = [layer.self_attn.v_proj.register_forward_hook(lambda m, i, o: values.append(o[0]))
             for layer in student.model.layers]
    with torch.no_grad():
        A_t_layers = stepwise(teacher(torch.tensor([t_ids]), output_attentions=True), t_st, t_wt)
        exp = student(torch.tensor([exp_ids]), output_attentions=True)
        for h in hooks:
            h.remove()
        A_s_layers = stepwise(exp, s_st, s_wt)
        l_exp = losses.target_cross_entropy(exp.logits, torch.tensor([exp_labels]))
        l_pre = losses.target_cross_entropy(student(torch.tensor([pre_ids])).logits, torch.tensor([pre_labels]))
        p_t = mol.teacher_layer_weights(A_t_layers, 0.1)
        p_s = walked[0]["router"](torch.stack(values))  # [L2, N, d]: the value states as the attention gets them
    A_t, A_s = mol.mix_layers(A_t_layers, p_t), mol.mix_layers(A_s_layers, p_s)
    soft_t, soft_s = A_t.softmax(-1), A_s.softmax(-1)
    kl = (soft_t * (soft_t.log() - soft_s.log())).sum(-1)  # [S], KL per step written out
    l_att = losses.stepwise_kl(A_t, A_s)
    return {"groups_s": ([s_st[k] for k in keep_s], [s_wt[k] for k in keep_w]), "A_t_layers": A_t_layers,
            "A_s_layers": A_s_layers, "G": mol.column_gradient(A_t_layers), "p_t": p_t, "p_s": p_s, "A_t": A_t,
            "A_s": A_s, "soft_t": soft_t, "soft_s": soft_s, "kl_steps": kl, "l_att": l_att, "l_pre": l_pre,
            "l_exp": l_exp, "total": losses.total_loss(l_pre, l_exp, l_att, 0.5, 1.0)}


def blocks(report):
    """{n: lines of block n}, from its '== n. ... ==' header to the next one."""
    parts = re.split(r"^== (\d+)\. .* ==$", report, flags=re.M)
    return {int(n): body.splitlines() for n, body in zip(parts[1::2], parts[2::2], strict=True)}


def row(lines, label):
    """The numbers of every indented row labelled `label`, joined (long rows wrap)."""
    return torch.tensor([float(x) for line in lines if line.startswith(f"  {label} ") for x in line.split()[1:]])


def table(lines, title):
    """(S, W) and the printed values (at most ROWS x COLS) of the table titled `title`."""
    i = next(k for k, line in enumerate(lines) if line.startswith(title + " ["))
    shape = tuple(map(int, re.search(r"\[(\d+) x (\d+)\]:$", lines[i]).groups()))
    values = []
    for line in lines[i + 2:]:
        if not re.match(r"s\d+ ", line):
            break
        values.append([float(x) for x in line.split()[1:]])
    return shape, torch.tensor(values)


def number(lines, label):
    """The last number of the line that starts with `label =`."""
    line = next(line for line in lines if line.strip().startswith(label + " ="))
    return float(line.split("=")[-1].split()[0])


def close(printed, expected):
    assert printed.shape == expected.shape, (printed.shape, expected.shape)
    assert (printed - expected).abs().max().item() <= TOL, (printed, expected)


def test_A_t_and_A_s_equal_eager_stepwise_attention(walked, oracle):
    w = walked[0]
    assert w["groups_s"] == oracle["groups_s"]
    torch.testing.assert_close(w["A_t_layers"], oracle["A_t_layers"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w["A_s_layers"], oracle["A_s_layers"], atol=1e-5, rtol=1e-4)


def test_headers_name_the_equation_and_the_function(walked):
    report = walked[1]
    headers = [line for line in report.splitlines() if line.startswith("== ")]
    assert len(headers) == 8
    for n, names in enumerate([("Text layout (docs/design.md)", "data.EXP_PROMPT"),
                               ("Eq. 2/3", "spans.example_spans"), ("App. C.2", "spans.token_groups"),
                               ("Eq. 2", "teacher.build_attention_cache", "capture.capture"),
                               ("Eq. 4", "mol.column_gradient", "mol.teacher_layer_weights"),
                               ("Eq. 5", "mol.StudentRouter", "train.step"),
                               ("Eq. 6", "mol.mix_layers", "losses.stepwise_kl"),
                               ("Eq. 7", "train.step", "data.features", "losses.target_cross_entropy",
                                "losses.total_loss")]):
        assert headers[n].startswith(f"== {n + 1}. ") and all(name in headers[n] for name in names), headers[n]


def test_printed_numbers_equal_the_oracle(walked, oracle):
    w, report = walked
    b = blocks(report)
    S, W = oracle["A_t"].shape
    assert (S, W) == (6, 9)
    for k, (a, z) in enumerate(w["words"]):  # block 2: the spans with their substrings
        assert f"  w{k:<3} [{a}, {z})  {w['text'][a:z]!r}" in b[2]
    owned = [tuple(map(int, re.search(r"owns \[(\d+), (\d+)\)$", line).groups())) for line in b[2]
             if line.startswith("  s")]
    assert len(owned) == len(w["steps"]) and owned[0][0] == 0 and owned[-1][1] == len(w["text"])
    for (a, z), (c, d), nxt in zip(w["steps"], owned, owned[1:] + [(len(w["text"]), None)], strict=True):
        assert c <= a < z <= d == nxt[0]  # the tiles cover the text without gaps, each around its sentence
    assert f"A_t and A_s are both [S, W] = [{S}, {W}]" in "\n".join(b[3])
    L1 = len(oracle["p_t"])
    for layer in (0, L1 - 1):
        shape, printed = table(b[4], f"A_t, layer {layer + 1}")
        assert shape == (S, W)
        close(printed, oracle["A_t_layers"][layer])
    assert not any(line.startswith("(cut") for line in report.splitlines())
    close(row(b[5], "G"), oracle["G"])
    close(row(b[5], "p_t"), oracle["p_t"])
    close(row(b[6], "p_s"), oracle["p_s"])
    assert row(b[6], "p_s").std() > 1e-3  # the random router: p_s is not uniform
    for title, key in (("A_t = sum_l p_t[l] A_t_l", "A_t"), ("A_s = sum_l p_s[l] A_s_l", "A_s"),
                       ("softmax(A_t[i])", "soft_t"), ("softmax(A_s[i])", "soft_s")):
        shape, printed = table(b[7], title)
        assert shape == (S, W)
        close(printed, oracle[key])
    close(row(b[7], "KL"), oracle["kl_steps"])
    for n, label, key in ((7, "L_att", "l_att"), (8, "L_pre", "l_pre"), (8, "L_exp", "l_exp"),
                          (8, "L_att", "l_att"), (8, "L", "total")):
        close(torch.tensor(number(b[n], label)), oracle[key])


def test_wide_tables_are_cut_and_say_so(walked, oracle, monkeypatch):
    monkeypatch.setattr(walkthrough, "ROWS", 4)
    monkeypatch.setattr(walkthrough, "COLS", 5)
    b = blocks(walkthrough.report(walked[0]))
    shape, printed = table(b[7], "softmax(A_s[i])")
    assert shape == (6, 9)
    close(printed, oracle["soft_s"][:4, :5])
    assert b[4].count("(cut: the first 4 of 6 steps and 5 of 9 words shown)") == 2
    assert b[7].count("(cut: the first 4 of 6 steps and 5 of 9 words shown)") == 4


def test_the_loss_is_one_call_of_train_step(loaded, example, walked, steps_run):
    """walk calls train.step once, on data.features and data.collate of the example over teacher.build_attention_cache,
    with train.py's flags; block 8 prints that call's parts, and block 7's L_att (the equation functions on the
    cached A_t and the step's A_s and p_s) equals the step's L_att. The same call with capture.capture itself as
    read_attention gives the same parts."""
    teacher, t_tok, student, s_tok = loaded
    w = walked[0]
    assert len(steps_run) == 1
    (lm, router, batch), kwargs, (loss, parts) = steps_run[0]
    assert lm is student and router is w["router"]
    args = flags.parse_args([])  # molsaki, alpha 0.5, beta 1, tau1 0.1, tau2 0.5, 512
    assert kwargs.keys() == {*train.objective(args), "read_attention"}
    assert {k: v for k, v in kwargs.items() if k != "read_attention"} == train.objective(args)
    cache = build_attention_cache(teacher, t_tok, [example], {"delimiters": args.delimiters}, args.max_length)
    torch.testing.assert_close(w["cache"]["items"], cache["items"], rtol=0, atol=0)
    f = train.features(args, [example], s_tok, cache)[0]
    assert f.keys() == w["feature"].keys()
    for key, value in f.items():
        assert torch.equal(value, w["feature"][key]) if torch.is_tensor(value) else value == w["feature"][key], key
    expected = data.collate([f], s_tok.pad_token_id)
    assert batch.keys() == expected.keys()
    assert batch["ids"] == expected["ids"] and batch["groups"] == expected["groups"]
    for key in batch.keys() - {"ids", "groups"}:  # the padded tensors, and the list A_t
        torch.testing.assert_close(batch[key], expected[key], rtol=0, atol=0)
    assert f["groups"] == w["groups_s"]
    torch.testing.assert_close(f["A_t"], w["A_t_layers"])  # the cached A_t of the kept steps and words: walk's
    torch.testing.assert_close(parts["p_t"], w["p_t"])  # the step's Eq. 4: walk's, by the equation functions
    assert w["step"].keys() == parts.keys()
    for key, value in parts.items():
        torch.testing.assert_close(w["step"][key], value.float().cpu(), rtol=0, atol=0)
    assert w["step"]["loss"].item() == loss.item()
    torch.testing.assert_close(w["l_att"], w["step"]["att"])  # Eq. 6 term by term = the step's L_att
    torch.testing.assert_close(w["kl_steps"].mean(), w["step"]["att"])
    torch.testing.assert_close(w["step"]["loss"], losses.total_loss(w["step"]["pre"], w["step"]["exp"],
                                                                   w["step"]["att"], 0.5, 1.0))
    with torch.no_grad():
        _, again = train.step(student, w["router"], expected, **train.objective(args))  # capture.capture
    for key, value in again.items():
        torch.testing.assert_close(value, parts[key])


@needs_data
def test_svamp_example_has_the_palm_rationale_without_its_answer():
    e = walkthrough.svamp_example("svamp-train-0", DATA)
    assert e["id"] == "svamp-train-0" and e["answer"] == "42"
    assert e["rationale"].startswith("Luke scored 84 points") and "answer is" not in e["rationale"]
    with pytest.raises(ValueError, match="not a SVAMP train id"):
        walkthrough.svamp_example("svamp-train-100000", DATA)


@needs_data
def test_command_line(tiny_teacher_dir, tiny_student_dir, capsys):
    walkthrough.main(["--teacher", tiny_teacher_dir, "--student", tiny_student_dir, "--data-dir", str(DATA)])
    out = capsys.readouterr().out
    assert "svamp-train-0, gold answer a = 42" in out and "  L = 0.5 * L_pre" in out
    with pytest.raises(SystemExit) as e:
        walkthrough.main(["--example", "svamp-train-x", "--data-dir", str(DATA)])
    assert e.value.code == 2 and "not a SVAMP train id" in capsys.readouterr().err
