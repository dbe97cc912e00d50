"""One training example through every equation: the runnable form of the paper's Figure 3.

    python walkthrough.py                                  # SVAMP svamp-train-0, PaLM rationale
    python walkthrough.py --example svamp-train-5 --teacher gemma3-270m --student smollm2-135m

It prints, for one SVAMP training item and its PaLM rationale (cut before "The answer is", data.py), each quantity of
one MoLSAKI step under a header naming its equation and the function that computes it (a place for a breakpoint):
the text (SPEC §2), the steps and critical words as character spans (Eq. 2/3), their token groups under each
tokenizer (App. C.2), A_t of two teacher layers (Eq. 2), G and p_t (Eq. 4), p_s of a fresh router (Eq. 5), the mixed
A_t and A_s, their row softmaxes and L_att (Eq. 6), and the total loss (Eq. 1, Eq. 7). Numbers have 4 decimals;
tables show at most 8 steps x 10 words (and say when they cut).

Public functions:
    walk(teacher, t_tok, student, s_tok, example, tau1, tau2, alpha, beta, max_length) -> dict of every quantity
    report(w) -> str                              the printed form of walk's dict
    svamp_example(example_id, data_dir) -> dict   a SVAMP train record with its PaLM rationale
    parse_args(argv), main(argv)

The computation is the training code's, unbatched: the teacher's A_t comes from attention.capture under no_grad with
logits_to_keep=1 (as data.build_attention_cache), the student's A_s and value states from attention.capture on the
L_exp forward (as train.step_losses), the labels from train._task. Both models must use the capturing attention
(models.load_model(..., attn_implementation=attention.ATTN)). Nothing is trained: the step runs under no_grad.
"""

import torch

import attention
import cli
import data
import fetch
import losses
import models
import mol
import spans
import train

ROWS, COLS, PER_LINE = 8, 10, 10  # table size shown; layers (or steps) per line of a per-layer row


@torch.no_grad()
def walk(teacher, t_tok, student, s_tok, example, tau1=0.1, tau2=0.5, alpha=0.5, beta=1.0, max_length=512):
    """Every quantity of one MoLSAKI step on `example` {id, question, answer, rationale}, the rationale without its
    answer statement. Tensors are float32 on the CPU; the router (fresh, as at step 0) is returned too."""
    q, r = example["question"], example["rationale"]
    text, steps, words = spans.example_spans(q, r, data.EXP_PROMPT)  # Eq. 2/3: M1/N1 and M2/N2 as character spans
    t_ids, t_steps, t_words = spans.encode(t_tok, text, steps, words, max_length)
    s_ids, s_steps, s_words = spans.encode(s_tok, text, steps, words, max_length - 1)  # room for EOS (train._task)
    step_ids, word_ids = spans.align(t_steps, s_steps), spans.align(t_words, s_words)  # App. C.2: one shape
    if not step_ids or not word_ids:
        raise ValueError(f"{example['id']}: no step or no critical word that both models keep, so no L_att")
    t_groups = ([t_steps[k] for k in step_ids], [t_words[k] for k in word_ids])
    s_groups = ([s_steps[k] for k in step_ids], [s_words[k] for k in word_ids])

    with attention.capture(teacher, [t_groups]) as cap:  # Eq. 2, as data.build_attention_cache
        teacher(torch.tensor([t_ids], device=teacher.device), logits_to_keep=1)
    A_t_layers = cap.stepwise()[0].float().cpu()  # [L1, S, W]
    G = mol.column_gradient(A_t_layers)  # Eq. 4, [L1]
    p_t = mol.teacher_layer_weights(A_t_layers, tau1)  # Eq. 4, [L1]

    pre_ids, pre_labels = train._task(s_tok, data.PRE_PROMPT.format(question=q), " " + example["answer"], max_length)
    exp_ids, exp_labels = train._task(s_tok, data.EXP_PROMPT.format(question=q), " " + r, max_length)
    pre_ids, pre_labels, exp_ids, exp_labels = (torch.tensor([x], device=student.device)
                                                for x in (pre_ids, pre_labels, exp_ids, exp_labels))
    l_pre = losses.target_cross_entropy(student(pre_ids).logits, pre_labels).cpu()  # Eq. 1
    with attention.capture(student, [s_groups], values=True) as cap:  # Eq. 3 on the L_exp forward (train.step_losses)
        l_exp = losses.target_cross_entropy(student(exp_ids).logits, exp_labels).cpu()  # Eq. 1
    A_s_layers = cap.stepwise()[0].float().cpu()  # [L2, S, W]
    values = cap.value_states()[0].float().cpu()  # [L2, N, d], one text: no padding, no mask
    router = mol.StudentRouter(values.shape[-1], values.shape[0], tau2)
    p_s = router(values)  # Eq. 5, [L2]

    A_t, A_s = mol.mix_layers(A_t_layers, p_t), mol.mix_layers(A_s_layers, p_s)  # Eq. 6, [S, W] each
    kl_steps = torch.stack([losses.stepwise_kl(A_t[i:i + 1], A_s[i:i + 1]) for i in range(len(step_ids))])  # [S]
    l_att = losses.stepwise_kl(A_t, A_s)  # Eq. 6: the mean of kl_steps
    total = losses.total_loss(l_pre, l_exp, l_att, alpha, beta)  # Eq. 7
    return {"example": example, "text": text, "steps": steps, "words": words, "step_ids": step_ids,
            "word_ids": word_ids, "tau1": tau1, "tau2": tau2, "alpha": alpha, "beta": beta,
            "teacher_tokens": t_tok.convert_ids_to_tokens(t_ids), "student_tokens": s_tok.convert_ids_to_tokens(s_ids),
            "teacher_groups": (t_steps, t_words), "student_groups": (s_steps, s_words), "groups_s": s_groups,
            "A_t_layers": A_t_layers, "G": G, "p_t": p_t, "values": values, "router": router, "p_s": p_s,
            "A_s_layers": A_s_layers, "A_t": A_t, "A_s": A_s, "soft_t": A_t.softmax(-1), "soft_s": A_s.softmax(-1),
            "kl_steps": kl_steps, "l_att": l_att, "l_pre": l_pre, "l_exp": l_exp, "total": total}


