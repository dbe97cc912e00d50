"""Stepwise attention on critical tokens: the sums of Eq. 2 (teacher) and Eq. 3 (student).

For one layer with post-softmax attention probabilities P[h, i, j] (SPEC §4):

    A[s, w] = mean_h  sum_{i in steps[s]}  sum_{j in words[w]}  P[h, i, j]          -> [S, W]

Public functions
- `stepwise_attention(probs, steps, words)`: the definition, for one example and one layer.
- `stepwise_from_attentions(attentions, groups)`: the naive route, from eager `output_attentions`.
- `capture(model, groups, values=False)`: the fast route for a whole batch during one ordinary
  forward pass. The layer output still comes from SDPA; A is computed from the query and key the
  attention function receives, touching only the critical columns plus one row-wise log-sum-exp
  that is never materialised as [B, H, N, N]. It also records each layer's value states, the
  input of the student router (Eq. 5).
- `enable_capture(model)`: switch a loaded model to the capturing attention ("molsaki").

Token groups (`steps`, `words`) are lists of token positions, one list per step / critical word,
as `spans.encode` gives them; in a padded batch they must be positions in the padded row.
"""

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

ATTN = "molsaki"
_ACTIVE = None  # the Capture of the forward pass in progress, if any
_CHUNK = 1 << 22  # elements of the [B, H, rows, N] logits block held at once by the log-sum-exp


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


# ---------------------------------------------------------------------------------------------
# Fast route: a registered attention function that computes A next to SDPA.


class _LogSumExp(torch.autograd.Function):
    """Row-wise log-sum-exp of the masked attention logits, [B, H, N], computed and differentiated
    in blocks of rows, so that only a [B, H, rows, N] block of logits exists at any time."""

    @staticmethod
    def forward(ctx, q, k, mask, scaling):
        lse = torch.cat([torch.logsumexp(_logits(q, k, mask, scaling, r), -1) for r in _row_blocks(q)], -1)
        ctx.save_for_backward(q, k, mask, lse)
        ctx.scaling = scaling
        return lse  # [B, H, N]

    @staticmethod
    def backward(ctx, grad):
        q, k, mask, lse = ctx.saved_tensors
        dq, dk = torch.zeros_like(q), torch.zeros_like(k)
        for r in _row_blocks(q):
            p = torch.exp(_logits(q, k, mask, ctx.scaling, r) - lse[:, :, r, None])  # [B, H, R, N]
            g = p * grad[:, :, r, None]
            dq[:, :, r] = g @ k * ctx.scaling
            dk += g.transpose(-1, -2) @ q[:, :, r] * ctx.scaling
        return dq, dk, None, None


def _row_blocks(q):
    B, H, N, _ = q.shape
    rows = max(1, _CHUNK // (B * H * N))
    return [slice(i, min(i + rows, N)) for i in range(0, N, rows)]


def _logits(q, k, mask, scaling, r):
    return q[:, :, r] @ k.transpose(-1, -2) * scaling + mask[:, :, r]  # [B, H, R, N]


def layer_stepwise(query, key, mask, scaling, rows, cols, colw):
    """A for one layer and the whole batch, from post-RoPE query [B, H, N, D] and key [B, H_kv, N, D].

    mask [B, 1, N, N] additive; rows [B, S, N] step membership; cols [B, C] critical token positions;
    colw [B, C, W] word membership of those columns. Returns [B, S, W].
    """
    q, k = query.float(), repeat_kv(key, query.shape[1] // key.shape[1]).float()  # GQA: repeat keys
    mask = mask.float()
    B, H, N, D = q.shape
    C = cols.shape[1]
    lse = _LogSumExp.apply(q, k, mask, scaling)  # [B, H, N]
    kc = k.gather(2, cols[:, None, :, None].expand(B, H, C, D))  # [B, H, C, D]
    mc = mask.gather(3, cols[:, None, None, :].expand(B, 1, N, C))  # [B, 1, N, C]
    probs = torch.exp(q @ kc.transpose(-1, -2) * scaling + mc - lse[..., None])  # [B, H, N, C] = P[..., cols]
    return rows @ probs.mean(1) @ colw  # [B, S, N] @ [B, N, C] @ [B, C, W] -> [B, S, W]


class Capture:
    """What one forward pass under `capture` records: per layer A [B, S, W] and values [B, N, d]."""

    def __init__(self, groups, values):
        self.groups, self.keep_values = groups, values
        self.sizes = [(len(steps), len(words)) for steps, words in groups]
        self.layers, self.values = {}, {}
        self.rows = None

    def _index(self, n, device):
        """Membership tensors of the batch: rows [B, S, N], cols [B, C], colw [B, C, W]."""
        B, S, W = len(self.groups), max(s for s, _ in self.sizes), max(w for _, w in self.sizes)
        C = max(1, max(sum(len(t) for t in words) for _, words in self.groups))
        self.rows = torch.zeros(B, S, n, device=device)
        self.cols = torch.zeros(B, C, dtype=torch.long, device=device)
        self.colw = torch.zeros(B, C, W, device=device)
        for b, (steps, words) in enumerate(self.groups):
            for s, tokens in enumerate(steps):
                self.rows[b, s, tokens] = 1.0
            c = 0
            for w, tokens in enumerate(words):
                self.cols[b, c:c + len(tokens)] = torch.tensor(tokens, device=device)
                self.colw[b, c:c + len(tokens), w] = 1.0
                c += len(tokens)

    def record(self, module, query, key, value, mask, scaling):
        if mask is None or mask.dtype == torch.bool:
            raise RuntimeError(f"attention '{ATTN}' needs the additive eager mask; use enable_capture(model)")
        if self.rows is None:
            self._index(query.shape[2], query.device)
        self.layers[module.layer_idx] = layer_stepwise(query, key, mask, scaling, self.rows, self.cols, self.colw)
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
