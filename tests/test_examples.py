"""examples/hf_trainer.py on tiny random models (conftest): its compute_loss, through the Trainer's collator and the
run's numbers, is train.step's Eq. 7 (loss, parts and gradients, the same LM and router weights); a Trainer trains
LM and router a few steps on the CPU, and what it saves reloads (the LM with from_pretrained, the router from
router.safetensors) with equal parameters; resuming from a checkpoint ends where one run ends; two torchrun
processes (gloo) end with the same LM and router."""

import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import data
import train
from examples import hf_trainer
from plumbing import models

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tiny_teacher_dir, tiny_student_dir, tmp_path_factory):
    """A molsaki run of train.py (one step): run.json and teacher_cache.pt, as the example reads them."""
    out = tmp_path_factory.mktemp("run")
    train.main(["--teacher", tiny_teacher_dir, "--student", tiny_student_dir, "--data", "builtin", "--n-train", "8",
                "--batch-size", "4", "--max-steps", "1", "--eval-sets", "", "--method", "molsaki", "--out", str(out)])
    return out


def test_compute_loss_equals_train_step(run_dir, tiny_student_dir, tmp_path):
    trainer = hf_trainer.build(run_dir, tiny_student_dir, tmp_path / "hf", max_steps=1)
    student = trainer.model.cpu()  # on the CPU, where train.step runs without autocast
    torch.manual_seed(1)
    with torch.no_grad():  # a router away from its zero init, so that p_s is not uniform and every weight matters
        student.router.proj.weight.normal_(0.0, 1e-2)
        student.router.bias.normal_(0.0, 0.5)
        student.router.norm.weight.uniform_(0.5, 1.5)
    trainer.objective.update(alpha=0.3, beta=2.0)  # weights other than the run's, passed to both
    run = argparse.Namespace(**dict(vars(hf_trainer.load_run(run_dir)[0]), alpha=0.3, beta=2.0))
    feats = trainer.train_dataset[:4]
    params = dict(student.named_parameters())

    def grads(loss):
        for p in params.values():
            p.grad = None
        loss.backward()
        return {n: p.grad.clone() for n, p in params.items() if p.grad is not None}

    loss, parts = trainer.compute_loss(student, trainer.data_collator(feats), return_outputs=True)
    mine = grads(loss)
    ref, ref_parts = train.step(student.lm, student.router, data.collate(feats, trainer.processing_class.pad_token_id),
                                **train.objective(run))
    theirs = grads(ref)
    assert abs(loss.item() - ref.item()) <= 1e-6
    for k in ("pre", "exp", "att", "p_s"):
        torch.testing.assert_close(parts[k], ref_parts[k], rtol=0, atol=1e-6)
    assert parts["att"] > 0 and parts["p_s"].std() > 1e-4  # L_att is in the loss, p_s is not uniform
    pre, exp, att = (parts[k].item() for k in ("pre", "exp", "att"))
    assert loss.item() == pytest.approx(0.3 * pre + 0.7 * exp + 2.0 * att, rel=1e-6)
    assert mine.keys() == theirs.keys() and {n for n in mine if n.startswith("router.")} == {
        "router.norm.weight", "router.proj.weight", "router.bias"}
    for n in mine:
        torch.testing.assert_close(mine[n], theirs[n], rtol=1e-5, atol=1e-6, msg=n)


def test_trainer_trains_and_checkpoint_reloads(run_dir, tiny_student_dir, tmp_path):
    out = tmp_path / "hf"
    trainer = hf_trainer.main(["--run-dir", str(run_dir), "--student", tiny_student_dir, "--out", str(out),
                               "--max-steps", "3"])
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r[k]) for r in rows for k in ("loss", "pre", "exp", "att")) and rows[0]["att"] > 0
    student = trainer.model
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in student.parameters()} <= in_optimizer  # the router too
    assert student.router.proj.weight.abs().max() > 0  # it starts at zero: the optimizer moved it
    for folder in (out, out / "checkpoint-3"):
        lm = AutoModelForCausalLM.from_pretrained(folder)
        mine, saved = {k: v.cpu() for k, v in student.lm.state_dict().items()}, lm.state_dict()
        assert mine.keys() == saved.keys()
        assert all(torch.equal(mine[k], saved[k]) for k in mine)
        router = load_file(folder / "router.safetensors")
        assert router.keys() == student.router.state_dict().keys()
        assert all(torch.equal(v.cpu(), router[k]) for k, v in student.router.state_dict().items())
    assert {"optimizer.pt", "scheduler.pt", "trainer_state.json"} <= {p.name for p in (out / "checkpoint-3").iterdir()}


