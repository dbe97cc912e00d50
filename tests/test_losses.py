"""Tests for losses.py (Eq. 1, 6, 7 and MMI) against brute-force loops with math.log and hand numbers."""

import math

import pytest
import torch
import torch.nn.functional as F

from losses import attention_loss, mmi_loss, stepwise_kl, target_cross_entropy, total_loss


def softmax_list(xs):
    m = max(xs)
    exps = [math.exp(x - m) for x in xs]
    return [e / sum(exps) for e in exps]


def brute_cross_entropy(logits, labels):
    """Position t predicts labels[t + 1]; -100 is no target; mean over all target tokens of the batch."""
    B, N, _ = logits.shape
    total, count = 0.0, 0
    for b in range(B):
        for t in range(N - 1):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            probs = softmax_list([float(x) for x in logits[b, t]])
            total += -math.log(probs[y])
            count += 1
    return total / count


def random_labels(B, N, V, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, N), generator=g)
    labels[torch.rand(B, N, generator=g) < 0.4] = -100
    labels[:, 0] = 5  # never a target: nothing predicts position 0
    return labels


def test_target_cross_entropy_matches_loop():
    B, N, V = 3, 6, 7
    logits = torch.randn(B, N, V, dtype=torch.float64)
    labels = random_labels(B, N, V, seed=0)
    loss = target_cross_entropy(logits, labels)
    assert math.isclose(float(loss), brute_cross_entropy(logits, labels), rel_tol=1e-10)


def test_target_cross_entropy_equals_torch_on_hand_shifted():
    B, N, V = 2, 5, 9
    logits = torch.randn(B, N, V)
    labels = random_labels(B, N, V, seed=1)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(target_cross_entropy(logits, labels), expected)


def test_target_cross_entropy_ignores_minus_100_and_bf16_is_float32():
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[-100, 2, -100, -100]])
    expected = -torch.log_softmax(logits[0, 0], dim=-1)[2]
    torch.testing.assert_close(target_cross_entropy(logits, labels), expected)
    out = target_cross_entropy(logits.bfloat16(), labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, target_cross_entropy(logits.bfloat16().float(), labels))


def test_target_cross_entropy_no_targets_is_zero_and_shape_checked():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    loss = target_cross_entropy(logits, torch.full((2, 3), -100))
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph
    with pytest.raises(ValueError):
        target_cross_entropy(logits, torch.zeros(2, 4, dtype=torch.long))


def brute_stepwise_kl(A_t, A_s):
    S, W = A_t.shape
    total = 0.0
    for i in range(S):
        pt = softmax_list([float(x) for x in A_t[i]])
        ps = softmax_list([float(x) for x in A_s[i]])
        total += sum(pt[j] * (math.log(pt[j]) - math.log(ps[j])) for j in range(W))
    return total / S


def test_stepwise_kl_matches_loop():
    A_t, A_s = torch.rand(4, 5, dtype=torch.float64), torch.rand(4, 5, dtype=torch.float64)
    assert math.isclose(float(stepwise_kl(A_t, A_s)), brute_stepwise_kl(A_t, A_s), rel_tol=1e-10)


def test_stepwise_kl_hand_example():
    # one step, two words: p = softmax([0, 0]) = [.5, .5], q = softmax([log 3, 0]) = [.75, .25]
    # KL = .5 log(.5/.75) + .5 log(.5/.25)
    A_t = torch.tensor([[0.0, 0.0]])
    A_s = torch.tensor([[math.log(3.0), 0.0]])
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert math.isclose(float(stepwise_kl(A_t, A_s)), expected, rel_tol=1e-6)


def test_stepwise_kl_zero_when_equal_and_for_one_word():
    A = torch.rand(3, 4)
    assert abs(float(stepwise_kl(A, A.clone()))) < 1e-7
    assert float(stepwise_kl(torch.rand(3, 1), torch.rand(3, 1))) == 0.0


def test_stepwise_kl_gradient_only_to_student():
    A_t = torch.rand(3, 4, requires_grad=True)
    A_s = torch.rand(3, 4, requires_grad=True)
    stepwise_kl(A_t, A_s).backward()
    assert A_t.grad is None
    assert A_s.grad is not None and A_s.grad.abs().sum() > 0


def test_stepwise_kl_bf16_student_is_float32():
    A_t, A_s = torch.rand(2, 3), torch.rand(2, 3)
    out = stepwise_kl(A_t, A_s.bfloat16())
    assert out.dtype == torch.float32
    assert math.isclose(float(out), brute_stepwise_kl(A_t, A_s.bfloat16().float()), rel_tol=1e-5)


def test_stepwise_kl_rejects_bad_shapes():
    with pytest.raises(ValueError):
        stepwise_kl(torch.rand(2, 3), torch.rand(2, 4))
    with pytest.raises(ValueError):
        stepwise_kl(torch.rand(0, 3), torch.rand(0, 3))


