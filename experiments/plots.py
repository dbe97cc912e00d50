"""Figures of a run: where the teacher looks, which layers MoL picks, whether the student learned to look there.

    python -m experiments.plots RUN_DIR [--example ID] [--out DIR] [--data-dir DIR]   # needs `pip install matplotlib`

One PNG per figure in RUN_DIR/figures (or --out), paths printed: heatmap (paper Fig. 1c, 2b, 12: Eq. 2/3 A_t
and the student's A_s before/after of one example, steps x critical words, Eq. 6 KL in the titles),
teacher_layers (Fig. 13), column_gradient (Fig. 4: Eq. 4 G per teacher layer over the training set),
layer_weights (Fig. 6, 8: p_t of Eq. 4, p_s of Eq. 5), router_over_steps (logged p_s, p_t per step),
numeric_share (Fig. 1b, App. B.1), losses (every loss component of log.jsonl). The run's .pt files are read by
files.load_torch (no code in them runs); one that cannot be read, or a run that is not molsaki's, is one line,
`error: ...`, exit status 2.

Choices:
- The run is rebuilt from checkpoint/trainer_state.pt "args" (flags.parse_args, train.training_examples: built-in
  problems regenerate, the teacher's rationales are read from the run's rationales.jsonl; real data needs
  --data-dir when the run read $MOLSAKI_DATA). A_t, p_t, the student's token groups and the kept steps/words are
  those of data.features, so only molsaki runs can be drawn.
- "Before" is the run's --student, "after" is RUN_DIR/checkpoint, both mixed with the same p_s: the trained
  router on the trained student's value states of the example (or the one-hot --layer-map), so the two panels
  differ only in the student's attention. Heatmaps show A as computed (sums of probabilities), own colour scale.
- Fig. 1b: eager attention (`output_attentions`) of the teacher and the trained student on the example's text,
  averaged over layers and heads; per step, its mean on the visible critical-word tokens and on the visible other
  tokens (`numeric_share`). App. B.1's softmax over these two small means stays near 0.5, so the raw means are
  drawn beside it. Special tokens and the first token (the attention sink the paper omits, App. B) are in neither.
"""

import argparse
import functools
import json
import math
from pathlib import Path

import torch

import capture
import data
import losses
import mol
import spans
import train
from plumbing import cli, files, flags, models


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots.py needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def run_argv(saved: dict, run_dir, data_dir=None) -> list[str]:
    """train.py flags from trainer_state's "args" (every value a string); --out is the run directory as found now,
    without the flags that only say how a run starts in it (--resume, --overwrite)."""
    argv = ["--out", str(run_dir)]
    for k, v in saved.items():
        if k not in ("out", "resume", "overwrite", "data_dir") and v != "None":
            argv += [f"--{k.replace('_', '-')}", v]
    data_dir = data_dir or (saved.get("data_dir") if saved.get("data_dir") != "None" else None)
    return argv + (["--data-dir", str(data_dir)] if data_dir else [])


def load_run(run_dir, data_dir=None):
    """(args, trainer state, training examples, teacher cache, log rows) of a molsaki run directory."""
    run_dir = Path(run_dir)
    state = files.load_torch(run_dir / "checkpoint" / "trainer_state.pt",
                            "pass the --out folder of a train.py run that saved a checkpoint")
    args = flags.parse_args(run_argv(state["args"], run_dir, data_dir))
    if args.method != "molsaki" or not (run_dir / "teacher_cache.pt").exists():
        raise ValueError(f"{run_dir}: the figures need a molsaki run with teacher_cache.pt (method {args.method})")
    cache = files.load_torch(run_dir / "teacher_cache.pt", "delete it: train.py with the run's flags builds it again")
    rows = [json.loads(line) for line in open(run_dir / "log.jsonl")]
    return args, state, train.training_examples(args, functools.cache(lambda: _teacher(args))), cache, rows


def _teacher(args):
    """The run's teacher (model, tokenizer) in eval mode, for train.training_examples when it asks for it."""
    model, tok = models.load_model(args.teacher, attn_implementation=capture.register())
    return model.eval(), tok


