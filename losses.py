"""Losses: Eq. 1 (L_pre, L_exp), Eq. 6 (L_att), Eq. 7 (the total) and the MMI baseline (paper §4.1).

    target_cross_entropy(logits [B, N, V], labels [B, N]) -> scalar        Eq. 1
    stepwise_kl(A_t [S, W], A_s [S, W]) -> scalar                          Eq. 6, one example
    attention_loss([(A_t, A_s), ...]) -> (scalar, number of examples used) Eq. 6, mean over examples
    total_loss(l_pre, l_exp, l_att, alpha, beta) -> scalar                 Eq. 7
    mmi_loss(pre_logits, pre_labels, exp_logits, exp_labels) -> scalar     the MMI baseline

Conventions:
- Labels follow the Hugging Face convention: aligned with input_ids, IGNORE_INDEX (-100) marks a
  non-target position, and position t predicts the label at t + 1 (the shift happens here).
- All loss math runs in at least float32 (bf16 / fp16 inputs are promoted; float64 stays float64).
- The teacher side of Eq. 6 and the answer side of MMI are constants: no gradient reaches them.
- Only the list form of L_att is provided: A_t / A_s come per example with their own (S, W).
- The choices the paper leaves open (the means, the MMI formula) are in docs/design.md, "Losses and baselines".
"""

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def _at_least_f32(x: Tensor) -> Tensor:
    # bf16 / fp16 -> float32; float32 and float64 stay as they are
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _shifted_targets(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Shift so that position t predicts label t + 1. Returns logits [B, N-1, V], labels [B, N-1], mask."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"expected logits [B, N, V] and labels [B, N], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    logits, labels = logits[:, :-1], labels[:, 1:]  # [B, N-1, V], [B, N-1]
    return logits, labels, labels != IGNORE_INDEX


def target_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Eq. 1: cross-entropy averaged over every target token of the batch (0 when there is none)."""
    logits, labels, target = _shifted_targets(logits, labels)
    picked = _at_least_f32(logits[target])  # [T, V], only the target positions go to float32
    total = F.cross_entropy(picked, labels[target], reduction="sum")
    return total / max(int(target.sum()), 1)


def stepwise_kl(A_t: Tensor, A_s: Tensor) -> Tensor:
    """Eq. 6 for one example: mean over steps i of KL(softmax(A_t[i]) || softmax(A_s[i])), softmax over W."""
    if A_t.shape != A_s.shape or A_t.dim() != 2 or A_t.numel() == 0:
        raise ValueError(f"expected two non-empty [S, W] matrices of one shape, got {tuple(A_t.shape)} and "
                         f"{tuple(A_s.shape)}")
    log_t = F.log_softmax(_at_least_f32(A_t.detach()), dim=-1)  # [S, W], constant target
    log_s = F.log_softmax(_at_least_f32(A_s), dim=-1)  # [S, W]
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=-1)  # [S]
    return kl.mean()


def attention_loss(pairs: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, int]:
    """Eq. 6 over a batch: mean of stepwise_kl over the examples with S >= 1 and W >= 1, and their count."""
    kls = [stepwise_kl(A_t, A_s) for A_t, A_s in pairs if A_s.numel() > 0]  # numel 0 <=> S == 0 or W == 0
    if not kls:
        device = pairs[0][1].device if pairs else None
        return torch.zeros((), dtype=torch.float32, device=device), 0
    return torch.stack(kls).mean(), len(kls)


def total_loss(l_pre: Tensor, l_exp: Tensor, l_att: Tensor, alpha: float = 0.5, beta: float = 1.0) -> Tensor:
    """Eq. 7: alpha L_pre + (1 - alpha) L_exp + beta L_att."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return alpha * l_pre + (1.0 - alpha) * l_exp + beta * l_att


def _max_target_probs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per example, the max over target positions of softmax(logits) [B, V], and whether it has any [B]."""
    logits, _, target = _shifted_targets(logits, labels)
    rows = []
    for b in range(logits.shape[0]):
        probs = F.softmax(_at_least_f32(logits[b][target[b]]), dim=-1)  # [T_b, V]
        rows.append(probs.amax(dim=0) if len(probs) else probs.new_zeros(probs.shape[1:]))  # [V]
    return torch.stack(rows), target.any(dim=1)


def mmi_loss(pre_logits: Tensor, pre_labels: Tensor, exp_logits: Tensor, exp_labels: Tensor) -> Tensor:
    """MMI baseline (Chen et al. 2024, as their code computes it): mean_b sum_v -p[b, v] log_softmax(q[b])[v].

    p = max over answer-target positions of softmax(pre logits), a constant; q = the same over the
    rationale-target positions of the exp logits (a probability that goes through softmax again).
    Examples without a target on either side are skipped; with none left the loss is 0.
    """
    p, has_p = _max_target_probs(pre_logits.detach(), pre_labels)  # [B, V], [B]
    q, has_q = _max_target_probs(exp_logits, exp_labels)  # [B, V], [B]
    keep = has_p & has_q
    if not keep.any():
        return torch.zeros((), dtype=torch.float32, device=exp_logits.device)
    p, q = p[keep].to(q.dtype), q[keep]
    return -(p * F.log_softmax(q, dim=-1)).sum(dim=-1).mean()
