"""The fast capture of Eq. 2 (teacher) and Eq. 3 (student): the stepwise attention A [S, W] of every layer, for a
whole batch, during one ordinary forward pass. attention.py holds the definition; this module computes the same.

    register() -> attn_implementation name                 to load a model with (`models.load_model`); idempotent
    capture(model, groups, values=False) as cap            around one forward pass of that model
        cap.stepwise() -> per example [L, S_b, W_b]         Eq. 2 / Eq. 3, every layer
        cap.value_states() -> [B, L, N, d]                  Eq. 5's input (values=True)
    value_dim(config) -> d                                  the router's width (key-value heads x head size)

How: A needs P only on the critical tokens (the K tokens of an example's critical words), and P on a subset of the
keys is the softmax over that subset times the subset's total share `pi` (`attention.critical_probs`). The layer's
own SDPA call gives `pi`, with one more value column that is 1 on critical tokens; one matmul gives the
[B, H, N, K] logits on the critical tokens. No [B, H, N, N] tensor ever exists, and backward keeps nothing of size
N x K (`_CriticalProbs`: by blocks of query rows, its gradient by hand, checked against attention.py by a test).

Choices: importing this module registers nothing. Outside a `capture` block the registered attention is plain SDPA,
and it receives exactly the mask plain SDPA receives (None where `is_causal` serves: no padding and no sliding
window that cuts the text). The layer's SDPA call runs in the dtype of the query (bf16 under autocast on CUDA); the
logits on critical tokens, their softmax and the sums over steps and words run in float32. A is pre-dropout: under
attention dropout a second SDPA call, without dropout, gives `pi`. Under a device map each layer's A (and value
states) stays on its layer's device until `stepwise` / `value_states` gathers them on the first layer's. Token
groups (`steps`, `words`) are lists of token positions, one list per step / critical word, as `spans.encode` gives
them; in a padded batch they must be positions in the padded row.
"""

import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import attention

_NAME = "molsaki"  # the attn_implementation `register` returns
_ACTIVE = None  # the Capture of the forward pass in progress, if any
EXTRA = 8  # value columns added to the layer's call: the critical-token indicator, then zeros (head size % 8 == 0)
BLOCK = 128  # query rows per block of `_CriticalProbs`


def _index(groups, n, device):
    """Index tensors of a padded batch, filled on the host and moved once (on a GPU one small copy per group
    would cost more than the capture): rows [B, S, N] (step membership), cols [B, K] (each example's critical
    tokens, padded with 0), valid [B, K] (not padding), member [B, K, W] (the words each critical token is in),
    hit [B, 1, N, EXTRA] (1 in column 0 on critical tokens); and the row blocks of `_blocks`."""
    tokens, rows, cols, valid, member = attention._membership(groups, n)
    hit = torch.zeros(len(groups), 1, n, EXTRA)
    for b, t in enumerate(tokens):
        hit[b, 0, t, 0] = 1.0
    return [t.to(device) for t in (rows, cols, valid, member, hit)] + [_blocks(groups, tokens)]


def _blocks(groups, tokens):
    """Blocks (r0, r1, kc) of BLOCK query rows, from the first row of a step to the last one: the rows outside
    every step do not enter A. Causal attention hides the critical tokens at r1 and after from every row of the
    block, so it needs only the first kc slots of cols (sorted): kc = max over examples of those before r1."""
    step_rows = [i for steps, _ in groups for step in steps for i in step]
    if not step_rows:
        return []
    lo, hi = min(step_rows), max(step_rows) + 1
    bounds = list(range(lo, hi, BLOCK)) + [hi]
    blocks = zip(bounds[:-1], bounds[1:], strict=True)
    return [(r0, r1, max(sum(j < r1 for j in t) for t in tokens)) for r0, r1 in blocks]


def _critical_bias(mask, cols, valid, n):
    """[B, 1, N, K], added to the logits on the critical tokens: 0 where the query row sees the critical token
    under the layer's boolean mask (None: causal), the lowest float32 elsewhere (padding slots too)."""
    if mask is None:
        seen = cols[:, None, None, :] <= torch.arange(n, device=cols.device)[:, None]  # [B, 1, N, K]
    else:
        seen = mask.expand(len(cols), 1, n, n).gather(-1, cols[:, None, None, :].expand(-1, 1, n, -1))
    hidden = ~(seen & valid[:, None, None, :])
    return torch.zeros(hidden.shape, device=cols.device).masked_fill_(hidden, torch.finfo(torch.float32).min)


