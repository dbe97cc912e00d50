"""Eq. 2/3: the definition (attention.py) against a brute-force loop, and the fast capture (capture.py) against
eager attention."""

import random

import pytest
import torch
from tiny_models import ARCHS, tiny_model

import attention
import capture
from attention import stepwise_attention, stepwise_from_attentions


def brute_force(probs, steps, words):
    H = probs.shape[0]
    out = [[0.0] * len(words) for _ in steps]
    for s, rows in enumerate(steps):
        for w, cols in enumerate(words):
            for h in range(H):
                for i in rows:
                    for j in cols:
                        out[s][w] += probs[h, i, j].item() / H
    return torch.tensor(out, dtype=torch.float64)


def test_stepwise_attention_matches_loop():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 12, 12, generator=g, dtype=torch.float64).softmax(-1)
    steps, words = [[0, 1, 2, 3], [4, 5, 6], [8, 9, 10, 11]], [[1], [2, 3], [6], [10, 11]]
    torch.testing.assert_close(stepwise_attention(probs, steps, words), brute_force(probs, steps, words))
    # a [N, N] matrix is one head
    torch.testing.assert_close(stepwise_attention(probs[0], steps, words), brute_force(probs[:1], steps, words))


def test_stepwise_attention_hand_example():
    P = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    A = stepwise_attention(P, steps=[[0], [1, 2]], words=[[0], [1, 2]])
    torch.testing.assert_close(A, torch.tensor([[1.0, 0.0], [0.7, 1.3]]))
    assert stepwise_attention(P, [], [[0]]).shape == (0, 1)


def enable_capture(model):
    """Switch a loaded model to the capturing attention."""
    model.set_attn_implementation(capture.register())
    return model


def make_batch(lengths, pad_side, vocab, seed):
    """Token ids, attention mask and random step/word groups (positions in the padded rows)."""
    rnd = random.Random(seed)
    N = max(lengths)
    ids = torch.zeros(len(lengths), N, dtype=torch.long)
    mask = torch.zeros(len(lengths), N, dtype=torch.long)
    groups = []
    for b, n in enumerate(lengths):
        start = N - n if pad_side == "left" else 0
        ids[b, start:start + n] = torch.tensor([rnd.randrange(vocab) for _ in range(n)])
        mask[b, start:start + n] = 1
        cuts = sorted(rnd.sample(range(2, n - 1), 2))  # three steps; token 0 (like <bos>) in none
        steps = [list(range(start + a, start + z)) for a, z in zip([1] + cuts, cuts + [n], strict=True)]
        pos = sorted(rnd.sample(range(n), 5))
        words = [[start + pos[0]], [start + pos[1], start + pos[2]], [start + pos[3]], [start + pos[4]]]
        groups.append((steps, words[: 2 + b]))  # examples differ in W
    return ids, mask, groups


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))


