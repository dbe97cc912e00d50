"""Stepwise attention on critical tokens: the sums of Eq. 2 (teacher) and Eq. 3 (student).

For one layer with post-softmax attention probabilities P[h, i, j] (SPEC §4):

    A[s, w] = mean_h  sum_{i in steps[s]}  sum_{j in words[w]}  P[h, i, j]          -> [S, W]

Public functions
- `stepwise_attention(probs, steps, words)`: the definition, for one example and one layer.
- `stepwise_from_attentions(attentions, groups)`: the naive route, from eager `output_attentions`.
- `stepwise_from_attentions_batched(attentions, groups)`: the same with membership matmuls (the benchmark's
  naive route): rows [B, S, N] @ mean_h P [B, N, N] @ word membership [B, N, W].
- `capture(model, groups, values=False)`: the fast route for a whole batch during one ordinary
  forward pass. The layer output still comes from SDPA; A comes from a second SDPA call on the query
  and key the attention function receives, with the word membership [B, N, W] as the values, so that
  its output is sum_{j in word w} P[h, i, j] and no [B, H, N, N] tensor ever exists. That call is
  recomputed in backward instead of kept. It also records each layer's value states, the input of
  the student router (Eq. 5).
- `enable_capture(model)`: switch a loaded model to the capturing attention ("molsaki").

Token groups (`steps`, `words`) are lists of token positions, one list per step / critical word,
as `spans.encode` gives them; in a padded batch they must be positions in the padded row.
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

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
# Fast route: a registered attention function that computes A next to SDPA.


def _word_attention(q, k, member, mask, scaling):
    """[B, H, N, W]: per head and query row, the attention on each critical word, sum_{j in word w} P[h, i, j].

    It is SDPA with the word membership [B, N, W] as the values. SDPA's fused kernels want one head size
    for query, key and value, so all three are zero-padded to max(D, W rounded up to 8): zero columns
    change neither the logits nor the sums."""
    B, H, N, D = q.shape
    W = member.shape[-1]
    size = max(D, W + -W % 8)
    k = repeat_kv(k, H // k.shape[1])  # GQA: repeat keys
    if size > D:
        q, k = F.pad(q, (0, size - D)), F.pad(k, (0, size - D))
    v = F.pad(member, (0, size - W))[:, None].expand(B, H, N, size)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)[..., :W]


class _WordAttention(torch.autograd.Function):
    """`_word_attention`, recomputed in backward instead of kept: autograd holds its inputs (the query and
    mask are held by the layer's own SDPA anyway), never a [B, H, N, W] or [B, H, N, N] tensor."""

    @staticmethod
    def forward(ctx, q, k, member, mask, scaling):
        ctx.save_for_backward(q, k, member, mask)
        ctx.scaling = scaling
        return _word_attention(q, k, member, mask, scaling)

    @staticmethod
    def backward(ctx, grad):
        q, k, member, mask = ctx.saved_tensors
        with torch.enable_grad():
            q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
            dq, dk = torch.autograd.grad(_word_attention(q, k, member, mask, ctx.scaling), (q, k), grad)
        return dq, dk, None, None, None


def layer_stepwise(query, key, mask, scaling, rows, member):
    """A for one layer and the whole batch, from post-RoPE query [B, H, N, D] and key [B, H_kv, N, D].

    mask [B, 1, N, N] additive; rows [B, S, N] step membership; member [B, N, W] word membership.
    Returns [B, S, W].
    """
    words = _WordAttention.apply(query.float(), key.float(), member, mask.float(), scaling)  # [B, H, N, W]
    return rows @ words.mean(1)  # [B, S, N] @ [B, N, W] -> [B, S, W]


def _membership(groups, n, dtype, device):
    """Membership matrices of a padded batch: rows [B, S, N] (steps) and member [B, N, W] (critical words)."""
    B = len(groups)
    rows = torch.zeros(B, max(len(s) for s, _ in groups), n, dtype=dtype, device=device)
    member = torch.zeros(B, n, max(len(w) for _, w in groups), dtype=dtype, device=device)
    for b, (steps, words) in enumerate(groups):
        for s, tokens in enumerate(steps):
            rows[b, s, tokens] = 1.0
        for w, tokens in enumerate(words):
            member[b, tokens, w] = 1.0
    return rows, member


class Capture:
    """What one forward pass under `capture` records: per layer A [B, S, W] and values [B, N, d]."""

    def __init__(self, groups, values):
        self.groups, self.keep_values = groups, values
        self.sizes = [(len(steps), len(words)) for steps, words in groups]
        self.layers, self.values = {}, {}
        self.rows = None

    def record(self, module, query, key, value, mask, scaling):
        if mask is None or mask.dtype == torch.bool:
            raise RuntimeError(f"attention '{ATTN}' needs the additive eager mask; use enable_capture(model)")
        if self.rows is None:
            self.rows, self.member = _membership(self.groups, query.shape[2], torch.float32, query.device)
        self.layers[module.layer_idx] = layer_stepwise(query, key, mask, scaling, self.rows, self.member)
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
    """SDPA for the layer output; when a capture is active, also A of this layer (pre-dropout)."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.to(query.dtype)
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask,
                                    dropout=dropout, scaling=scaling, **kwargs)
    if _ACTIVE is not None:
        _ACTIVE.record(module, query, key, value, attention_mask, scaling)
    return out, None


AttentionInterface.register(ATTN, molsaki_attention)
AttentionMaskInterface.register(ATTN, eager_mask)  # without it the function would get no mask at all


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