def _block_softmax(query, k, bias, r0, r1, kc):
    """The softmax of `attention.critical_probs` for query rows r0:r1 and the first kc critical tokens, heads grouped
    by their key-value head (one matmul per key-value head, no repeated keys): w [B, H_kv, G, n, kc] (float32), and
    the query rows q [B, H_kv, G * n, D] it used. k [B, H_kv, K, D] holds the critical keys times scaling."""
    B, Hkv, _, D = k.shape
    G, n = query.shape[1] // Hkv, r1 - r0
    q = query[:, :, r0:r1].float().reshape(B, Hkv, G * n, D)  # heads h = kv * G + g, as repeat_kv orders them
    logits = (q @ k[:, :, :kc].transpose(-1, -2)).view(B, Hkv, G, n, kc)  # [B, H_kv, G, n, kc]
    return logits.add_(bias[:, :, None, r0:r1, :kc]).softmax(-1), q


class _CriticalProbs(torch.autograd.Function):
    """`attention.critical_probs` for training, by blocks of query rows (`_blocks`): the rows outside every step
    and the critical tokens that causal attention hides are skipped. No [B, H, N, K] tensor is kept for backward
    (only the inputs: the query and key, which the layer's SDPA call holds anyway, and pi [B, H, N]); the
    softmax is run again there, and the gradient is written by hand, in place where it can be."""

    @staticmethod
    def forward(ctx, query, key, pi, cols, bias, scaling, blocks):
        ctx.save_for_backward(query, key, pi, cols, bias)
        ctx.scaling, ctx.blocks = scaling, blocks
        B, H, N, _ = query.shape
        with torch.autocast(query.device.type, enabled=False):
            k = attention._critical_keys(key, cols) * scaling  # [B, H_kv, K, D]
            out = torch.zeros(B, N, cols.shape[1], device=query.device)  # [B, N, K]
            for r0, r1, kc in blocks:
                w, _ = _block_softmax(query, k, bias, r0, r1, kc)  # [B, H_kv, G, n, kc]
                out[:, r0:r1, :kc] = w.mul_(_grouped(pi, r0, r1, k.shape[1])).mean((1, 2))
        return out

    @staticmethod
    def backward(ctx, grad):  # grad [B, N, K]
        query, key, pi, cols, bias = ctx.saved_tensors
        B, H, N, D = query.shape
        with torch.autocast(query.device.type, enabled=False):
            k = attention._critical_keys(key, cols) * ctx.scaling  # [B, H_kv, K, D]
            dq, dk = torch.zeros(B, H, N, D, device=query.device), torch.zeros_like(k)  # [B, H, N, D], [B, H_kv, K, D]
            dpi = torch.zeros(B, H, N, device=query.device)
            for r0, r1, kc in ctx.blocks:
                w, q = _block_softmax(query, k, bias, r0, r1, kc)  # [B, H_kv, G, n, kc], [B, H_kv, G * n, D]
                t = w * grad[:, None, None, r0:r1, :kc]  # [B, H_kv, G, n, kc]
                t_sum = t.sum(-1, keepdim=True)  # [B, H_kv, G, n, 1]: H times d pi
                dpi[:, :, r0:r1] = t_sum.view(B, H, r1 - r0) / H
                # softmax backward: d logits = pi / H * (t - w * sum_k t)
                t.addcmul_(w, t_sum, value=-1).mul_(_grouped(pi, r0, r1, k.shape[1]) / H)
                t = t.view(q.shape[:3] + (kc,))  # [B, H_kv, G * n, kc]
                dq[:, :, r0:r1] = (t @ k[:, :, :kc]).view(B, H, r1 - r0, D)
                dk[:, :, :kc] += t.transpose(-1, -2) @ q
            dk *= ctx.scaling
            dkey = torch.zeros(key.shape, device=key.device).scatter_add_(2, cols[:, None, :, None].expand_as(dk), dk)
        return dq.to(query.dtype), dkey.to(key.dtype), dpi.to(pi.dtype), None, None, None, None