# ---------------------------------------------------------------------------------------------
# Printing.


def _header(n, eq, functions, out):
    out += ["", f"== {n}. {eq}  {functions} =="]


def _table(title, A, w, out):
    """A [S, W]: rows = steps, columns = critical words, at most ROWS x COLS (and a line saying so)."""
    S, W = A.shape
    words = [f"w{k}:{w['text'][slice(*w['words'][k])]}"[:8] for k in w["word_ids"][:COLS]]
    out += [f"{title} [{S} x {W}]:", " " * 6 + "".join(f"{c:>9}" for c in words)]
    out += [f"s{k:<5}" + "".join(f"{x:9.4f}" for x in A[i, :COLS].tolist())
            for i, k in enumerate(w["step_ids"][:ROWS])]
    if S > ROWS or W > COLS:
        out.append(f"(cut: the first {min(S, ROWS)} of {S} steps and {min(W, COLS)} of {W} words shown)")


def _rows(index, labels, rows, out, first=1):
    """Per-layer (or per-step) vectors, PER_LINE entries a line; `index` names the entries, numbered from `first`."""
    for a in range(0, len(rows[0]), PER_LINE):
        out.append(f"  {index:<6}" + "".join(f"{i + first:>8}" for i in range(a, min(a + PER_LINE, len(rows[0])))))
        out += [f"  {label:<6}" + "".join(f"{x:8.4f}" for x in row[a:a + PER_LINE].tolist())
                for label, row in zip(labels, rows, strict=True)]


def _groups(w, out):
    """Token groups of each kept step and word under both tokenizers, side by side."""
    tokens, groups = (w["teacher_tokens"], w["student_tokens"]), (w["teacher_groups"], w["student_groups"])
    out.append(f"{'':16}{f'teacher ({len(tokens[0])} tokens)':44}student ({len(tokens[1])} tokens)")

    def cell(m, by, k):
        idx = groups[m][by].get(k)
        if idx is None:
            return "- (not kept)"
        if by == 0:
            return f"tokens {idx[0]}-{idx[-1]} ({len(idx)})"
        return f"{idx} " + "|".join(tokens[m][i] for i in idx)

    for by, name, spans_ in ((0, "s", w["steps"]), (1, "w", w["words"])):
        for k, (a, b) in enumerate(spans_):
            label = f"{name}{k}" + ("" if by == 0 else f" {w['text'][a:b]}")
            out.append(f"  {label:<14}{cell(0, by, k):44}{cell(1, by, k)}")
    S, W = len(w["step_ids"]), len(w["word_ids"])
    out.append(f"kept by both (spans.align): {S} of {len(w['steps'])} steps, {W} of {len(w['words'])} words -> "
               f"A_t and A_s are both [S, W] = [{S}, {W}]")


