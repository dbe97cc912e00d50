"""One training example through every equation: the runnable form of the paper's Figure 3.

    python walkthrough.py                                  # SVAMP svamp-train-0, PaLM rationale
    python walkthrough.py --example svamp-train-5 --teacher gemma3-270m --student smollm2-135m

For one SVAMP training item and its PaLM rationale (cut before "The answer is", data.py) it prints eight blocks, each
headed by its equation and the function that computes it (a place for a breakpoint): the text (docs/design.md, "Text
layout"), the steps and critical words as character spans (Eq. 2/3), their token groups under each tokenizer (App.
C.2), A_t of the first and last teacher layer (Eq. 2), G and p_t (Eq. 4), p_s of a fresh router (Eq. 5), the mixed
A_t and A_s, their row softmaxes and L_att (Eq. 6), and the loss of the step (Eq. 1, Eq. 7). Numbers have 4
decimals; tables show at most 8 steps x 10 words (and say when they cut).

Nothing is trained: the loss is one call of train.step (Eq. 7) under no_grad, with train.py's flags, a fresh router
(as at step 0) and the example's teacher cache and features built as train.py builds them. The blocks before it
recompute each equation from that cache and the step's own A_s and p_s, so block 7's L_att is the step's, term by
term. Both models load with the capturing attention (`models.load_model(..., attn_implementation=capture.register())`).
"""

import contextlib

import torch

import capture
import data
import losses
import mol
import spans
import train
from plumbing import cli, fetch, flags, models
from teacher import build_attention_cache

ROWS, COLS, PER_LINE = 8, 10, 10  # table size shown; layers (or steps) per line of a per-layer row