def test_attention_loss_skips_empty_and_counts():
    a = (torch.rand(2, 3, dtype=torch.float64), torch.rand(2, 3, dtype=torch.float64))
    b = (torch.rand(4, 2, dtype=torch.float64), torch.rand(4, 2, dtype=torch.float64))
    no_word = (torch.rand(3, 0), torch.rand(3, 0))
    no_step = (torch.rand(0, 5), torch.rand(0, 5))
    loss, n = attention_loss([a, no_word, b, no_step])
    assert n == 2
    expected = (brute_stepwise_kl(*a) + brute_stepwise_kl(*b)) / 2
    assert math.isclose(float(loss), expected, rel_tol=1e-10)


def test_attention_loss_none_usable():
    for pairs in ([], [(torch.rand(0, 2), torch.rand(0, 2))]):
        loss, n = attention_loss(pairs)
        assert n == 0
        assert loss.dtype == torch.float32 and loss.shape == () and float(loss) == 0.0


def test_total_loss_eq7():
    l_pre, l_exp, l_att = torch.tensor(2.0), torch.tensor(4.0), torch.tensor(0.5)
    assert float(total_loss(l_pre, l_exp, l_att)) == pytest.approx(0.5 * 2 + 0.5 * 4 + 1.0 * 0.5)
    assert float(total_loss(l_pre, l_exp, l_att, alpha=0.25, beta=0.1)) == pytest.approx(
        0.25 * 2 + 0.75 * 4 + 0.1 * 0.5)
    assert float(total_loss(l_pre, l_exp, l_att, alpha=0.5, beta=0.0)) == pytest.approx(3.0)  # DSS
    with pytest.raises(ValueError):
        total_loss(l_pre, l_exp, l_att, alpha=1.5)


def brute_max_probs(logits, labels, b):
    """max over target positions t (labels[b, t + 1] != -100) of softmax(logits[b, t]), or None."""
    _, N, V = logits.shape
    best = None
    for t in range(N - 1):
        if int(labels[b, t + 1]) == -100:
            continue
        probs = softmax_list([float(x) for x in logits[b, t]])
        best = probs if best is None else [max(x, y) for x, y in zip(best, probs, strict=True)]
    return best


def brute_mmi(pre_logits, pre_labels, exp_logits, exp_labels):
    terms = []
    for b in range(pre_logits.shape[0]):
        p = brute_max_probs(pre_logits, pre_labels, b)
        q = brute_max_probs(exp_logits, exp_labels, b)
        if p is None or q is None:
            continue
        log_sq = [math.log(x) for x in softmax_list(q)]
        terms.append(sum(-pv * lq for pv, lq in zip(p, log_sq, strict=True)))
    return sum(terms) / len(terms)


def test_mmi_loss_matches_loop_with_padding():
    B, V = 4, 6
    pre_logits = torch.randn(B, 5, V, dtype=torch.float64) * 3
    exp_logits = torch.randn(B, 8, V, dtype=torch.float64, requires_grad=True)
    pre_labels = random_labels(B, 5, V, seed=2)
    exp_labels = random_labels(B, 8, V, seed=3)
    pre_labels[:, 1:3] = 1  # every example has answer targets...
    exp_labels[:, 2] = 0  # ...and rationale targets
    exp_labels[2, :] = -100  # except example 2: no rationale target, skipped
    exp_labels[0, 5:] = -100  # right padding
    loss = mmi_loss(pre_logits, pre_labels, exp_logits, exp_labels)
    expected = brute_mmi(pre_logits, pre_labels, exp_logits.detach(), exp_labels)
    assert math.isclose(loss.item(), expected, rel_tol=1e-10)
    loss.backward()
    assert exp_logits.grad.abs().sum() > 0
    assert exp_logits.grad[2].abs().sum() == 0  # the skipped example gets no gradient


def test_mmi_loss_answer_side_is_constant():
    pre_logits = torch.randn(2, 4, 5, requires_grad=True)
    exp_logits = torch.randn(2, 6, 5, requires_grad=True)
    labels_pre = torch.tensor([[-100, 1, 2, -100], [-100, -100, 3, 4]])
    labels_exp = torch.tensor([[-100, 0, 1, 2, -100, -100], [-100, 4, 4, 4, 4, 4]])
    mmi_loss(pre_logits, labels_pre, exp_logits, labels_exp).backward()
    assert pre_logits.grad is None
    assert exp_logits.grad is not None


def test_mmi_loss_no_usable_example_is_zero():
    logits = torch.randn(2, 3, 4)
    loss = mmi_loss(logits, torch.full((2, 3), -100), logits, torch.ones(2, 3, dtype=torch.long))
    assert float(loss) == 0.0 and loss.dtype == torch.float32