def example_view(args, example, tok, item):
    """Labels and the teacher's per-layer A [L1, S, W] of the steps and words both models keep (data.features)."""
    text, steps, words = spans.example_spans(example["question"], example["rationale"], data.EXP_PROMPT,
                                             example.get("keywords"), args.delimiters)
    _, st, wt = spans.encode(tok, text, steps, words, args.max_length - 1)
    step_ids, word_ids = spans.align(st, dict.fromkeys(item["step_ids"])), spans.align(wt, dict.fromkeys(
        item["word_ids"]))
    A = item["A"][:, [item["step_ids"].index(k) for k in step_ids]][:, :, [item["word_ids"].index(k)
                                                                            for k in word_ids]]  # [L1, S, W]
    return {"text": text, "steps": steps, "words": words, "A": A, "word_labels": [text[slice(*words[k])]
            for k in word_ids], "step_labels": [_short(text[slice(*steps[k])]) for k in step_ids]}


def _short(text, n=25):
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"


@torch.no_grad()
def student_stepwise(model, feat):
    """The student's A_l [L2, S, W] (Eq. 3) and value states [L2, N, d] on the example's L_exp text, as in training."""
    ids = torch.tensor([feat["exp_ids"]])
    with capture.capture(model, [feat["groups"]], values=True) as cap:
        model(ids, attention_mask=torch.ones_like(ids))
    return cap.stepwise()[0].float(), cap.value_states()[0].float()


def teacher_weights(args, A_t, n_student):
    """p_t [L1] (Eq. 4) of one example's cached A_t [L1, S, W], or the one-hot teacher layer of --layer-map."""
    if args.layer_map:
        return mol.one_hot_weights(mol.parse_layer_map(args.layer_map, len(A_t), n_student)[0], len(A_t))
    return mol.teacher_layer_weights(A_t, args.tau1)


@torch.no_grad()
def student_weights(args, state, values, n_teacher):
    """p_s [L2] (Eq. 5) from the saved router, or the one-hot student layer of --layer-map."""
    L2 = values.shape[0]
    if args.layer_map:
        return mol.one_hot_weights(mol.parse_layer_map(args.layer_map, n_teacher, L2)[1], L2)
    router = mol.StudentRouter(values.shape[-1], L2, args.tau2)
    router.load_state_dict(state["router"])
    return router(values)


@torch.no_grad()
def critical_attention(model, tok, text, steps, words, max_length):
    """Fig. 1b for one model: numeric_share of its eager attention (layer- and head-mean) on `text`, [len(steps), 2].
    Critical = tokens of the critical words; other = the remaining non-special tokens; the first token is in neither."""
    enc = tok(text, return_offsets_mapping=True, truncation=True, max_length=max_length, return_tensors="pt")
    model.set_attn_implementation("eager")
    out = model(enc["input_ids"], output_attentions=True)
    P = torch.stack([a[0].float().mean(0) for a in out.attentions]).mean(0)  # [L, H, N, N] -> [N, N]
    offsets = [tuple(o) for o in enc["offset_mapping"][0].tolist()]
    st = spans.token_groups(text, offsets, steps, "step")
    critical = {t for tokens in spans.token_groups(text, offsets, words, "word").values() for t in tokens if t > 0}
    other = [i for i, (a, b) in enumerate(offsets) if b > a and i > 0 and i not in critical]
    return numeric_share(P, [st.get(k, []) for k in range(len(steps))], sorted(critical), other)


def numeric_share(P, steps, critical, other):
    """App. B.1 for one model: [S, 2], per step the mean of P[i, j] over its tokens i and the visible (j <= i)
    critical tokens j, then over the visible other tokens; nan where a step sees no such token."""
    out = torch.full((len(steps), 2), float("nan"), dtype=P.dtype)
    for s, rows in enumerate(steps):
        for c, cols in enumerate((critical, other)):
            r, k = torch.tensor(rows, dtype=torch.long)[:, None], torch.tensor(cols, dtype=torch.long)[None, :]
            visible = (k <= r).float()  # [R, C], causal
            if cols and visible.sum() > 0:
                out[s, c] = (P[r, k] * visible).sum() / visible.sum()
    return out


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _heat(ax, A, ylabels, xlabels, title):
    im = ax.imshow(A.numpy(), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(xlabels)), xlabels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(ylabels)), ylabels, fontsize=7)
    ax.set_title(title, fontsize=9)
    return im


def plot_heatmap(A_t, A_before, A_after, step_labels, word_labels, path):
    """Fig. 1c / 2b / 12: the teacher's A_t beside the student's A_s before and after training."""
    S, W = A_t.shape
    fig, axes = _pyplot().subplots(1, 3, figsize=(3.5 + 3 * (1.2 + 0.3 * W), 1.5 + 0.35 * S))
    panels = [(A_t, "teacher A_t (mixed by p_t)")]
    panels += [(A, f"student A_s {when}\nKL(A_t||A_s) = {losses.stepwise_kl(A_t, A).item():.4f}")
               for A, when in ((A_before, "before"), (A_after, "after"))]
    for k, (ax, (A, title)) in enumerate(zip(axes, panels, strict=True)):
        im = _heat(ax, A, step_labels if k == 0 else [""] * S, word_labels, title)
        fig.colorbar(im, ax=ax, fraction=0.05)
    return _save(fig, path)