@torch.no_grad()
def walk(teacher, t_tok, student, s_tok, example, tau1=0.1, tau2=0.5, alpha=0.5, beta=1.0, max_length=512):
    """Every quantity of one MoLSAKI step on `example` {id, question, answer, rationale}, the rationale without its
    answer statement: the step is one call of train.step on the example's features (built on its teacher cache as
    train.py builds them), with train.py's flags but tau1, tau2, alpha, beta and max_length as given, its attention
    read by capture.capture with the record kept (so A_s, the value states and p_s are the step's own); its parts
    are under "step". Both models must run the capturing attention (attn_implementation=capture.register()).
    Tensors are float32 on the CPU; the router (fresh, as at step 0), the features and the teacher cache are returned
    too."""
    args = flags.parse_args(["--method", "molsaki", "--tau1", repr(tau1), "--tau2", repr(tau2), "--alpha", repr(alpha),
                             "--beta", repr(beta), "--max-length", str(max_length)])
    q, r = example["question"], example["rationale"]
    # Eq. 2/3: M1/N1 and M2/N2 as character spans; the token groups as the cache (teacher) and features (student)
    # find them, the student's with room for EOS (data.task_ids)
    text, steps, words = spans.example_spans(q, r, data.EXP_PROMPT, example.get("keywords"), args.delimiters)
    t_ids, t_steps, t_words = spans.encode(t_tok, text, steps, words, max_length)
    s_ids, s_steps, s_words = spans.encode(s_tok, text, steps, words, max_length - 1)
    step_ids, word_ids = spans.align(t_steps, s_steps), spans.align(t_words, s_words)  # App. C.2: one shape
    if not step_ids or not word_ids:
        raise ValueError(f"{example['id']}: no step or no critical word that both models keep, so no L_att")

    cache = build_attention_cache(teacher, t_tok, [example], {"delimiters": args.delimiters}, max_length, 1)
    item = cache["items"][example["id"]]  # Eq. 2 over the steps and words the teacher keeps
    A_t_layers = item["A"][:, [item["step_ids"].index(k) for k in step_ids]][
        :, :, [item["word_ids"].index(k) for k in word_ids]]  # [L1, S, W], both models' steps and words
    G = mol.column_gradient(A_t_layers)  # Eq. 4, [L1]
    p_t = mol.teacher_layer_weights(A_t_layers, tau1)  # Eq. 4, [L1]

    feat = train.features(args, [example], s_tok, cache)[0]
    router = mol.StudentRouter(capture.value_dim(student.config), student.config.num_hidden_layers, tau2)
    router = router.to(student.device)
    caps = []

    @contextlib.contextmanager
    def read_attention(lm, groups, values=False):  # capture.capture, its record kept for the blocks below
        with capture.capture(lm, groups, values=values) as cap:
            caps.append(cap)
            yield cap

    _, parts = train.step(student, router, data.collate([feat], s_tok.pad_token_id), **train.objective(args),
                          read_attention=read_attention)  # Eq. 1, 3, 4, 5, 6, 7
    parts = {k: v.float().cpu() for k, v in parts.items()}
    A_s_layers = caps[0].stepwise()[0].float().cpu()  # [L2, S, W], the step's L_exp forward
    values = caps[0].value_states()[0].float().cpu()  # [L2, N, d], one text: no padding
    p_s = parts["p_s"]  # Eq. 5, [L2]: the router on the step's value states (a batch of one: its mean is itself)

    A_t, A_s = mol.mix_layers(A_t_layers, p_t), mol.mix_layers(A_s_layers, p_s)  # Eq. 6, [S, W] each
    kl_steps = torch.stack([losses.stepwise_kl(A_t[i:i + 1], A_s[i:i + 1]) for i in range(len(step_ids))])  # [S]
    l_att = losses.stepwise_kl(A_t, A_s)  # Eq. 6: the mean of kl_steps; the step's parts["att"]
    return {"example": example, "text": text, "steps": steps, "words": words, "step_ids": step_ids,
            "word_ids": word_ids, "tau1": tau1, "tau2": tau2, "alpha": alpha, "beta": beta,
            "teacher_tokens": t_tok.convert_ids_to_tokens(t_ids), "student_tokens": s_tok.convert_ids_to_tokens(s_ids),
            "teacher_groups": (t_steps, t_words), "student_groups": (s_steps, s_words), "groups_s": feat["groups"],
            "cache": cache, "feature": feat, "A_t_layers": A_t_layers, "G": G, "p_t": p_t, "values": values,
            "router": router, "p_s": p_s, "A_s_layers": A_s_layers, "A_t": A_t, "A_s": A_s,
            "soft_t": A_t.softmax(-1), "soft_s": A_s.softmax(-1), "kl_steps": kl_steps, "l_att": l_att, "step": parts}


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
    _header(1, "Text layout (docs/design.md)", "spans.example_spans: data.EXP_PROMPT.format(question=q) + ' ' + r",
            out)
    out += ["  " + line for line in w["text"].split("\n")]

    _header(2, "Eq. 2/3 index sets", "spans.example_spans, spans.step_tiles (steps M1/N1, critical words M2/N2)",
            out)
    tiles = spans.step_tiles(w["steps"], len(w["text"]))  # each step owns its characters up to the next one's start
    out += [f"  s{k:<3} [{a}, {b})  {w['text'][a:b]!r}  owns [{c}, {d})"
            for k, ((a, b), (c, d)) in enumerate(zip(w["steps"], tiles, strict=True))]
    out += [f"  w{k:<3} [{a}, {b})  {w['text'][a:b]!r}" for k, (a, b) in enumerate(w["words"])]

    _header(3, "App. C.2 token groups", "spans.encode -> spans.token_groups, spans.align", out)
    _groups(w, out)

    L1, L2 = len(w["p_t"]), len(w["p_s"])
    _header(4, "Eq. 2  A_t of the first and last teacher layer",
            "teacher.build_attention_cache (capture.capture, no_grad, logits_to_keep=1)", out)
    out.append(f"A_l[s, w] = mean over heads of the attention of step s's tokens on word w's tokens; L1 = {L1} "
               "layers, numbered from 1 as in the paper")
    for layer in (0, L1 - 1):
        _table(f"A_t, layer {layer + 1}", w["A_t_layers"][layer], w, out)

    _header(5, "Eq. 4  G, p_t", f"mol.column_gradient, mol.teacher_layer_weights (tau1 = {w['tau1']})", out)
    out.append("G = mean |A_l[i, j+1] - A_l[i, j]| over steps i and adjacent words j; p_t = softmax(G / tau1)")
    _rows("layer", ["G", "p_t"], [w["G"], w["p_t"]], out)

    _header(6, "Eq. 5  p_s", f"mol.StudentRouter(d = {w['values'].shape[-1]}, L2 = {L2}, tau2 = {w['tau2']}) on "
            "capture.capture(values=True).value_states(), in train.step", out)
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

    _header(8, "Eq. 1 and Eq. 7  the loss of one step", "train.step on data.features -> data.collate: "
            "losses.target_cross_entropy (data.task_ids labels), losses.total_loss", out)
    a, b, parts = w["alpha"], w["beta"], w["step"]
    out += [f"  L_pre = {parts['pre'].item():.4f}  (target ' {e['answer']}' + EOS after data.PRE_PROMPT)",
            f"  L_exp = {parts['exp'].item():.4f}  (target ' r' + EOS after data.EXP_PROMPT)",
            f"  L_att = {parts['att'].item():.4f}  (the step's; block 7 is the same term by term)",
            f"  L = {a} * L_pre + {1 - a} * L_exp + {b} * L_att = {parts['loss'].item():.4f}"]
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
        teacher, t_tok = models.load_model(args.teacher, attn_implementation=capture.register())
        student, s_tok = models.load_model(args.student, attn_implementation=capture.register())
    except (ValueError, OSError, ImportError, fetch.DataUnavailable) as e:
        cli.fail(e)
    print(report(walk(teacher.eval(), t_tok, student.eval(), s_tok, example)))


if __name__ == "__main__":
    main()
