"""Tests for mol.py (Eq. 4 and 5) against brute-force loops and hand-computed numbers."""

import math

import pytest
import torch

from mol import (
    StudentRouter,
    column_gradient,
    mix_layers,
    one_hot_weights,
    parse_layer_map,
    teacher_layer_weights,
)


def brute_column_gradient(A):
    L, S, W = A.shape
    out = []
    for layer in range(L):
        total, count = 0.0, 0
        for i in range(S):
            for j in range(W - 1):
                total += abs(float(A[layer, i, j + 1]) - float(A[layer, i, j]))
                count += 1
        out.append(total / count if count else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def test_column_gradient_matches_triple_loop():
    g = torch.Generator().manual_seed(0)
    A = torch.rand(5, 4, 7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(column_gradient(A), brute_column_gradient(A))


def test_column_gradient_hand_example():
    # layer 0: rows [0, 1, 3] and [2, 2, 2] -> (1 + 2 + 0 + 0) / (2 * 2) = 0.75
    # layer 1: rows [1, 0, 1] and [0, 4, 0] -> (1 + 1 + 4 + 4) / 4 = 2.5
    A = torch.tensor([[[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]], [[1.0, 0.0, 1.0], [0.0, 4.0, 0.0]]])
    torch.testing.assert_close(column_gradient(A), torch.tensor([0.75, 2.5]))


@pytest.mark.parametrize("shape", [(3, 4, 1), (3, 4, 0), (3, 0, 5)])
def test_column_gradient_degenerate_is_zero(shape):
    G = column_gradient(torch.rand(shape))
    assert G.shape == (3,)
    assert torch.all(G == 0)


def test_column_gradient_batched_matches_per_example():
    A = torch.rand(2, 3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(column_gradient(A), torch.stack([brute_column_gradient(a) for a in A]))


def test_teacher_layer_weights_hand_softmax():
    A = torch.tensor([[[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]], [[1.0, 0.0, 1.0], [0.0, 4.0, 0.0]]])
    tau1 = 0.7
    e0, e1 = math.exp(0.75 / tau1), math.exp(2.5 / tau1)
    expected = torch.tensor([e0 / (e0 + e1), e1 / (e0 + e1)])
    p = teacher_layer_weights(A, tau1=tau1)
    torch.testing.assert_close(p, expected)
    assert p.dtype == torch.float32


def test_teacher_layer_weights_sum_to_one_and_no_grad():
    A = torch.rand(6, 3, 4, requires_grad=True)
    p = teacher_layer_weights(A)  # default tau1 = 0.1
    assert not p.requires_grad
    assert p.shape == (6,)
    assert math.isclose(float(p.sum()), 1.0, rel_tol=1e-6)
    G = brute_column_gradient(A.detach())
    expected = torch.softmax(G / 0.1, dim=0).float()
    torch.testing.assert_close(p, expected)


def test_teacher_layer_weights_uniform_when_one_word():
    p = teacher_layer_weights(torch.rand(4, 3, 1))
    torch.testing.assert_close(p, torch.full((4,), 0.25))


def brute_router(router, values, mask=None):
    """Eq. 5 by hand: per layer, per token RMS norm, sum over real tokens, dot with w, softmax / tau2."""
    L, N, d = values.shape
    weight = router.norm.weight.detach().double()
    w = router.proj.weight.detach().double()[0]
    b = router.bias.detach().double()
    logits = []
    for layer in range(L):
        h = torch.zeros(d, dtype=torch.float64)
        for i in range(N):
            if mask is not None and not mask[i]:
                continue
            x = values[layer, i].double()
            rms = math.sqrt(float((x * x).mean()) + 1e-6)
            h += x / rms * weight
        logits.append(float(h @ w + b[layer]))
    exps = [math.exp((z - max(logits)) / router.tau2) for z in logits]
    return torch.tensor([e / sum(exps) for e in exps], dtype=torch.float64)


def make_router(d, n_layers=3, tau2=0.5, seed=0):
    torch.manual_seed(seed)
    router = StudentRouter(d, n_layers, tau2=tau2)
    with torch.no_grad():  # non-trivial weights (as after training), so that all of Eq. 5 is really used
        router.norm.weight.uniform_(0.5, 1.5)
        router.proj.weight.normal_(0.0, 0.5)
        router.bias.normal_(0.0, 1.0)
    return router


def test_fresh_router_is_uniform_and_learns():
    router = StudentRouter(6, 5)
    assert router.proj.bias is None and router.bias.shape == (5,)
    values = torch.randn(5, 40, 6) * 3 + 1  # large, correlated sums over 40 tokens
    torch.testing.assert_close(router(values), torch.full((5,), 0.2))
    (router(values) * torch.arange(5.0)).sum().backward()
    assert router.proj.weight.grad.abs().sum() > 0  # the gradient that moves p_s away from uniform
    assert router.bias.grad.abs().sum() > 0


def test_router_bias_per_layer_moves_p_s():
    """b has one entry per layer (b in R^L): a non-zero b changes p_s by exactly softmax(b / tau2) when w = 0,
    and gets a gradient; one scalar added to every layer (the old nn.Linear bias) would change nothing."""
    router = StudentRouter(6, 4, tau2=0.5)
    values = torch.randn(4, 7, 6)
    with torch.no_grad():
        router.bias.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
    p = router(values)
    torch.testing.assert_close(p, torch.softmax(torch.tensor([0.5, -1.0, 0.0, 2.0]) / 0.5, -1))
    (p * torch.tensor([1.0, 0.0, 0.0, 0.0])).sum().backward()
    grad = router.bias.grad
    assert grad.abs().sum() > 0 and grad[0] > 0 > grad[3]  # raising b[0] raises p_s[0]
    with torch.no_grad():
        router.bias.add_(3.0)  # the same shift for every layer: p_s unchanged
    torch.testing.assert_close(router(values), p)
    with pytest.raises(ValueError, match="layers"):
        router(torch.randn(3, 7, 6))


def test_router_matches_brute_force():
    router = make_router(8, 4, tau2=0.5)
    values = torch.randn(4, 5, 8) * 0.3  # [L, N, d]
    p = router(values)
    assert p.dtype == torch.float32 and p.shape == (4,)
    torch.testing.assert_close(p.double(), brute_router(router, values), rtol=1e-5, atol=1e-6)
    mask = torch.tensor([1, 0, 1, 1, 0])
    torch.testing.assert_close(router(values, mask).double(), brute_router(router, values, mask), rtol=1e-5,
                               atol=1e-6)


def test_router_padding_does_not_change_result():
    router = make_router(6)
    values = torch.randn(3, 4, 6) * 0.2
    junk = torch.randn(3, 5, 6) * 100.0
    padded = torch.cat([values, junk], dim=1)  # [L, 9, d]
    mask = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0])
    torch.testing.assert_close(router(padded, mask), router(values))


def test_router_batched_equals_per_example():
    router = make_router(6, 3, tau2=0.5, seed=1)
    L, d, lengths = 3, 6, [5, 2, 4]
    N = max(lengths)
    examples = [torch.randn(L, n, d) * 0.2 for n in lengths]
    batch = torch.randn(len(lengths), L, N, d) * 50.0  # junk in the padding
    mask = torch.zeros(len(lengths), N, dtype=torch.long)
    for b, (x, n) in enumerate(zip(examples, lengths, strict=True)):
        batch[b, :, :n] = x
        mask[b, :n] = 1
    p = router(batch, mask)  # [B, L]
    assert p.shape == (3, L)
    for b, x in enumerate(examples):
        torch.testing.assert_close(p[b], router(x))


def test_router_bf16_values_return_float32():
    router = make_router(6)
    values = torch.randn(3, 4, 6)
    p = router(values.bfloat16())
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, router(values.bfloat16().float()))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast does not leak into the router
        p_auto = router(values)
    assert p_auto.dtype == torch.float32
    torch.testing.assert_close(p_auto, router(values))