def _grouped(pi, r0, r1, heads_kv):
    """pi [B, H, N] on rows r0:r1, as [B, H_kv, G, n, 1] float32."""
    B, H, _ = pi.shape
    return pi[:, :, r0:r1].float().view(B, heads_kv, H // heads_kv, r1 - r0, 1)


class Capture:
    """What one forward pass under `capture` records: per layer A [B, S, W] and values [B, H_kv, N, D]."""

    def __init__(self, groups, values):
        self.groups, self.keep_values = groups, values
        self.sizes = [(len(steps), len(words)) for steps, words in groups]
        self.layers, self.values = {}, {}
        self.host = None  # `_index` on the host: the index tensors, then the blocks; filled at the first layer
        self.index = {}  # device -> the index tensors there, copied at the first layer on that device
        self.biases = {}  # (id(mask), device) -> (a weak reference to the mask, its critical bias)

    def attend(self, module, query, key, value, mask, scaling, dropout, **kwargs):
        """The layer's attention output; on the side, its A (pre-dropout) and value states. Its tensors are on
        the layer's device (query.device), which under a device map differs between layers."""
        B, H, N, D = query.shape
        if self.host is None:
            self.host = _index(self.groups, N, "cpu")
        if query.device not in self.index:
            self.index[query.device] = [t.to(query.device) for t in self.host[:-1]]
        (rows, cols, valid, member, hit), blocks = self.index[query.device], self.host[-1]
        q, k = F.pad(query, (0, EXTRA)), F.pad(key, (0, EXTRA))  # zero columns: the same logits
        hit = hit.to(value.dtype).expand(B, key.shape[1], N, EXTRA)  # [B, H_kv, N, EXTRA]
        if dropout == 0.0:  # pi is one more value column of the layer's own call
            out = sdpa_attention_forward(module, q, k, torch.cat([value, hit], -1), mask, scaling=scaling,
                                         **kwargs)[0]  # [B, N, H, D + EXTRA]
            out, pi, _ = out.split([D, 1, EXTRA - 1], -1)  # [B, N, H, D], [B, N, H, 1]: one op in backward too
            pi = pi[..., 0]  # [B, N, H]
        else:  # dropout would act on pi too: a second call, without dropout, gives it
            out = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                         **kwargs)[0]  # [B, N, H, D]
            pi = sdpa_attention_forward(module, q, k, F.pad(hit, (0, D)), mask, scaling=scaling, **kwargs)[0][..., 0]
        pi = pi.transpose(1, 2).contiguous()  # [B, H, N]; a copy, so that backward does not keep all of `out`
        bias = self._bias(mask, cols, valid, N)
        # views of the padded q and k (held for the SDPA backward anyway): their first D columns
        P = _CriticalProbs.apply(q[..., :D], k[..., :D], pi, cols, bias, scaling, blocks)  # [B, N, K]
        with torch.autocast(query.device.type, enabled=False):  # the sums over steps and words in float32
            self.layers[module.layer_idx] = rows @ P @ member  # [B, S, N] @ [B, N, K] @ [B, K, W] -> [B, S, W]
        if self.keep_values:
            self.values[module.layer_idx] = value  # [B, H_kv, N, D]
        return out, None

    def _bias(self, mask, cols, valid, n):
        """The critical bias of `mask` on cols' device: one per mask the layers get (one, or one per kind: sliding,
        full) and device. Under a device map each layer may get its own copy of the mask; a weak reference tells
        a mask from a later one that Python gave the same id, without keeping the copies alive."""
        key = (id(mask), cols.device)
        ref, bias = self.biases.get(key, (None, None))
        if ref is None or ref() is not mask:
            bias = _critical_bias(mask, cols, valid, n)
            self.biases[key] = ((lambda: None) if mask is None else weakref.ref(mask)), bias
        return bias

    @staticmethod
    def _gather(per_layer):
        """The layers' tensors in model order, on the device of the first layer's."""
        first = per_layer[min(per_layer)].device
        return [per_layer[i].to(first) for i in sorted(per_layer)]

    def stepwise(self):
        """Per example [L, S_b, W_b], layers in model order, on the first layer's device."""
        A = torch.stack(self._gather(self.layers), 1)  # [B, L, S, W]
        return [A[b, :, :S, :W] for b, (S, W) in enumerate(self.sizes)]

    def value_states(self):
        """[B, L, N, d], d = H_kv * D: the router's input (Eq. 5), on the first layer's device."""
        return torch.stack([v.transpose(1, 2) for v in self._gather(self.values)], 1).flatten(-2)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Plain SDPA; when a capture is active, the same output through `Capture.attend`, which also records A."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if _ACTIVE is not None:
        return _ACTIVE.attend(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register():
    """Register the capturing attention with transformers, if not yet done; return its attn_implementation name."""
    if AttentionInterface().get(_NAME) is not _attention:
        AttentionInterface.register(_NAME, _attention)
    if AttentionMaskInterface().get(_NAME) is not sdpa_mask:
        AttentionMaskInterface.register(_NAME, sdpa_mask)  # the mask plain SDPA gets (None where is_causal serves)
    return _NAME


@contextmanager
def capture(model, groups, values=False):
    """Record A (and optionally the value states) of every layer during one forward pass of `model`, which must
    run the registered attention (loaded with attn_implementation=register()).

    groups: per example (steps, words), token positions in the padded batch. Usage:

        model, tok = models.load_model(name, attn_implementation=capture.register())
        with capture.capture(model, groups, values=True) as cap:
            out = model(input_ids, attention_mask=mask)
        A_list, V = cap.stepwise(), cap.value_states()
    """
    global _ACTIVE
    name = register()
    if model.config._attn_implementation != name:
        raise ValueError(f"model attention is '{model.config._attn_implementation}': load it with "
                         f"attn_implementation=capture.register(), or call "
                         f"model.set_attn_implementation(capture.register())")
    cap = Capture(groups, values)
    _ACTIVE = cap
    try:
        yield cap
    finally:
        _ACTIVE = None


def value_dim(config) -> int:
    """d of the value states a model's attention receives: key-value heads x head size (the router's width)."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return heads * (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