@pytest.mark.parametrize("device", ["cpu", CUDA])  # CUDA: other SDPA kernels, same tolerances (float32)
@pytest.mark.parametrize("block", [128, 4])  # query rows per block of _CriticalProbs: one block, or several
@pytest.mark.parametrize("pad_side", ["left", "right", "none"])  # none: no mask, SDPA's is_causal
@pytest.mark.parametrize("arch", ARCHS)
def test_capture_equals_eager(arch, pad_side, block, device, monkeypatch):
    monkeypatch.setattr(capture, "BLOCK", block)
    model = tiny_model(arch, attn="eager").to(device)
    lengths = [14, 14, 14] if pad_side == "none" else [14, 9, 12]
    ids, mask, groups = make_batch(lengths, pad_side, 512, seed=hash(arch) % 100)
    ids, mask = ids.to(device), mask.to(device)
    weights = [torch.randn(3, len(w), generator=torch.Generator().manual_seed(b)).to(device)
               for b, (_, w) in enumerate(groups)]

    def grads(A_list):
        model.zero_grad()
        sum((A * w).sum() for A, w in zip(A_list, weights, strict=True)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out = model(ids, attention_mask=mask, output_attentions=True)
    eager = stepwise_from_attentions(out.attentions, groups)
    eager_grads = grads(eager)

    enable_capture(model)
    with capture.capture(model, groups) as cap:
        fast_logits = model(ids, attention_mask=mask).logits
    fast = cap.stepwise()
    assert len(fast) == 3
    for A_e, A_f, (steps, words) in zip(eager, fast, groups, strict=True):
        assert A_f.shape == (model.config.num_hidden_layers, len(steps), len(words))
        torch.testing.assert_close(A_f, A_e, atol=1e-5, rtol=0)
    fast_grads = grads(fast)
    assert fast_grads.keys() >= eager_grads.keys() and len(eager_grads) > 0
    for name in fast_grads:  # the last layer's values reach A only through its SDPA call: gradient zero, not None
        expected = eager_grads.get(name, torch.zeros_like(fast_grads[name]))
        torch.testing.assert_close(fast_grads[name], expected, atol=1e-4, rtol=0, msg=name)

    # the layer output is untouched: same logits as plain SDPA on every real token
    model.set_attn_implementation("sdpa")
    real = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(fast_logits.detach()[real], model(ids, attention_mask=mask).logits[real],
                                   atol=1e-5, rtol=0)


def test_teacher_pass_no_grad_logits_to_keep():
    model = enable_capture(tiny_model("gemma3", attn="eager"))
    ids, mask, groups = make_batch([13, 10], "left", 512, seed=3)
    with torch.no_grad(), capture.capture(model, groups) as cap:
        out = model(ids, attention_mask=mask, logits_to_keep=1)
    assert out.logits.shape[1] == 1
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = stepwise_from_attentions(model(ids, attention_mask=mask, output_attentions=True).attentions, groups)
    for A_f, A_e in zip(cap.stepwise(), ref, strict=True):
        assert not A_f.requires_grad
        torch.testing.assert_close(A_f, A_e, atol=1e-5, rtol=0)


def test_value_states_are_the_value_projection():
    model = enable_capture(tiny_model("llama"))
    ids, mask, groups = make_batch([11, 8], "right", 512, seed=5)
    seen = {}
    hooks = [layer.self_attn.v_proj.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o))
             for k, layer in enumerate(model.model.layers)]
    with capture.capture(model, groups, values=True) as cap:
        model(ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    V = cap.value_states()  # [B, L, N, d]
    assert V.shape == (2, 3, 11, 2 * 8)
    torch.testing.assert_close(V, torch.stack([seen[k] for k in range(3)], 1))


def test_capture_requires_the_registered_attention():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"attn_implementation=capture\.register\(\)"):
        with capture.capture(model, [([[0]], [[0]])]):
            pass


def test_stepwise_from_attentions_batched_equals_per_example():
    g = torch.Generator().manual_seed(7)
    attentions = [torch.rand(3, 2, 10, 10, generator=g, dtype=torch.float64).softmax(-1) for _ in range(4)]
    groups = [([[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]], [[1], [4, 5], [5, 6], [9]]),  # token 5 in two words
              ([[2, 3]], [[0, 1]]),
              ([[1, 2], [5, 9]], [])]  # no word: [L, 2, 0]
    batched = attention.stepwise_from_attentions_batched(attentions, groups)
    for A_b, A_e, (steps, words) in zip(batched, stepwise_from_attentions(attentions, groups), groups, strict=True):
        assert A_b.shape == (4, len(steps), len(words)) and A_b.dtype == torch.float64
        torch.testing.assert_close(A_b, A_e)
    for layer, P in enumerate(attentions):  # and against the brute-force loop
        torch.testing.assert_close(batched[0][layer], brute_force(P[0], *groups[0]))