def test_router_gradients_reach_norm_and_proj():
    router = make_router(6)
    p = router(torch.randn(3, 4, 6), torch.tensor([1, 1, 0, 1]))
    (p * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    for param in (router.norm.weight, router.proj.weight, router.bias):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_router_forward_equals_eq5_literal():
    """The forward (RMSNorm's gain taken out of the sum over tokens, no normalised [..., L, N, d] copy) gives the p_s
    and the gradients, for the values and every parameter, of Eq. 5 written out term by term (`literal`)."""
    router = make_router(6)
    values = (torch.randn(2, 3, 5, 6) * 0.7).requires_grad_()
    weights = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.0, -1.0]])
    params = [values, router.norm.weight, router.proj.weight, router.bias]
    for mask in (torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]), None):
        p, expected = router(values, mask), router.literal(values, mask)
        torch.testing.assert_close(p, expected)
        for got, want in zip(torch.autograd.grad((p * weights).sum(), params),
                             torch.autograd.grad((expected * weights).sum(), params), strict=True):
            torch.testing.assert_close(got, want)


def test_router_state_dict_and_old_checkpoint():
    """The state-dict keys and shapes checkpoints were saved with, the eps of the norm, and a state dict written by
    the previous (factored) router with the p_s it gave, recorded from that class."""
    router = StudentRouter(5, 3, tau2=0.5)
    assert {k: tuple(v.shape) for k, v in router.state_dict().items()} == {
        "norm.weight": (5,), "proj.weight": (1, 5), "bias": (3,)}
    assert router.norm.eps == 1e-6
    old = {"bias": torch.tensor([0.1, -0.2, 0.3]),
           "norm.weight": torch.tensor([1.0, 1.1, 1.2, 1.3, 1.4]),
           "proj.weight": 0.3 * torch.cos(torch.arange(5.0))[None]}
    router.load_state_dict(old)  # strict
    values = torch.sin(torch.arange(60.0).reshape(3, 4, 5)) * torch.tensor([1.0, 2.0, 3.0])[:, None, None]
    torch.testing.assert_close(router(values), torch.tensor([0.01632695, 0.01671341, 0.96695966]))
    torch.testing.assert_close(router(values, torch.tensor([1, 1, 0, 1])),
                               torch.tensor([0.06262811, 0.14046040, 0.79691154]))
    torch.testing.assert_close(router.literal(values), torch.tensor([0.01632695, 0.01671341, 0.96695966]))