def plot_teacher_layers(A, p_t, word_labels, path):
    """Fig. 13: the teacher's A_l [L, S, W] of one example, one panel per layer."""
    (L, S, W), cols = A.shape, min(A.shape[0], 6)
    rows = math.ceil(L / cols)
    fig, axes = _pyplot().subplots(rows, cols, figsize=(cols * (0.8 + 0.25 * W), rows * (1.2 + 0.25 * S)),
                                   squeeze=False)
    for ax in axes.flat[L:]:
        ax.axis("off")
    for k, ax in enumerate(axes.flat[:L]):
        _heat(ax, A[k], [f"S{i + 1}" for i in range(S)], word_labels, f"layer {k + 1}  p_t={p_t[k]:.2f}")
    return _save(fig, path)


def plot_column_gradient(cache, path):
    """Fig. 4: G (Eq. 4) per teacher layer, mean and std over the cached examples with S >= 1 and W >= 2."""
    G = torch.stack([mol.column_gradient(it["A"]) for it in cache["items"].values()
                     if len(it["step_ids"]) >= 1 and len(it["word_ids"]) >= 2])  # [n, L1]
    fig, ax = _pyplot().subplots(figsize=(max(5, 0.3 * G.shape[1] + 2), 3.5))
    ax.bar(range(1, G.shape[1] + 1), G.mean(0).numpy(), yerr=G.std(0).numpy(), capsize=2, color="tab:blue")
    ax.set(xticks=range(1, G.shape[1] + 1), xlabel="teacher layer", ylabel="mean column gradient G",
           title=f"Eq. 4 column gradient, mean over {G.shape[0]} training examples")
    return _save(fig, path)


def plot_layer_weights(p_t, p_s, mean_p_t, mean_p_s, path):
    """Fig. 6 / 8: p_t and p_s of the example (bars) and their training-set / late-training means (lines)."""
    fig, axes = _pyplot().subplots(1, 2, figsize=(11, 3.5))
    for ax, p, mean, who, what in ((axes[0], p_t, mean_p_t, "teacher p_t", "training-set mean"),
                                   (axes[1], p_s, mean_p_s, "student p_s", "logged mean, last 10% of steps")):
        x = range(1, len(p) + 1)
        ax.bar(x, p.numpy(), color="tab:orange" if "p_s" in who else "tab:blue", label="this example")
        ax.step(x, mean.numpy(), where="mid", color="k", label=what)
        ax.set_xticks(list(x), [str(i) for i in x], fontsize=6)
        ax.set(xlabel="layer", ylabel="weight", title=who, ylim=(0, 1.05))
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_router_over_steps(rows, path):
    """p_s (and p_t) batch means of every logged step as images: layer x training step."""
    keys = [k for k in ("p_s", "p_t") if all(k in r for r in rows)]
    fig, axes = _pyplot().subplots(1, len(keys), figsize=(6 * len(keys), 3.8), squeeze=False)
    for ax, k in zip(axes[0], keys, strict=True):
        M = torch.tensor([r[k] for r in rows]).T  # [L, steps]
        im = ax.imshow(M.numpy(), aspect="auto", origin="lower", cmap="magma", vmin=0,
                       extent=(rows[0]["step"] - 0.5, rows[-1]["step"] + 0.5, 0.5, M.shape[0] + 0.5))
        ax.set(xlabel="training step", ylabel="layer", title=f"batch-mean {k} per step")
        fig.colorbar(im, ax=ax, fraction=0.05)
    return _save(fig, path)


def plot_numeric_share(means, step_labels, critical, path):
    """Fig. 1b: per model, the raw means [S, 2] (critical vs other) and their softmax shares (App. B.1)."""
    fig, axes = _pyplot().subplots(len(means), 2, figsize=(12, 3.2 * len(means)), squeeze=False)
    x = torch.arange(len(step_labels)).numpy()
    for (ax_raw, ax_share), (who, m) in zip(axes, means.items(), strict=True):
        share = torch.softmax(m, -1)
        for c, (name, color) in enumerate(((critical, "tab:red"), ("other tokens", "tab:gray"))):
            ax_raw.bar(x + (c - 0.5) * 0.4, m[:, c].numpy(), 0.4, color=color, label=name)
            ax_share.bar(x, share[:, c].numpy(), bottom=share[:, :c].sum(-1).numpy(), color=color, label=name)
        ax_share.axhline(0.5, color="k", lw=0.5)
        ax_raw.set(ylabel="mean attention per token", title=f"{who}: mean attention received")
        d = 1.3 * float(torch.nan_to_num(share[:, 0] - 0.5).abs().max()) + 1e-3  # the shares hug 0.5: zoom in
        ax_share.set(ylabel="softmax share", title=f"{who}: share (App. B.1 softmax)", ylim=(0.5 - d, 0.5 + d))
        for ax in (ax_raw, ax_share):
            ax.set_xticks(x, step_labels, rotation=60, ha="right", fontsize=7)
            ax.legend(fontsize=7)
    return _save(fig, path)


