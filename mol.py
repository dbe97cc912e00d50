"""Mixture of Layers (MoL): the layer weights of Eq. 4 (teacher) and Eq. 5 (student), and their use in Eq. 6.

    column_gradient(A [L, S, W]) -> G [L]                                                Eq. 4, mean column gradient
    teacher_layer_weights(A [L, S, W], tau1) -> p_t [L]                                  Eq. 4, a constant
    StudentRouter(dim, n_layers, tau2)(values [B, L, N, d], mask [B, N]) -> p_s [B, L]   Eq. 5, learnable
    mix_layers(A [L, S, W], p [L]) -> [S, W]                                             Eq. 6, its opening sums
    parse_layer_map(spec, n_teacher, n_student) -> (t, s)                                Table 2, SL: "T:S" or "last"
    one_hot_weights(index, n) -> [n]                                                     Table 2, SL: replaces p_t / p_s

Choices the paper leaves open:
- G = 0 for a layer when there are fewer than two critical words (W < 2) or no step (S == 0); if every
  layer has G = 0, p_t is uniform.
- The router is Eq. 5 (`StudentRouter.literal`, step by step): nn.RMSNorm on every token's value vector (eps =
  1e-6, not PyTorch's default), the sum over the real (mask = 1) tokens only, as Eq. 5 writes a sum (not a mean), W
  and b, softmax with tau2. Its forward computes the same without a normalised copy of the values (a test checks
  the two agree, values and gradients). It runs in float32 with autocast off, whatever dtype the values arrive in,
  and its parameters are meant to stay float32.
- b is one bias per student layer, b in R^L: one scalar added to every layer's logit would cancel in the softmax
  and never change p_s; per layer it is a learned prior over the layers.
- The router's `proj` (W) and `bias` start at zero, so p_s starts uniform. Eq. 5 sums (not averages) over ~100
  tokens, so with PyTorch's default init the logits differ by hundreds and p_s is one-hot from the first step, with
  gradients ~1e-10: the router could never learn. From zero, p_s moves away from uniform as training goes
  (on SmolLM2: max weight 0.03 -> 0.24 in 12 steps at lr 1e-4).
- Leading batch dimensions are accepted everywhere: A [B, L, S, W], values [B, L, N, d], mask [B, N]; unbatched
  values [L, N, d] (mask [N]) give p_s [L].
"""

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _at_least_f32(x: Tensor) -> Tensor:
    # bf16 / fp16 -> float32; float32 and float64 stay as they are
    return x.to(torch.promote_types(x.dtype, torch.float32))


def column_gradient(A: Tensor) -> Tensor:
    """Eq. 4: G[l] = mean over steps i and adjacent words (j, j+1) of |A[l, i, j+1] - A[l, i, j]|."""
    S, W = A.shape[-2:]  # A: [..., L, S, W]
    if W < 2 or S == 0:
        return A.new_zeros(A.shape[:-2])  # [..., L]
    diffs = (A[..., 1:] - A[..., :-1]).abs()  # [..., L, S, W-1]
    return diffs.mean(dim=(-2, -1))  # [..., L]


@torch.no_grad()
def teacher_layer_weights(A: Tensor, tau1: float = 0.1) -> Tensor:
    """Eq. 4: p_t = softmax(G / tau1) over the teacher's layers; a constant target (no grad)."""
    G = _at_least_f32(column_gradient(A.detach()))  # [..., L]
    return F.softmax(G / tau1, dim=-1)  # [..., L]