def report(w) -> str:
    """The printed walkthrough of walk's dict: eight blocks, each headed by its equation and function."""
    e = w["example"]
    out = [f"MoLSAKI walkthrough (Figure 3): {e['id']}, gold answer a = {e['answer']}"]
    _header(1, "SPEC §2 text", "spans.example_spans: data.EXP_PROMPT.format(question=q) + ' ' + r", out)
    out += ["  " + line for line in w["text"].split("\n")]

    _header(2, "Eq. 2/3 index sets", "spans.example_spans (steps M1/N1, critical words M2/N2)", out)
    out += [f"  s{k:<3} [{a}, {b})  {w['text'][a:b]!r}" for k, (a, b) in enumerate(w["steps"])]
    out += [f"  w{k:<3} [{a}, {b})  {w['text'][a:b]!r}" for k, (a, b) in enumerate(w["words"])]

    _header(3, "App. C.2 token groups", "spans.encode -> spans.token_groups, spans.align", out)
    _groups(w, out)

    L1, L2 = len(w["p_t"]), len(w["p_s"])
    _header(4, "Eq. 2  A_t of the first and last teacher layer",
            "attention.capture (no_grad, logits_to_keep=1, as data.build_attention_cache)", out)
    out.append(f"A_l[s, w] = mean over heads of the attention of step s's tokens on word w's tokens; L1 = {L1} "
               "layers, numbered from 1 as in the paper")
    for layer in (0, L1 - 1):
        _table(f"A_t, layer {layer + 1}", w["A_t_layers"][layer], w, out)

    _header(5, "Eq. 4  G, p_t", f"mol.column_gradient, mol.teacher_layer_weights (tau1 = {w['tau1']})", out)
    out.append("G = mean |A_l[i, j+1] - A_l[i, j]| over steps i and adjacent words j; p_t = softmax(G / tau1)")
    _rows("layer", ["G", "p_t"], [w["G"], w["p_t"]], out)

    _header(6, "Eq. 5  p_s", f"mol.StudentRouter(d = {w['values'].shape[-1]}, L2 = {L2}, tau2 = {w['tau2']}) on "
            "attention.capture(values=True).value_states()", out)
    out.append("p_s = softmax((H w + b) / tau2), H[l] = sum over tokens of RMSNorm(V_l); a fresh router has w = 0, "
               "b = 0 (p_s uniform), train.py learns them")
    _rows("layer", ["p_s"], [w["p_s"]], out)

    _header(7, "Eq. 6  mixed A_t, A_s and L_att", "mol.mix_layers, softmax over words, losses.stepwise_kl", out)
    _table("A_t = sum_l p_t[l] A_t_l", w["A_t"], w, out)
    _table("A_s = sum_l p_s[l] A_s_l", w["A_s"], w, out)
    _table("softmax(A_t[i])", w["soft_t"], w, out)
    _table("softmax(A_s[i])", w["soft_s"], w, out)
    out.append("KL(softmax(A_t[i]) || softmax(A_s[i])) per step i:")
    _rows("step", ["KL"], [w["kl_steps"]], out, first=0)
    out.append(f"  L_att = {w['l_att'].item():.4f}  (the mean over steps)")

    _header(8, "Eq. 1 and Eq. 7  the loss of one step",
            "losses.target_cross_entropy (labels of train._task), losses.total_loss", out)
    a, b = w["alpha"], w["beta"]
    out += [f"  L_pre = {w['l_pre'].item():.4f}  (target ' {e['answer']}' + EOS after data.PRE_PROMPT)",
            f"  L_exp = {w['l_exp'].item():.4f}  (target ' r' + EOS after data.EXP_PROMPT)",
            f"  L_att = {w['l_att'].item():.4f}",
            f"  L = {a} * L_pre + {1 - a} * L_exp + {b} * L_att = {w['total'].item():.4f}"]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# The command line.


def svamp_example(example_id, data_dir) -> dict:
    """SVAMP train record `example_id` with its PaLM rationale (cut before "The answer is", data.py)."""
    records = {r["id"]: r for r in data.load_dataset("svamp", "train", data_dir)}
    rationales = {k["id"]: k["rationale"] for k in data.load_palm_rationales("svamp", "train", data_dir)}
    if example_id not in rationales:
        why = "has no PaLM rationale" if example_id in records else "is not a SVAMP train id"
        raise ValueError(f"--example {example_id!r} {why}; ids run svamp-train-0 .. svamp-train-{len(records) - 1}")
    return dict(records[example_id], rationale=rationales[example_id])


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="gemma3-270m", help="hub id, folder, or a packaged name (as train.py)")
    p.add_argument("--student", default="smollm2-135m", help="hub id, folder, or a packaged name (as train.py)")
    p.add_argument("--example", default="svamp-train-0", help="SVAMP train item id, with its PaLM rationale")
    p.add_argument("--data-dir", default=None,
                   help="folder of the data sets (else $MOLSAKI_DATA, else ~/.cache/molsaki/data)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        example = svamp_example(args.example, args.data_dir)
        teacher, t_tok = models.load_model(args.teacher, attn_implementation=attention.ATTN)
        student, s_tok = models.load_model(args.student, attn_implementation=attention.ATTN)
    except (ValueError, OSError, ImportError, fetch.DataUnavailable) as e:
        cli.fail(e)
    print(report(walk(teacher.eval(), t_tok, student.eval(), s_tok, example)))


if __name__ == "__main__":
    main()
