"""MoLSAKI inside a Hugging Face `Trainer`: the two DSS tasks (answer, rationale) plus beta L_att (Eq. 6/7).

    python -m examples.hf_trainer --run-dir runs/builtin-molsaki-s0 --student smollm2-135m --out runs/hf-trainer

--run-dir: a train.py run directory of method molsaki with MoL; its run.json says how its examples were made, its
teacher_cache.pt holds the teacher's A_t (Eq. 2), its rationales.jsonl the teacher's rationales (if any). lr, batch,
warmup, alpha, beta and tau2 are the run's (the Trainer's linear warmup starts at lr 0, train.py's at lr / warmup).
The loss goes through the modules a user copies: capture.py (A_s, Eq. 3), mol.py (router, Eq. 5; mixing, Eq. 6),
losses.py (Eq. 1, 6, 7); docs/your_loop.md says what each needs. Several processes: torchrun, as train.py."""

import argparse
import functools
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainingArguments

import capture
import data
import losses
import mol
from plumbing import models


class StudentWithRouter(torch.nn.Module):
    """The student LM (loaded with attn_implementation=capture.register()) and its router (Eq. 5). One forward
    returns what the loss needs: both tasks' logits, A_s per example [L2, S, W] (Eq. 3) and p_s [B, L2]."""

    def __init__(self, lm, router):
        super().__init__()
        self.lm, self.router = lm, router

    def forward(self, pre_ids, pre_mask, exp_ids, exp_mask, groups):
        pre = self.lm(pre_ids, attention_mask=pre_mask).logits  # [B, N, V], the answer task
        with capture.capture(self.lm, groups, values=True) as cap:  # A_s read during the rationale pass
            exp = self.lm(exp_ids, attention_mask=exp_mask).logits  # [B, N, V], the rationale task
        return pre, exp, cap.stepwise(), self.router(cap.value_states(), exp_mask)  # p_s: Eq. 5


def collate(feats, pad_id):
    """data.collate's padded tensors, plus per example the token groups and the mixed A_t [S, W] (not tensors of
    one shape: the Trainer passes them through with remove_unused_columns=False)."""
    return dict(data.collate(feats, pad_id), groups=[f["groups"] for f in feats], A_t=[f["A_t"] for f in feats])


class MolsakiTrainer(Trainer):
    """A Trainer whose loss is Eq. 7: alpha L_pre + (1 - alpha) L_exp + beta L_att."""

    def __init__(self, *args, alpha=0.5, beta=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha, self.beta, self.parts = alpha, beta, {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        x = inputs
        pre, exp, A_s, p_s = model(x["pre_ids"], x["pre_mask"], x["exp_ids"], x["exp_mask"], x["groups"])
        l_pre = losses.target_cross_entropy(pre, x["pre_labels"])  # Eq. 1 on the answer
        l_exp = losses.target_cross_entropy(exp, x["exp_labels"])  # Eq. 1 on the rationale
        pairs = [(a_t, mol.mix_layers(a_s, p)) for a_t, a_s, p in zip(x["A_t"], A_s, p_s, strict=True)]
        l_att, _ = losses.attention_loss(pairs)  # Eq. 6: KL between the mixed A_t and A_s, per step
        loss = losses.total_loss(l_pre, l_exp, l_att, self.alpha, self.beta)  # Eq. 7
        self.parts = {"pre": l_pre.detach(), "exp": l_exp.detach(), "att": l_att.detach()}
        return (loss, dict(self.parts, p_s=p_s.detach())) if return_outputs else loss

    def log(self, logs, start_time=None):  # the parts of the last micro-batch beside the Trainer's loss
        if "loss" in logs:
            logs.update({k: round(v.item(), 4) for k, v in self.parts.items()})
        super().log(logs, start_time)

    def _save(self, output_dir=None, state_dict=None):  # the LM as from_pretrained reads it, the router beside it
        if self.args.should_save:
            out = Path(output_dir or self.args.output_dir)
            student = self.accelerator.unwrap_model(self.model)
            student.lm.save_pretrained(out)
            self.processing_class.save_pretrained(out)
            save_file(student.router.state_dict(), out / "router.safetensors")

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):  # resume: what _save wrote
        student = self.accelerator.unwrap_model(model or self.model)
        student.lm.load_state_dict(type(student.lm).from_pretrained(resume_from_checkpoint).state_dict())
        student.router.load_state_dict(load_file(Path(resume_from_checkpoint) / "router.safetensors"))


def load_run(run_dir):
    """(the run's flags, its training examples, its teacher cache), rebuilt as train.py built them."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise SystemExit(f"error: {run_dir} has no run.json: give a train.py run directory")
    run = argparse.Namespace(**dict(json.loads((run_dir / "run.json").read_text())["args"], out=run_dir))
    if run.method != "molsaki" or run.layer_map:
        raise SystemExit(f"error: {run_dir} is not a molsaki run with MoL (method {run.method}, layer map "
                         f"{run.layer_map}): this example needs its teacher cache")

    def no_teacher():  # called only when the run's teacher stage is not complete
        raise SystemExit(f"error: {run_dir} lacks teacher outputs (rationales or teacher_cache.pt): run train.py there")

    examples = data.training_examples(run, no_teacher)
    return run, examples, data.teacher_cache(run, examples, no_teacher)  # refuses a cache of other texts


def build(run_dir, student, out, max_steps=None):
    """A MolsakiTrainer on the run's examples, with the run's schedule."""
    run, examples, cache = load_run(run_dir)
    lm, tok = models.load_model(student or run.student, attn_implementation=capture.register())
    feats = data.features(run, examples, tok, cache, lm.config.num_hidden_layers)
    router = mol.StudentRouter(capture.value_dim(lm.config), lm.config.num_hidden_layers, run.tau2)
    targs = TrainingArguments(
        output_dir=str(out), max_steps=max_steps or run.max_steps, learning_rate=run.lr, warmup_steps=run.warmup,
        per_device_train_batch_size=run.batch_size // int(os.environ.get("WORLD_SIZE", 1)),
        weight_decay=run.weight_decay, max_grad_norm=run.max_grad_norm, seed=run.seed, logging_steps=1,
        save_steps=run.save_every, report_to="none", remove_unused_columns=False, bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available())  # without a GPU: use_cpu, or torchrun's processes train apart
    return MolsakiTrainer(model=StudentWithRouter(lm, router), args=targs, train_dataset=feats,
                          data_collator=functools.partial(collate, pad_id=tok.pad_token_id), processing_class=tok,
                          alpha=run.alpha, beta=run.beta)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m examples.hf_trainer", description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True, help="a train.py run directory (molsaki): run.json, teacher_cache.pt")
    p.add_argument("--student", default=None, help="the student to train (default: the run's)")
    p.add_argument("--out", required=True, help="the Trainer's output_dir: checkpoint-<step>/ and the final model")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: the run's)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    trainer = build(args.run_dir, args.student, args.out, args.max_steps)
    trainer.train()
    trainer.save_model()  # --out: the LM (from_pretrained) and router.safetensors
    print(f"[hf_trainer] saved to {args.out}")
    return trainer


if __name__ == "__main__":
    main()
