"""MoLSAKI inside a Hugging Face `Trainer`: the two DSS tasks (answer, rationale) plus beta L_att (Eq. 6/7).

    python -m examples.hf_trainer --run-dir runs/builtin-molsaki-s0 --student smollm2-135m --out runs/hf-trainer

--run-dir: a train.py run directory of method molsaki with MoL; its run.json says how its examples were made, its
teacher_cache.pt holds the teacher's A_t (Eq. 2), its rationales.jsonl the teacher's rationales (if any). lr, batch,
warmup, alpha, beta, tau1 and tau2 are the run's (the Trainer's linear warmup starts at lr 0, train.py's at
lr / warmup). The loss is train.step's, called through train.Student, the module the Trainer optimizes, saves and
wraps for DDP; docs/your_loop.md says what it needs. Several processes: torchrun, as train.py."""

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
import mol
import train
from plumbing import models


class MolsakiTrainer(Trainer):
    """A Trainer whose loss is train.py's: its model is a `train.Student` (the LM and its router), whose forward is
    `train.step`, Eq. 7 written once: alpha L_pre + (1 - alpha) L_exp + beta L_att."""

    def __init__(self, *args, alpha=0.5, beta=1.0, tau1=0.1, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective, self.parts = {"method": "molsaki", "alpha": alpha, "beta": beta, "tau1": tau1}, {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, self.parts = model(inputs, **self.objective)  # train.step, through the (DDP-wrapped) train.Student
        return (loss, self.parts) if return_outputs else loss

    def log(self, logs, start_time=None):  # the parts of the last micro-batch beside the Trainer's loss
        if "loss" in logs:
            logs.update({k: round(self.parts[k].item(), 4) for k in ("pre", "exp", "att")})
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

    examples = train.training_examples(run, no_teacher)
    return run, examples, train.attention_cache(run, examples, no_teacher)  # refuses a cache of other texts


def build(run_dir, student, out, max_steps=None):
    """A MolsakiTrainer on the run's examples, with the run's schedule."""
    run, examples, cache = load_run(run_dir)
    lm, tok = models.load_model(student or run.student, attn_implementation=capture.register())
    feats = train.features(run, examples, tok, cache)
    router = mol.StudentRouter(capture.value_dim(lm.config), lm.config.num_hidden_layers, run.tau2)
    targs = TrainingArguments(
        output_dir=str(out), max_steps=max_steps or run.max_steps, learning_rate=run.lr, warmup_steps=run.warmup,
        per_device_train_batch_size=run.batch_size // int(os.environ.get("WORLD_SIZE", 1)),
        weight_decay=run.weight_decay, max_grad_norm=run.max_grad_norm, seed=run.seed, logging_steps=1,
        save_steps=run.save_every, report_to="none", remove_unused_columns=False, bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available())  # without a GPU: use_cpu, or torchrun's processes train apart
    return MolsakiTrainer(model=train.Student(lm, router), args=targs, train_dataset=feats,
                          data_collator=functools.partial(data.collate, pad_id=tok.pad_token_id), processing_class=tok,
                          alpha=run.alpha, beta=run.beta, tau1=run.tau1)


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