def test_capture_is_pre_dropout():
    """GPT-2 trains with attention dropout: A is pre-dropout, the layer output is not."""
    model = tiny_model("gpt2", attn="eager")
    model.config.attn_pdrop = 0.5
    for block in model.transformer.h:
        block.attn.attn_dropout.p = 0.5
    model.transformer.drop.p = 0.0  # no embedding dropout: layer 0's query and key see no dropout at all
    ids, mask, groups = make_batch([14, 9], "right", 512, seed=11)
    weights = [torch.randn(len(s), len(w), generator=torch.Generator().manual_seed(b))
               for b, (s, w) in enumerate(groups)]

    def layer0_grads(A_list):  # the gradient of layer 0's A: through the dropout-free call that gives pi
        model.zero_grad()
        sum((A[0] * w).sum() for A, w in zip(A_list, weights, strict=True)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager = stepwise_from_attentions(model(ids, attention_mask=mask, output_attentions=True).attentions, groups)
    eager_grads = layer0_grads(eager)  # eval: no dropout, the oracle
    with torch.no_grad():
        clean = model(ids, attention_mask=mask).logits
    enable_capture(model).train()
    torch.manual_seed(0)
    with capture.capture(model, groups) as cap:
        dropped = model(ids, attention_mask=mask).logits
    for A_f, A_e in zip(cap.stepwise(), eager, strict=True):
        torch.testing.assert_close(A_f[0], A_e[0], atol=1e-5, rtol=0)
    fast_grads = layer0_grads(cap.stepwise())
    assert fast_grads.keys() == eager_grads.keys() and len(fast_grads) > 0
    for name in eager_grads:
        torch.testing.assert_close(fast_grads[name], eager_grads[name], atol=1e-4, rtol=0, msg=name)
    assert (dropped - clean).abs().max() > 1e-2  # dropout did act on the layer output


def test_blocks_skip_rows_outside_steps_and_hidden_critical_tokens(monkeypatch):
    monkeypatch.setattr(capture, "BLOCK", 4)
    groups = [([[3, 4, 5], [6, 7, 8]], [[1], [4, 5], [9]]), ([[5, 6]], [[0], [2]]), ([], [[3]])]
    tokens = [[1, 4, 5, 9], [0, 2], [3]]
    # rows 3..8 (the first and last step rows); kc counts the critical tokens before r1, the most of any example
    assert capture._blocks(groups, tokens) == [(3, 7, 3), (7, 9, 3)]
    assert capture._blocks([([], [[1]])], [[1]]) == []


def test_critical_probs_by_hand_equals_autograd(monkeypatch):
    """_CriticalProbs (blocks of rows, in place, softmax run again in backward, gradient by hand) against
    autograd straight through the readable critical_probs: the same [B, N, K] and the same gradients for
    query, key and pi, with grouped-query heads, a padded critical slot, rows that see no critical token, three
    blocks of rows, under bf16 autocast."""
    monkeypatch.setattr(capture, "BLOCK", 4)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 10, 8, generator=g).requires_grad_()
    k = torch.randn(2, 2, 10, 8, generator=g).requires_grad_()  # 2 KV heads for 4 query heads
    groups = [([list(range(10))], [[1], [4], [7]]), ([list(range(10))], [[0], [2]])]
    rows, cols, valid, member, hit, blocks = capture._index(groups, 10, "cpu")
    assert cols.tolist() == [[1, 4, 7], [0, 2, 0]] and blocks == [(0, 4, 2), (4, 8, 3), (8, 10, 3)]
    bias = capture._critical_bias(None, cols, valid, 10)  # causal
    seen = (bias == 0).any(-1)  # [B, 1, N]: the row sees some critical token (not row 0 of example 0)
    pi = (torch.rand(2, 4, 10, generator=g) * seen).requires_grad_()  # as the layer gives it: 0 where none is seen
    w = torch.randn(2, 10, 3, generator=g)

    def run(fn, *extra):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(q, k, pi, cols, bias, 0.35, *extra)
        assert out.dtype == torch.float32
        dq, dk, dpi = torch.autograd.grad((out * w).sum(), (q, k, pi))
        # where a row sees no critical token, pi is 0 whatever the scores: the layer's backward gives no weight
        # to its gradient there (the extra value column is 0 on every key that row sees)
        return out, dq, dk, dpi * seen

    direct = run(attention.critical_probs)
    assert all(d.abs().sum() > 0 for d in direct)
    assert direct[0][0, 0].abs().sum() == 0 and direct[0][1, :, 2].abs().sum() == 0  # row sees none; padding slot
    for by_hand, d in zip(run(capture._CriticalProbs.apply, blocks), direct, strict=True):
        torch.testing.assert_close(by_hand, d, atol=1e-6, rtol=1e-5)


def test_capture_under_autocast_sums_in_float32():
    """Under bf16 autocast the word attention is bf16, like the layer's own; the sums over steps stay float32."""
    model = tiny_model("llama", attn="eager")
    ids, mask, groups = make_batch([14, 9, 12], "right", 512, seed=4)
    with torch.no_grad():
        eager = stepwise_from_attentions(model(ids, attention_mask=mask, output_attentions=True).attentions, groups)
    enable_capture(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), capture.capture(model, groups) as cap:
        model(ids, attention_mask=mask)
    for A_f, A_e in zip(cap.stepwise(), eager, strict=True):
        assert A_f.dtype == torch.float32
        torch.testing.assert_close(A_f, A_e, atol=3e-2, rtol=0)  # bf16 attention, float32 sums