class StudentRouter(nn.Module):
    """Eq. 5: p_s = softmax(H W + b, tau2), H[l] = sum over the real tokens of RMSNorm(V_l), b[l] per layer.

    values [..., L, N, d] (the value vectors of every student layer, d = H_kv * D), mask [..., N] -> p_s [..., L].
    Parameters (the state-dict keys): `norm.weight` [d] (RMSNorm's gain), `proj.weight` [1, d] (W), `bias` [L] (b).
    """

    def __init__(self, dim: int, n_layers: int, tau2: float = 0.5):
        super().__init__()
        self.tau2 = tau2
        self.norm = nn.RMSNorm(dim, eps=1e-6)  # one norm over d, shared by all layers; eps 1e-6, not PyTorch's default
        self.proj = nn.Linear(dim, 1, bias=False)  # W: d -> 1
        self.bias = nn.Parameter(torch.zeros(n_layers))  # b: one per layer
        nn.init.zeros_(self.proj.weight)  # p_s starts uniform: every layer takes part (see the module docstring)

    def literal(self, values: Tensor, mask: Tensor | None = None) -> Tensor:
        """Eq. 5 as the paper writes it, term by term (the reference `forward` is checked against)."""
        self._check(values, mask)
        with torch.autocast(values.device.type, enabled=False):
            V = self.norm(_at_least_f32(values))  # [..., L, N, d]  V~_l = RMSNorm(V_l), per token
            if mask is not None:  # padding tokens leave the sum
                V = V.masked_fill(~mask.bool()[..., None, :, None], 0.0)  # [..., L, N, d]
            H = V.sum(dim=-2)  # [..., L, d]  h_l = sum_i V~_l[i, :], H = concat(h_1, ..., h_L)
            logits = self.proj(H).squeeze(-1) + self.bias  # [..., L]  H W + b
            return F.softmax(logits / self.tau2, dim=-1)  # [..., L]  softmax(., tau2)

    def forward(self, values: Tensor, mask: Tensor | None = None) -> Tensor:
        """Eq. 5 without the normalised [..., L, N, d] copy `literal` makes: RMSNorm's gain scales each coordinate
        after the division by the token's rms, so it comes out of the sum, H = gain * sum_n mask_n V_n / rms(V_n)."""
        self._check(values, mask)
        with torch.autocast(values.device.type, enabled=False):
            v = _at_least_f32(values)  # [..., L, N, d]
            rms = (torch.linalg.vector_norm(v, dim=-1).square() / v.shape[-1] + self.norm.eps).sqrt()  # [..., L, N]
            r = 1.0 / rms if mask is None else mask[..., None, :].to(v.dtype) / rms  # [..., L, N], padding: 0
            H = (r[..., None, :] @ v).squeeze(-2) * self.norm.weight  # [..., L, 1, N] @ [..., L, N, d] -> [..., L, d]
            logits = self.proj(H).squeeze(-1) + self.bias  # [..., L]
            return F.softmax(logits / self.tau2, dim=-1)  # [..., L]

    def _check(self, values, mask):
        # values: [..., L, N, d], mask: [..., N] with 1 = real token, 0 = padding
        if values.dim() < 3:
            raise ValueError(f"values must be [..., L, N, d], got shape {tuple(values.shape)}")
        if mask is not None and mask.shape != values.shape[:-3] + values.shape[-2:-1]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match values {tuple(values.shape)}")
        if values.shape[-3] != self.bias.shape[0]:
            raise ValueError(f"values have {values.shape[-3]} layers, the router {self.bias.shape[0]}")


def mix_layers(A: Tensor, p: Tensor) -> Tensor:
    """Eq. 6 (first line): sum_l p[l] A[l]. A [L, S, W], p [L] -> [S, W]; batched [B, L, ...], [B, L]."""
    if A.dim() < 3 or p.shape != A.shape[:-2]:
        raise ValueError(f"weights {tuple(p.shape)} do not match the layers of A {tuple(A.shape)}")
    dtype = torch.promote_types(A.dtype, p.dtype)
    with torch.autocast(A.device.type, enabled=False):  # the mixture stays in the dtype of its inputs
        return torch.einsum("...l,...lsw->...sw", p.to(A.device, dtype), A.to(dtype))


def parse_layer_map(spec: str, n_teacher: int, n_student: int) -> tuple[int, int]:
    """The SL ablation (Table 2): "T:S" with 1-based layers as in the paper, or "last" -> 0-based (t, s)."""
    if spec.strip() == "last":
        return n_teacher - 1, n_student - 1
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", spec)
    if m is None:
        raise ValueError(f"layer map {spec!r}: expected 'T:S' (1-based teacher:student layers) or 'last'")
    t, s = int(m.group(1)), int(m.group(2))
    if not 1 <= t <= n_teacher:
        raise ValueError(f"layer map {spec!r}: teacher layer {t} outside the valid range 1..{n_teacher}")
    if not 1 <= s <= n_student:
        raise ValueError(f"layer map {spec!r}: student layer {s} outside the valid range 1..{n_student}")
    return t - 1, s - 1


def one_hot_weights(index: int, n: int) -> Tensor:
    """The SL ablation: a one-hot weight vector [n] (float32, CPU) that replaces p_t or p_s."""
    if not 0 <= index < n:
        raise ValueError(f"layer index {index} outside the valid range 0..{n - 1}")
    w = torch.zeros(n)
    w[index] = 1.0
    return w