def test_router_rejects_bad_mask():
    router = make_router(6)
    with pytest.raises(ValueError, match="mask"):
        router(torch.randn(3, 4, 6), torch.ones(5))


def test_mix_layers_matches_loop():
    A = torch.rand(4, 3, 5, dtype=torch.float64)
    p = torch.softmax(torch.randn(4, dtype=torch.float64), dim=0)
    expected = torch.zeros(3, 5, dtype=torch.float64)
    for layer in range(4):
        expected += p[layer] * A[layer]
    torch.testing.assert_close(mix_layers(A, p), expected)
    # batched: [B, L, S, W] with [B, L]
    A2 = torch.rand(2, 4, 3, 5, dtype=torch.float64)
    p2 = torch.softmax(torch.randn(2, 4, dtype=torch.float64), dim=1)
    out = mix_layers(A2, p2)
    for b in range(2):
        expected = sum(p2[b, k] * A2[b, k] for k in range(4))
        torch.testing.assert_close(out[b], expected)
    with pytest.raises(ValueError):
        mix_layers(A, p[:3])


def test_mix_layers_with_one_hot_selects_layer():
    A = torch.rand(5, 2, 3)
    torch.testing.assert_close(mix_layers(A, one_hot_weights(3, 5)), A[3])


def test_parse_layer_map():
    assert parse_layer_map("14:17", 32, 24) == (13, 16)
    assert parse_layer_map("1:1", 32, 24) == (0, 0)
    assert parse_layer_map("32:24", 32, 24) == (31, 23)
    assert parse_layer_map("last", 32, 24) == (31, 23)
    with pytest.raises(ValueError, match="1..32"):
        parse_layer_map("0:1", 32, 24)
    with pytest.raises(ValueError, match="1..32"):
        parse_layer_map("33:1", 32, 24)
    with pytest.raises(ValueError, match="1..24"):
        parse_layer_map("3:25", 32, 24)
    for bad in ("x", "14", "14:", "1:2:3", "-1:2", ""):
        with pytest.raises(ValueError, match="T:S"):
            parse_layer_map(bad, 32, 24)


def test_one_hot_weights():
    w = one_hot_weights(2, 4)
    assert w.tolist() == [0.0, 0.0, 1.0, 0.0]
    assert w.dtype == torch.float32
    with pytest.raises(ValueError):
        one_hot_weights(4, 4)