def plot_losses(rows, path):
    """Every numeric loss component of the log over the training steps, one panel each."""
    keys = [k for k in ("loss", "pre", "exp", "att", "mmi") if any(isinstance(r.get(k), int | float) for r in rows)]
    fig, axes = _pyplot().subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
    for ax, k in zip(axes[0], keys, strict=True):
        ax.plot([r["step"] for r in rows if k in r], [r[k] for r in rows if k in r], marker=".", ms=3)
        ax.set(xlabel="step", title=k)
    return _save(fig, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", help="a molsaki run directory (train.py --out)")
    p.add_argument("--example", default=None, help="example id; default: the first with >= 2 steps and >= 2 words")
    p.add_argument("--out", default=None, help="folder of the PNGs; default RUN_DIR/figures")
    p.add_argument("--data-dir", default=None, help="the real data sets, when the run read $MOLSAKI_DATA")
    return p.parse_args(argv)


def main(argv=None):
    opts = parse_args(argv)
    _pyplot()  # fail before any model is loaded
    run_dir = Path(opts.run_dir)
    out = Path(opts.out or run_dir / "figures")
    out.mkdir(parents=True, exist_ok=True)
    try:
        args, state, examples, cache, rows = load_run(run_dir, opts.data_dir)
    except ValueError as e:  # a file of the run that cannot be read, or not a molsaki run
        cli.fail(e)

    after, tok = models.load_model(str(run_dir / "checkpoint"), attn_implementation=capture.register())
    feats = train.features(args, examples, tok, cache)
    ok = [i for i, f in enumerate(feats) if min(f["A_t"].shape[1:]) >= 2 and opts.example in (None, f["id"])]
    if not ok:
        raise ValueError(f"no example {opts.example or 'with >= 2 steps and >= 2 words'} in {run_dir}")
    e, f = examples[ok[0]], feats[ok[0]]
    v = example_view(args, e, tok, cache["items"][e["id"]])
    print(f"[plots] example {e['id']}: {len(v['step_labels'])} steps x {len(v['word_labels'])} words")

    A_after, values = student_stepwise(after.eval(), f)
    p_s = student_weights(args, state, values, v["A"].shape[0])
    before, _ = models.load_model(args.student, attn_implementation=capture.register())
    A_before, _ = student_stepwise(before.eval(), f)
    mean_p_s = torch.tensor([r["p_s"] for r in rows[-max(1, len(rows) // 10):]]).mean(0)
    L2 = after.config.num_hidden_layers
    p_t = teacher_weights(args, f["A_t"], L2)
    mean_p_t = torch.stack([teacher_weights(args, g["A_t"], L2) for g in feats]).mean(0)

    teacher, ttok = models.load_model(args.teacher, attn_implementation="eager")
    means = {who: critical_attention(m.eval(), mt, v["text"], v["steps"], v["words"], args.max_length)
             for who, m, mt in (("teacher", teacher, ttok), ("student after", after, tok))}
    paths = [
        plot_heatmap(mol.mix_layers(f["A_t"], p_t), mol.mix_layers(A_before, p_s), mol.mix_layers(A_after, p_s),
                     v["step_labels"], v["word_labels"], out / "heatmap.png"),
        plot_teacher_layers(v["A"], p_t, v["word_labels"], out / "teacher_layers.png"),
        plot_column_gradient(cache, out / "column_gradient.png"),
        plot_layer_weights(p_t, p_s, mean_p_t, mean_p_s,
                           out / "layer_weights.png"),
        plot_router_over_steps(rows, out / "router_over_steps.png"),
        plot_numeric_share(means, [_short(v["text"][a:b]) for a, b in v["steps"]],
                           "keywords" if args.data == "csqa" else "numbers", out / "numeric_share.png"),
        plot_losses(rows, out / "losses.png"),
    ]
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
