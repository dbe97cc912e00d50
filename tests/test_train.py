"""Tests for train.py on tiny random models (conftest): each method learns the built-in problems, L_att
sends gradients to the router and the student's attention but never to the teacher, a NaN stops the run at the
last good checkpoint, checkpoints are swapped atomically, two gloo processes under torchrun match one process with
the same global batch, and `step` equals an oracle of Eq. 7. (Signals and resume: tests/test_rundir.py.)"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import capture
import data
import losses
import mol
import train
from plumbing import flags, models, problems

ROOT = Path(__file__).resolve().parents[1]


def argv(teacher, student, out, method, *extra, steps=30, lr=3e-3):
    return ["--teacher", teacher, "--student", student, "--data", "builtin", "--n-train", "16",
            "--batch-size", "4", "--max-steps", str(steps), "--lr", str(lr), "--eval-sets", "",
            "--method", method, "--out", str(out), *extra]


def read_log(out):
    return [json.loads(line) for line in open(Path(out) / "log.jsonl")]


def state(out, name="checkpoint"):
    return torch.load(Path(out) / name / "trainer_state.pt", weights_only=False)


def checkpoints(out):
    return sorted(p.name for p in Path(out).iterdir() if p.name.startswith("checkpoint"))


def flat(row):
    """The numbers of a log row (lists flattened), without the wall-clock time."""
    return {f"{k}{i}": x for k, v in row.items() if k != "sec"
            for i, x in enumerate(v if isinstance(v, list) else [v])}


# ---------------------------------------------------------------------------------------------
# 1. Every method learns: the 16 problems repeat every 4 steps, so the loss must fall.

CASES = {"vanilla": ("vanilla",), "dss": ("dss",), "mmi": ("mmi",), "molsaki": ("molsaki",),
         "sl-last": ("molsaki", "--layer-map", "last"), "sl-2:1": ("molsaki", "--layer-map", "2:1")}


@pytest.mark.parametrize("case", list(CASES))
def test_each_method_learns(case, tiny_teacher_dir, tiny_student_dir, tmp_path):
    method, *extra = CASES[case]
    train.main(argv(tiny_teacher_dir, tiny_student_dir, tmp_path, method, *extra))
    rows = read_log(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert all(math.isfinite(x) for r in rows for x in flat(r).values())
    first, last = (sum(r["loss"] for r in part) / 5 for part in (rows[:5], rows[-5:]))
    assert last < 0.85 * first, (first, last)

    keys = {"vanilla": set(), "dss": {"exp", "att", "mmi"}, "mmi": {"exp", "att", "mmi"},
            "molsaki": {"exp", "att", "mmi", "p_s", "p_t", "no_words"}}[method]
    assert set(rows[0]) == {"step", "lr", "sec", "loss", "pre"} | keys
    beta = {"mmi": 0.1, "molsaki": 1.0}.get(method, 0.0)
    for r in rows:  # Eq. 7 recomputed from the logged parts, with each method's default beta
        if method == "vanilla":
            assert r["loss"] == r["pre"]
        else:
            assert r["loss"] == pytest.approx(0.5 * r["pre"] + 0.5 * r["exp"] + beta * (r["att"] + r["mmi"]),
                                              rel=1e-5)
            assert (r["mmi"] > 0) == (method == "mmi") and (r["att"] > 0) == (method == "molsaki")
    if method == "molsaki":  # both tiny models have 3 layers; every built-in problem has numbers
        assert all(r["no_words"] == 0 for r in rows)
        for r in rows:
            assert len(r["p_s"]) == len(r["p_t"]) == 3
            assert sum(r["p_s"]) == pytest.approx(1, abs=1e-5) and sum(r["p_t"]) == pytest.approx(1, abs=1e-5)
        one_hot = {"last": ([0, 0, 1], [0, 0, 1]), "2:1": ([0, 1, 0], [1, 0, 0])}  # (teacher, student)
        if extra:
            assert all((r["p_t"], r["p_s"]) == one_hot[extra[1]] for r in rows)
    assert state(tmp_path)["step"] == 30 and checkpoints(tmp_path) == ["checkpoint"]


# ---------------------------------------------------------------------------------------------
# 2. Where L_att sends gradients.


def tiny_stage(args, teacher_dir):
    """The teacher (model, tokenizer), and the examples and (molsaki) teacher cache, as train.teacher_stage builds
    them."""
    args.out.mkdir(parents=True, exist_ok=True)
    teacher = models.load_model(teacher_dir, attn_implementation=capture.register())
    before = {k: v.clone() for k, v in teacher[0].state_dict().items()}
    examples = train.training_examples(args, lambda: teacher)
    cache = train.attention_cache(args, examples, lambda: teacher) if args.method == "molsaki" else None
    return teacher[0], before, examples, cache


def test_attention_loss_gradients(tiny_teacher_dir, tiny_student_dir, tmp_path):
    args = flags.parse_args(["--teacher", tiny_teacher_dir, "--student", tiny_student_dir, "--n-train", "4",
                           "--method", "molsaki", "--out", str(tmp_path)])
    teacher, before, examples, cache = tiny_stage(args, tiny_teacher_dir)
    student, tok = models.load_model(tiny_student_dir, attn_implementation=capture.register())
    feats = train.features(args, examples, tok, cache)
    torch.manual_seed(0)
    router = mol.StudentRouter(capture.value_dim(student.config), student.config.num_hidden_layers, args.tau2)
    with torch.no_grad():  # w = 0 at init gives the norm no gradient; a small w, as after a few steps
        router.proj.weight.normal_(0.0, 1e-3)
    batch = data.collate(feats, tok.pad_token_id)
    params = dict(student.named_parameters(), **{f"router.{n}": p for n, p in router.named_parameters()})

    def grads(beta):  # L_att's gradient is the difference of beta 1 and beta 0
        for p in params.values():
            p.grad = None
        loss, out = train.step(student, router, batch, **dict(train.objective(args), beta=beta))
        loss.backward()
        return out, {n: p.grad.clone() for n, p in params.items()}

    out, with_att = grads(1.0)
    assert out["att"] > 0 and out["no_words"] == 0
    grad = {n: g - grads(0.0)[1][n] for n, g in with_att.items()}  # exact: the same computation twice on CPU
    assert grad["router.norm.weight"].ne(0).all() and grad["router.proj.weight"].ne(0).all()
    for i in range(student.config.num_hidden_layers):
        for proj in ("q_proj", "k_proj"):
            assert grad[f"model.layers.{i}.self_attn.{proj}.weight"].abs().max() > 0
    # Nothing after the last layer's attention scores can change L_att: no gradient there.
    last = student.config.num_hidden_layers - 1
    for name in ("lm_head.weight", "model.norm.weight", f"model.layers.{last}.self_attn.o_proj.weight",
                 f"model.layers.{last}.mlp.down_proj.weight"):
        assert grad[name].abs().max() == 0, name
    # The teacher: no gradient, no change, and its cached target is a constant.
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert torch.equal(cache["items"][examples[0]["id"]]["A"],
                       train.attention_cache(args, examples, None)["items"][examples[0]["id"]]["A"])  # reused as saved
    assert not any(f["A_t"].requires_grad for f in feats)


# ---------------------------------------------------------------------------------------------
# 3. Stopping: SIGTERM while a step runs stops the run once that step is saved (tests/test_rundir.py has the
#    signal at every point of a step, and the resumed run equal to an uninterrupted one).


def stop_in_step(monkeypatch, step):
    """SIGTERM to this process at the start of training step `step` (1-based)."""
    batch_indices = train.batch_indices

    def hooked(s, *rest):
        if s == step - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch_indices(s, *rest)

    monkeypatch.setattr(train, "batch_indices", hooked)


# ---------------------------------------------------------------------------------------------
# 4. A non-finite loss stops the run and names the step and the batch; the last save stays.


def test_nan_loss_stops_at_last_good_checkpoint(tiny_teacher_dir, tiny_student_dir, tmp_path, monkeypatch):
    total_loss, calls = losses.total_loss, []

    def nan_at_step_3(*a, **k):
        calls.append(1)
        loss = total_loss(*a, **k)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(losses, "total_loss", nan_at_step_3)
    with pytest.raises(FloatingPointError) as err:
        train.main(argv(tiny_teacher_dir, tiny_student_dir, tmp_path, "dss", "--save-every", "2", steps=6))
    ids = [problems.make_problems(16, seed=0)[i]["id"] for i in train.batch_indices(2, 16, 4, 0)]
    assert "step 3" in str(err.value) and str(ids) in str(err.value)
    assert state(tmp_path)["step"] == 2 and checkpoints(tmp_path) == ["checkpoint"]
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2]
    assert f"the last good checkpoint is {tmp_path / 'checkpoint'}" in str(err.value)


def test_nan_loss_at_step_1_says_no_checkpoint_was_saved(tiny_teacher_dir, tiny_student_dir, tmp_path, monkeypatch):
    total_loss = losses.total_loss
    monkeypatch.setattr(losses, "total_loss", lambda *a, **k: total_loss(*a, **k) * float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite loss at step 1, .*; no checkpoint was saved before it"):
        train.main(argv(tiny_teacher_dir, tiny_student_dir, tmp_path, "dss", steps=3))
    assert checkpoints(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# 5. Atomic checkpoints: one folder after a save; a crash between the two renames is recoverable.


def test_atomic_checkpoint_and_old_fallback(tiny_teacher_dir, tiny_student_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def run(*extra, stop_in=None):
        cmd = argv(tiny_teacher_dir, tiny_student_dir, out, "dss", "--save-every", "1", *extra, steps=4)
        if stop_in is None:
            return train.main(cmd)
        stop_in_step(monkeypatch, stop_in)
        with pytest.raises(SystemExit) as stop:
            train.main(cmd)
        monkeypatch.undo()
        assert stop.value.code == 143

    run(stop_in=3)  # stops once step 3 is saved
    assert checkpoints(out) == ["checkpoint"] and state(out)["step"] == 3
    shutil.copytree(out / "checkpoint", tmp_path / "step3")
    # Crash after `checkpoint` became `.old`, with a half-written `.tmp`: resume uses `.old`.
    os.replace(out / "checkpoint", out / "checkpoint.old")
    (out / "checkpoint.tmp").mkdir()
    (out / "checkpoint.tmp" / "model.safetensors").write_bytes(b"half")
    run("--resume", stop_in=4)
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4]
    assert checkpoints(out) == ["checkpoint"] and state(out)["step"] == 4
    # Crash after the new `checkpoint` was in place but before `.old` was removed: resume uses the new one
    # (step 4: nothing left to train), and a stale `.old` never shadows it.
    shutil.copytree(tmp_path / "step3", out / "checkpoint.old")
    run("--resume")
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4] and state(out)["step"] == 4


# ---------------------------------------------------------------------------------------------
# 6. Data parallel: two gloo processes x 1 micro-batch == one process x 2 micro-batches.


def test_two_processes_match_one(tiny_teacher_dir, tiny_student_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ("--save-every", "100")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           *argv(tiny_teacher_dir, tiny_student_dir, two, "molsaki", *common, "--grad-accum", "1", steps=3)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train.main(argv(tiny_teacher_dir, tiny_student_dir, one, "molsaki", *common, "--grad-accum", "2", steps=3))

    rows_1, rows_2 = read_log(one), read_log(two)
    assert [r["step"] for r in rows_2] == [1, 2, 3]
    for r1, r2 in zip(rows_1, rows_2, strict=True):
        f1, f2 = flat(r1), flat(r2)
        assert f1.keys() == f2.keys()
        assert all(abs(f1[k] - f2[k]) <= 1e-5 for k in f1), (r1, r2)
    # The teacher cache, built by rank 0 while the other process waits, equals the one built by a single process.
    c1, c2 = torch.load(one / "teacher_cache.pt"), torch.load(two / "teacher_cache.pt")
    assert c1["items"].keys() == c2["items"].keys()
    for k, item in c1["items"].items():
        assert item["step_ids"] == c2["items"][k]["step_ids"] and item["word_ids"] == c2["items"][k]["word_ids"]
        assert torch.allclose(item["A"], c2["items"][k]["A"], rtol=0, atol=1e-5)
    w0 = load_file(Path(tiny_student_dir) / "model.safetensors")
    w1, w2 = load_file(one / "checkpoint" / "model.safetensors"), load_file(two / "checkpoint" / "model.safetensors")
    assert max((w1[k] - w0[k]).abs().max() for k in w0) > 1e-3  # it did train
    assert all(torch.allclose(w1[k], w2[k], rtol=0, atol=1e-5) for k in w1)
    s1, s2 = state(one)["router"], state(two)["router"]
    assert all(torch.allclose(s1[k], s2[k], rtol=0, atol=1e-5) for k in s1)


# ---------------------------------------------------------------------------------------------
# 7. The step log holds one row per step: --resume drops rows written after the checkpoint it resumes from.


def test_log_rows_match_the_training_that_happened(tiny_teacher_dir, tiny_student_dir, tmp_path, monkeypatch):
    cmd = argv(tiny_teacher_dir, tiny_student_dir, tmp_path, "dss", "--save-every", "2", steps=4)
    stop_in_step(monkeypatch, 3)
    with pytest.raises(SystemExit):
        train.main(cmd)
    monkeypatch.undo()
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3] and state(tmp_path)["step"] == 3
    with open(tmp_path / "log.jsonl", "a") as f:  # a crash after a row the checkpoint never saw
        f.write(json.dumps({"step": 4, "loss": 0.0}) + "\n")
    train.main([*cmd, "--resume"])
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4]
    assert read_log(tmp_path)[3]["loss"] != 0.0


# ---------------------------------------------------------------------------------------------
# 8. As Distilling Step-by-Step trains and scores (docs/design.md), and Eq. 5's bias per layer on --resume.

DATA = Path(os.environ.get("MOLSAKI_DATA") or ROOT.parent / "shared" / "data")


def test_dss_optimizer_schedule_and_eval_sets():
    for data_name, sets in [("builtin", "builtin"), ("svamp", "svamp,singleeq,asdiv,gsm8k"),
                            ("gsm8k", "svamp,singleeq,asdiv,gsm8k"), ("csqa", "csqa")]:
        args = flags.parse_args(["--data", data_name])
        assert args.eval_sets == sets and args.weight_decay == 0.0 and args.max_grad_norm == 1.0
    paper = flags.parse_args(["--data", "svamp"])
    assert (paper.warmup, paper.lr, paper.batch_size, paper.max_steps) == (0, 5e-5, 16, 4000)
    assert flags.parse_args(["--data", "csqa", "--eval-sets", ""]).eval_sets == ""


def test_optimizer_has_no_weight_decay_and_decays_linearly(tiny_teacher_dir, tiny_student_dir, tmp_path):
    train.main(argv(tiny_teacher_dir, tiny_student_dir, tmp_path, "dss", "--warmup", "0", steps=4))
    group = state(tmp_path)["optimizer"]["param_groups"][0]
    assert group["weight_decay"] == 0.0
    assert [r["lr"] for r in read_log(tmp_path)] == pytest.approx([3e-3 * (4 - s) / 4 for s in (1, 2, 3, 4)])


def test_resume_refuses_a_router_without_per_layer_bias(tiny_teacher_dir, tiny_student_dir, tmp_path, capsys):
    """A checkpoint whose router has the old keys (nn.Linear(d, 1) with its scalar bias) is a clear error."""
    train.main(argv(tiny_teacher_dir, tiny_student_dir, tmp_path, "molsaki", steps=2))
    path = tmp_path / "checkpoint" / "trainer_state.pt"
    saved = torch.load(path, weights_only=False)
    assert set(saved["router"]) == {"norm.weight", "proj.weight", "bias"} and saved["router"]["bias"].shape == (3,)
    router = saved["router"]
    saved["router"] = {"norm.weight": router["norm.weight"], "proj.weight": router["proj.weight"],
                       "proj.bias": torch.zeros(1)}
    torch.save(saved, path)
    with pytest.raises(SystemExit) as stop:
        train.main(argv(tiny_teacher_dir, tiny_student_dir, tmp_path, "molsaki", "--resume", steps=2))
    assert stop.value.code == 2 and "one bias per layer" in capsys.readouterr().err


@pytest.mark.skipif(not DATA.is_dir(), reason=f"no data directory at {DATA}")
def test_palm_filter_counts_and_gold_answers(capsys):
    """--palm-filter all (default) keeps every SVAMP item with a PaLM rationale, as DSS; correct keeps those
    PaLM answered right. The L_pre target is gold either way."""
    records = {r["id"]: r for r in data.load_dataset("svamp", "train", DATA)}
    counts = {}
    for keep in ("all", "correct"):
        args = flags.parse_args(["--data", "svamp", "--data-dir", str(DATA), "--rationales", "palm", "--method",
                               "dss", "--palm-filter", keep])
        examples = train.training_examples(args, None)  # PaLM's rationales: no teacher runs
        counts[keep] = len(examples)
        assert all(e["answer"] == records[e["id"]]["answer"] and e["rationale"] for e in examples)
        assert not any("The answer is" in e["rationale"] for e in examples)
    assert counts == {"all": 789, "correct": 594}
    assert "789 of 800 items have a rationale" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# 9. train.step is Eq. 7 on one micro-batch: its loss, parts and gradients equal an oracle written out term by
#    term in fp32.


def single_backward_losses(args, student, router, batch, feats, device):
    """Both passes without autocast, each term by its loss function, then Eq. 7 as one loss (the oracle)."""
    t = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
    zero = torch.zeros((), device=device)
    pre = student(t["pre_ids"], attention_mask=t["pre_mask"]).logits
    l_pre = losses.target_cross_entropy(pre, t["pre_labels"])
    if args.method == "vanilla":
        return {"loss": l_pre, "pre": l_pre}
    groups = batch["groups"] if args.method == "molsaki" else None
    if groups:
        with capture.capture(student, groups, values=True) as cap:
            exp = student(t["exp_ids"], attention_mask=t["exp_mask"]).logits
    else:
        exp = student(t["exp_ids"], attention_mask=t["exp_mask"]).logits
    l_exp = losses.target_cross_entropy(exp, t["exp_labels"])
    out, extra = {"pre": l_pre, "exp": l_exp, "att": zero, "mmi": zero}, zero
    if args.method == "mmi":
        out["mmi"] = extra = losses.mmi_loss(pre, t["pre_labels"], exp, t["exp_labels"])
    if groups:
        A_s, A_t = cap.stepwise(), batch["A_t"]
        L1, L2 = len(A_t[0]), len(A_s[0])
        if args.layer_map:
            i, j = mol.parse_layer_map(args.layer_map, L1, L2)
            p_t, p_s = torch.eye(L1)[i].expand(len(A_t), -1), torch.eye(L2)[j].expand(len(A_s), -1)
        else:  # Eq. 4 by loops: the mean absolute difference of adjacent columns, softmax over layers
            G = [[sum(abs(a[k, i, j + 1] - a[k, i, j]) for i in range(a.shape[1]) for j in range(a.shape[2] - 1))
                  / max(1, a.shape[1] * (a.shape[2] - 1)) for k in range(L1)] for a in A_t]
            p_t = torch.tensor(G).div(args.tau1).softmax(-1)
            p_s = router(cap.value_states(), t["exp_mask"])
        pairs = [(sum(pt[k] * a_t[k] for k in range(L1)), mol.mix_layers(a_s, ps))
                 for a_t, pt, a_s, ps in zip(A_t, p_t, A_s, p_s, strict=True)]
        out["att"], used = losses.attention_loss(pairs)
        out["p_t"], out["p_s"] = p_t.mean(0), p_s.detach().mean(0)
        out["no_words"] = torch.tensor(float(len(A_s) - used))
        extra = out["att"]
    out["loss"] = losses.total_loss(l_pre, l_exp, extra, args.alpha, args.beta)
    return out


@pytest.mark.parametrize("method, extra", [("vanilla", []), ("dss", []), ("mmi", []), ("molsaki", []),
                                           ("molsaki", ["--layer-map", "last"])])
def test_step_equals_one_backward_oracle(method, extra, tiny_teacher_dir, tiny_student_dir, tmp_path):
    args = flags.parse_args(["--teacher", tiny_teacher_dir, "--student", tiny_student_dir, "--n-train", "4",
                           "--method", method, *extra, "--out", str(tmp_path)])
    _, _, examples, cache = tiny_stage(args, tiny_teacher_dir)
    attn = capture.register() if method == "molsaki" else "sdpa"
    student, tok = models.load_model(tiny_student_dir, attn_implementation=attn)
    feats = train.features(args, examples, tok, cache)
    router = mol.StudentRouter(capture.value_dim(student.config), student.config.num_hidden_layers, args.tau2)
    with torch.no_grad():
        router.proj.weight.normal_(0.0, 1e-2)
        router.bias.normal_(0.0, 0.5)
    params = list(student.parameters()) + list(router.parameters())
    batch = data.collate(feats, tok.pad_token_id)

    def run(fn):
        for p in params:
            p.grad = None
        loss, out = fn()
        loss.backward()
        return out, [None if p.grad is None else p.grad.clone() for p in params]

    new, new_grads = run(lambda: train.step(student, router, batch, **train.objective(args)))
    old = single_backward_losses(args, student, router, batch, feats, torch.device("cpu"))
    old, old_grads = run(lambda: (old["loss"], old))
    assert new.keys() == old.keys()
    for k in old:
        torch.testing.assert_close(new[k], old[k].detach(), atol=1e-6, rtol=0)
    assert sum(g is not None for g in old_grads) > 0
    for g_new, g_old in zip(new_grads, old_grads, strict=True):
        if g_old is None:  # never used (the router outside MoL)
            assert g_new is None or g_new.abs().max() == 0
        else:
            torch.testing.assert_close(g_new, g_old, atol=1e-6, rtol=0)


@pytest.mark.skipif(not DATA.is_dir(), reason=f"no data directory at {DATA}")
def test_final_evaluation_reads_the_runs_answer_target(tiny_student_dir, tmp_path, monkeypatch):
    """--answer-target equation: the run's final evaluation reads answers as equations, and its meta says so."""
    real, given = train.eval_.run, []

    def first_items(*args, **kwargs):  # the real evaluation, on the first 2 items
        given.append(kwargs)
        return real(*args, **dict(kwargs, limit=2))

    monkeypatch.setattr(train.eval_, "run", first_items)
    train.main(["--student", tiny_student_dir, "--data", "svamp", "--data-dir", str(DATA), "--method", "vanilla",
                "--answer-target", "equation", "--max-steps", "1", "--batch-size", "2", "--eval-sets", "svamp",
                "--eval-batch-size", "2", "--max-length", "256", "--out", str(tmp_path)])
    assert [kwargs["answer_target"] for kwargs in given] == ["equation"]
    meta = json.loads((tmp_path / "eval_svamp_answer.meta.json").read_text())
    assert meta["answer_target"] == "equation" and meta["max_new_tokens"] == 64
