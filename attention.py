"""Stepwise attention on critical tokens: the sums of Eq. 2 (teacher) and Eq. 3 (student).

For one layer with post-softmax attention probabilities P[h, i, j] (SPEC §4):

    A[s, w] = mean_h  sum_{i in steps[s]}  sum_{j in words[w]}  P[h, i, j]          -> [S, W]

Public functions
- `stepwise_attention(probs, steps, words)`: the definition, for one example and one layer.
- `stepwise_from_attentions(attentions, groups)`: the naive route, from eager `output_attentions`.
- `stepwise_from_attentions_batched(attentions, groups)`: the same with membership matmuls (the benchmark's
  naive route): rows [B, S, N] @ mean_h P [B, N, N] @ word membership [B, N, W].
- `capture(model, groups, values=False)`: the fast route for a whole batch during one ordinary
  forward pass. The layer output comes from the same SDPA call as without a capture; A comes from a
  second SDPA call on the query, key and mask the attention function receives, with the word membership
  [B, N, W] as the values (`word_attention`), so that its output is sum_{j in word w} P[h, i, j] and no
  [B, H, N, N] tensor ever exists. That call is run again in backward instead of kept, so the capture
  keeps nothing of size N x W either. It also records each layer's value states, the input of the
  student router (Eq. 5).
- `word_attention(query, key, member, mask, scaling)`: that second SDPA call, for one layer.
- `enable_capture(model)`: switch a loaded model to the capturing attention ("molsaki").

The attention function is registered with `sdpa_mask`, so it receives exactly the mask plain SDPA receives
(None where `is_causal` serves: no padding and no sliding window that cuts the text). The word attention
runs in the dtype of the query: float32 on CPU, bf16 under autocast on CUDA (A within 6e-3 of float32 eager
there); A is summed over the step rows in float32.

Token groups (`steps`, `words`) are lists of token positions, one list per step / critical word,
as `spans.encode` gives them; in a padded batch they must be positions in the padded row.
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN = "molsaki"
_ACTIVE = None  # the Capture of the forward pass in progress, if any


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
    rows, member = _membership(groups, attentions[0].shape[-1], dtype, attentions[0].device)  # [B, S, N], [B, N, W]
    A = torch.stack([rows @ P.mean(1).to(dtype) @ member for P in attentions], 1)  # [B, L, S, W]
    return [A[b, :, :len(steps), :len(words)] for b, (steps, words) in enumerate(groups)]


# ---------------------------------------------------------------------------------------------
# Fast route: next to the layer's own SDPA call, a second one gives the attention on each critical word.


def _membership(groups, n, dtype, device):
    """Membership matrices of a padded batch: rows [B, S, N] (steps) and member [B, N, W] (critical words).
    Filled on the host and moved once: on a GPU, one small copy per group would cost more than the capture."""
    B = len(groups)
    rows = torch.zeros(B, max(len(s) for s, _ in groups), n, dtype=dtype)
    member = torch.zeros(B, n, max(len(w) for _, w in groups), dtype=dtype)
    for b, (steps, words) in enumerate(groups):
        for s, tokens in enumerate(steps):
            rows[b, s, tokens] = 1.0
        for w, tokens in enumerate(words):
            member[b, tokens, w] = 1.0
    return rows.to(device), member.to(device)


def word_attention(query, key, member, mask, scaling):
    """[B, H, N, W]: per head and query row, the attention on each critical word, sum_{j in word w} P[h, i, j].

    It is SDPA with the word membership [B, N, W] as the values, on the layer's query [B, H, N, D], key
    [B, H_kv, N, D] and mask (None: causal). SDPA's fused kernels want one head size for query, key and value,
    so all three are zero-padded to max(D, W rounded up to 8): zero columns change neither logits nor sums."""
    B, H, N, D = query.shape
    W = member.shape[-1]
    size = max(D, W + -W % 8)
    q, k = F.pad(query, (0, size - D)), F.pad(repeat_kv(key, H // key.shape[1]), (0, size - D))
    v = F.pad(member.to(query.dtype), (0, size - W))[:, None].expand(B, H, N, size)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scaling)[..., :W]


class _Recomputed(torch.autograd.Function):
    """`word_attention`, run again in backward instead of kept: autograd holds only its inputs (which the
    layer's own SDPA call holds anyway), never a [B, H, N, W] or [B, H, N, N] tensor."""

    @staticmethod
    def forward(ctx, query, key, member, mask, scaling):
        ctx.save_for_backward(query, key, member, mask)
        ctx.scaling = scaling
        device = query.device.type  # backward recomputes under the same autocast as forward
        ctx.autocast = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
        return word_attention(query, key, member, mask, scaling)

    @staticmethod
    def backward(ctx, grad):
        query, key, member, mask = ctx.saved_tensors
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(query.device.type, dtype=dtype, enabled=enabled):
            query, key = query.detach().requires_grad_(), key.detach().requires_grad_()
            words = word_attention(query, key, member, mask, ctx.scaling)
            dq, dk = torch.autograd.grad(words, (query, key), grad)
        return dq, dk, None, None, None


class Capture:
    """What one forward pass under `capture` records: per layer A [B, S, W] and values [B, N, d]."""

    def __init__(self, groups, values):
        self.groups, self.keep_values = groups, values
        self.sizes = [(len(steps), len(words)) for steps, words in groups]
        self.layers, self.values = {}, {}
        self.rows = None

    def record(self, module, query, key, value, mask, scaling):
        """This layer's A (pre-dropout) and value states, from what its attention function receives."""
        if self.rows is None:
            self.rows, self.member = _membership(self.groups, query.shape[2], torch.float32, query.device)
        words = _Recomputed.apply(query, key, self.member, mask, scaling)  # [B, H, N, W]
        with torch.autocast(query.device.type, enabled=False):  # the sums over steps in float32
            self.layers[module.layer_idx] = self.rows @ words.float().mean(1)  # [B, S, N] @ [B, N, W] -> [B, S, W]
        if self.keep_values:
            B, _, N, _ = value.shape
            self.values[module.layer_idx] = value.transpose(1, 2).reshape(B, N, -1)  # [B, N, H_kv * D]

    def stepwise(self):
        """Per example [L, S_b, W_b], layers in model order."""
        A = torch.stack([self.layers[i] for i in sorted(self.layers)], 1)  # [B, L, S, W]
        return [A[b, :, :S, :W] for b, (S, W) in enumerate(self.sizes)]

    def value_states(self):
        """[B, L, N, d], the router's input (Eq. 5)."""
        return torch.stack([self.values[i] for i in sorted(self.values)], 1)


def molsaki_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Plain SDPA for the layer output; when a capture is active, also this layer's A."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if _ACTIVE is not None:
        _ACTIVE.record(module, query, key, value, attention_mask, scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


AttentionInterface.register(ATTN, molsaki_attention)
AttentionMaskInterface.register(ATTN, sdpa_mask)  # the mask plain SDPA gets (None where is_causal serves)


def enable_capture(model):
    model.set_attn_implementation(ATTN)
    return model


@contextmanager
def capture(model, groups, values=False):
    """Record A (and optionally the value states) of every layer during one forward pass of `model`.

    groups: per example (steps, words), token positions in the padded batch. Usage:

        with capture(model, groups, values=True) as cap:
            out = model(input_ids, attention_mask=mask)
        A_list, V = cap.stepwise(), cap.value_states()
    """
    global _ACTIVE
    if model.config._attn_implementation != ATTN:
        raise ValueError(f"model attention is '{model.config._attn_implementation}': call enable_capture(model)")
    cap = Capture(groups, values)
    _ACTIVE = cap
    try:
        yield cap
    finally:
        _ACTIVE = None
