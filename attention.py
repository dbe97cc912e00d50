"""Stepwise attention on critical tokens: the definition of Eq. 2 (teacher) and Eq. 3 (student), in torch alone.

For one layer with post-softmax attention probabilities P[h, i, j] (query i, key j; before any attention dropout),
step s and critical word w:

    A[s, w] = mean_h  sum_{i in steps[s]}  sum_{j in words[w]}  P[h, i, j]          -> [S, W]

    stepwise_attention(probs [H, N, N], steps, words) -> A [S, W]                   Eq. 2/3, one example and layer
    stepwise_from_attentions(L x [B, H, N, N], groups) -> B x [L, S, W]             the naive route, eager attentions
    stepwise_from_attentions_batched(L x [B, H, N, N], groups) -> B x [L, S, W]     the same, batched (bench.py)
    critical_probs(query, key, pi, cols, bias, scaling) -> [B, N, K]                P on the K critical tokens only

`critical_probs` is the identity the fast route (capture.py) rests on: P on a subset of the keys is the softmax over
that subset times the subset's total share `pi`. This file imports torch alone and can be copied on its own;
capture.py computes the same A during an ordinary forward pass, without any [B, H, N, N] tensor. Token groups
(`steps`, `words`) are lists of token positions, one list per step / critical word, as `spans.encode` gives them;
in a padded batch they must be positions in the padded row.
"""

import torch


def stepwise_attention(probs, steps, words):
    """Eq. 2/3 for one layer. probs [H, N, N] or [N, N]; steps, words: lists of token-index lists."""
    P = probs.mean(0) if probs.dim() == 3 else probs  # [N, N], heads averaged
    A = P.new_zeros(len(steps), len(words))  # [S, W]
    for s, rows in enumerate(steps):
        for w, cols in enumerate(words):
            A[s, w] = P[rows][:, cols].sum()
    return A


def stepwise_from_attentions(attentions, groups):
    """Naive route: eager attentions (L tensors [B, H, N, N]) -> one [L, S, W] per example."""
    return [torch.stack([stepwise_attention(layer[b], steps, words) for layer in attentions])
            for b, (steps, words) in enumerate(groups)]


def stepwise_from_attentions_batched(attentions, groups):
    """`stepwise_from_attentions` for the whole batch at once: per layer rows @ mean_h P @ word membership."""
    dtype = torch.promote_types(attentions[0].dtype, torch.float32)
    N = attentions[0].shape[-1]
    _, rows, cols, _, member = _membership(groups, N)
    rows, cols, member = (t.to(attentions[0].device) for t in (rows, cols, member))
    rows, member = rows.to(dtype), member.to(dtype)
    cols = cols[:, None, :].expand(-1, N, -1)  # [B, N, K]
    A = torch.stack([rows @ P.mean(1).to(dtype).gather(-1, cols) @ member for P in attentions], 1)  # [B, L, S, W]
    return [A[b, :, :len(steps), :len(words)] for b, (steps, words) in enumerate(groups)]


def _membership(groups, n):
    """Membership tensors of a padded batch, on the host: tokens (per example its critical tokens, sorted), rows
    [B, S, N] (step membership), cols [B, K] (each example's critical tokens, padded with 0), valid [B, K] (not
    padding), member [B, K, W] (the words each critical token is in)."""
    B = len(groups)
    tokens = [sorted({j for word in words for j in word}) for _, words in groups]
    rows = torch.zeros(B, max(len(s) for s, _ in groups), n)
    cols = torch.zeros(B, max(1, max(len(t) for t in tokens)), dtype=torch.long)
    valid = torch.zeros(cols.shape, dtype=torch.bool)
    member = torch.zeros(B, cols.shape[1], max(len(w) for _, w in groups))
    for b, (steps, words) in enumerate(groups):
        for s, positions in enumerate(steps):
            rows[b, s, positions] = 1.0
        slot = {j: k for k, j in enumerate(tokens[b])}
        cols[b, :len(slot)], valid[b, :len(slot)] = torch.tensor(tokens[b], dtype=torch.long), True
        for w, positions in enumerate(words):
            member[b, [slot[j] for j in positions], w] = 1.0
    return tokens, rows, cols, valid, member


def _critical_keys(key, cols):
    """[B, H_kv, K, D] float32: the keys of the critical tokens cols [B, K]."""
    return key.gather(2, cols[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[-1])).float()


def critical_probs(query, key, pi, cols, bias, scaling):
    """[B, N, K]: mean over heads of P[h, i, j] for each example's K critical tokens j = cols[b].

    The softmax over all N keys, restricted to a subset of them, is the softmax over the subset alone times the
    subset's total share: P[h, i, j] = pi[h, i] * softmax_{j' in cols}(logits[h, i, j'] + bias[i, j'])[j], with
    pi [B, H, N] the layer's attention on all critical tokens together. So only the logits on the critical
    tokens are formed, [B, H, N, K] in float32, from the query [B, H, N, D] and key [B, H_kv, N, D]. A row that
    sees no critical token gets a uniform softmax, which counts for nothing: its pi is 0.

    bias [B, 1, N, K]: 0 where query row i sees critical token j under the layer's mask, the lowest float32
    elsewhere (padding slots of cols too). This is the readable form; capture.py's `_CriticalProbs` computes the
    same by blocks of query rows, in place, with its gradient by hand."""
    with torch.autocast(query.device.type, enabled=False):
        k = _critical_keys(key, cols).repeat_interleave(query.shape[1] // key.shape[1], 1)  # [B, H, K, D]
        logits = query.float() @ k.transpose(-1, -2) * scaling  # [B, H, N, K]
        weights = (logits + bias).softmax(-1)  # [B, H, N, K]
        return (pi.float()[..., None] * weights).mean(1)  # [B, H, N, K] -> [B, N, K]