def test_resume_from_a_checkpoint_continues_the_same_training(run_dir, tiny_student_dir, tmp_path):
    """Trainer.train(resume_from_checkpoint=...) reloads LM, router, optimizer and schedule: steps 1-2, then 3 from
    checkpoint-2, end where steps 1-3 in one go end."""
    straight = hf_trainer.build(run_dir, tiny_student_dir, tmp_path / "a", max_steps=3)
    straight.args.save_steps = 2
    straight.train()
    resumed = hf_trainer.build(run_dir, tiny_student_dir, tmp_path / "b", max_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    assert not torch.equal(a["router.proj.weight"], torch.zeros_like(a["router.proj.weight"]))


DDP_SCRIPT = """
import json, sys
from examples import hf_trainer
args = hf_trainer.parse_args(sys.argv[1:])
trainer = hf_trainer.build(args.run_dir, args.student, args.out, args.max_steps)
seen, collate = [], trainer.data_collator  # the example ids this process trains on
trainer.data_collator = lambda feats: seen.extend(f["id"] for f in feats) or collate(feats)
trainer.train()
trainer.save_model()
student = trainer.model
print("RANK", json.dumps({"world": trainer.args.world_size, "rank": trainer.args.process_index, "seen": seen,
                          "router": {k: v.tolist() for k, v in student.router.state_dict().items()},
                          "lm": [p.double().sum().item() for p in student.lm.parameters()]}))
"""


def test_two_processes_train_under_ddp(run_dir, tiny_student_dir, tmp_path):
    """torchrun, two gloo processes on the CPU, each on its own shard of the data: the Trainer wraps LM and router in
    one DDP module, the groups and A_t reach each process's forward, the averaged gradients leave both processes with
    the same LM and router, and rank 0 saves a checkpoint that reloads."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")  # gloo, CPU
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    script, out = tmp_path / "ddp.py", tmp_path / "ddp"
    script.write_text(DDP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "--run-dir", str(run_dir), "--student", tiny_student_dir, "--out", str(out), "--max-steps", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = sorted((json.loads(line[5:]) for line in proc.stdout.splitlines() if line.startswith("RANK ")),
                   key=lambda r: r["rank"])
    assert [(r["world"], r["rank"]) for r in ranks] == [(2, 0), (2, 1)]
    assert len(ranks[0]["seen"]) == 4 and not set(ranks[0]["seen"]) & set(ranks[1]["seen"])  # 2 steps x 2 each
    assert ranks[0]["router"] == ranks[1]["router"] and ranks[0]["lm"] == ranks[1]["lm"]
    saved = load_file(out / "router.safetensors")
    assert saved["proj.weight"].abs().max() > 0 and saved["proj.weight"].tolist() == ranks[0]["router"]["proj.weight"]
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("info", [None, {"method": "dss", "layer_map": None},
                                  {"method": "molsaki", "layer_map": "last"}])
def test_refuses_what_it_cannot_train(info, tmp_path):
    if info:
        (tmp_path / "run.json").write_text(json.dumps({"args": info}))
    with pytest.raises(SystemExit, match="error: "):
        hf_trainer.load_run(tmp_path)


def test_your_loop_page_runs_and_train_py_accepts_its_cache(tiny_teacher_dir, tiny_student_dir, tmp_path,
                                                           monkeypatch, capsys):
    """docs/your_loop.md's code blocks, run in order as the page shows them (the model names swapped for the tiny
    folders), write a teacher cache and take one step; train.py, given the same problem, rationale and teacher
    name, reuses that cache as it stands: it never loads the teacher and leaves the file unchanged."""
    page = (ROOT / "docs" / "your_loop.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    assert len(blocks) == 2 and '"meta-llama/Meta-Llama-3-8B"' in blocks[0] and '"gpt2-large"' in blocks[1]
    monkeypatch.chdir(tmp_path)
    scope = {}
    for block in blocks:
        code = block.replace('"meta-llama/Meta-Llama-3-8B"', repr(tiny_teacher_dir))
        exec(compile(code.replace('"gpt2-large"', repr(tiny_student_dir)), "your_loop.md", "exec"), scope)
    parts = scope["parts"]
    assert parts["att"] > 0 and all(torch.isfinite(v).all() for v in parts.values())
    assert all(p.grad is None for p in scope["router"].parameters())  # stepped, then zeroed
    cached = (tmp_path / "teacher_cache.pt").read_bytes()

    out = tmp_path / "run"
    out.mkdir()
    (out / "teacher_cache.pt").write_bytes(cached)
    example = scope["examples"][0]
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps({k: example[k] for k in ("id", "question", "answer")}) + "\n")
    (out / "rationales.jsonl").write_text(json.dumps(  # the teacher's rationale for it, as train.py appends it
        {"id": example["id"], "rationale": example["rationale"], "statement": "The answer is 12.", "phase": 1,
         "teacher_answer": "12", "correct": True}) + "\n")

    def no_teacher(name, **kwargs):
        assert name != tiny_teacher_dir, "the teacher was loaded: the page's cache was not accepted"
        return real_load(name, **kwargs)

    real_load = models.load_model
    monkeypatch.setattr(models, "load_model", no_teacher)
    train.main(["--teacher", tiny_teacher_dir, "--student", tiny_student_dir, "--data", str(problems),
                "--rationales", "teacher", "--method", "molsaki", "--batch-size", "1", "--max-steps", "1",
                "--eval-sets", "", "--out", str(out)])
    assert "reusing teacher attention cache" in capsys.readouterr().out
    assert (out / "teacher_cache.pt").read_bytes() == cached
    assert json.loads((out / "log.jsonl").read_text())["att"] > 0
