"""Mixture of Layers (MoL): the layer weights of Eq. 4 (teacher) and Eq. 5 (student).

Public functions:
    column_gradient(A [L, S, W]) -> G [L]                  Eq. 4, the mean column gradient of each layer
    teacher_layer_weights(A [L, S, W], tau1) -> p_t [L]    Eq. 4, softmax(G / tau1), a constant
    StudentRouter(dim, n_layers, tau2)(values [L, N, d], mask [N]) -> p_s [L]   Eq. 5, learnable
    mix_layers(A [L, S, W], p [L]) -> [S, W]               the weighted sums that open Eq. 6
    parse_layer_map(spec, n_teacher, n_student) -> (t, s)  the SL ablation (Table 2), "T:S" 1-based or "last"
    one_hot_weights(index, n) -> [n]                       the weight vector that replaces p_t / p_s under SL

Choices the paper leaves open (SPEC section 5):
- G = 0 for a layer when there are fewer than two critical words (W < 2) or no step (S == 0); if every
  layer has G = 0, p_t is uniform.
- The router sums the normalised value vectors over the real (mask = 1) tokens only, as Eq. 5 writes a
  sum (not a mean). It runs in float32 with autocast off, whatever dtype the values arrive in, and its
  parameters are meant to stay float32.
- b is one bias per student layer, b in R^L (SPEC §5): one scalar added to every layer's logit would cancel in
  the softmax and never change p_s; per layer it is a learned prior over the layers.
- The router's `proj` and `bias` start at zero, so p_s starts uniform. Eq. 5 sums (not averages) over ~100 tokens,
  so with PyTorch's default init the logits differ by hundreds and p_s is one-hot from the first step, with
  gradients ~1e-10: the router could never learn. From zero, p_s moves away from uniform as training goes
  (on SmolLM2: max weight 0.03 -> 0.24 in 12 steps at lr 1e-4).
- Leading batch dimensions are accepted everywhere: A [B, L, S, W], values [B, L, N, d], mask [B, N].
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
    """Eq. 5: p_s = softmax((H w + b) / tau2), H[l] = sum over tokens of RMSNorm(V_l), b[l] per layer."""

    def __init__(self, dim: int, n_layers: int, tau2: float = 0.5):
        super().__init__()
        self.tau2 = tau2
        self.norm = nn.RMSNorm(dim, eps=1e-6)  # one norm over d, shared by all layers
        self.proj = nn.Linear(dim, 1, bias=False)  # w: d -> 1
        self.bias = nn.Parameter(torch.zeros(n_layers))  # b: one per layer
        nn.init.zeros_(self.proj.weight)  # p_s starts uniform: every layer takes part (see the module docstring)

    def forward(self, values: Tensor, mask: Tensor | None = None) -> Tensor:
        # values: [..., L, N, d], mask: [..., N] with 1 = real token, 0 = padding
        if values.dim() < 3:
            raise ValueError(f"values must be [..., L, N, d], got shape {tuple(values.shape)}")
        if mask is not None and mask.shape != values.shape[:-3] + values.shape[-2:-1]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match values {tuple(values.shape)}")
        with torch.autocast(values.device.type, enabled=False):
            v = _at_least_f32(values)  # [..., L, N, d]
            # RMSNorm's weight scales each coordinate after the division by the token's rms, so it comes out of
            # the sum over tokens: H = weight * sum_n v_n / rms(v_n). No normalised [..., L, N, d] copy is made.
            rms = (torch.linalg.vector_norm(v, dim=-1).square() / v.shape[-1] + self.norm.eps).sqrt()  # [..., L, N]
            r = 1.0 / rms if mask is None else mask[..., None, :].to(v.dtype) / rms  # padding tokens: 0
            H = (r[..., None, :] @ v).squeeze(-2) * self.norm.weight  # [..., L, 1, N] @ [..., L, N, d] -> [..., L, d]
            if H.shape[-2] != self.bias.shape[0]:
                raise ValueError(f"values have {H.shape[-2]} layers, the router {self.bias.shape[0]}")
            logits = self.proj(H).squeeze(-1) + self.bias  # [..., L]
            return F.softmax(logits / self.tau2, dim=-1)  # [..., L]


def mix_layers(A: Tensor, p: Tensor) -> Tensor:
    """Eq. 6 (first line): sum_l p[l] A[l]. A [L, S, W], p [L] -> [S, W]; batched [B, L, ...], [B, L]."""
    if A.dim() < 3 or p.shape != A.shape[:-2]:
        raise ValueError(f"weights {tuple(p.shape)} do not match the layers of A {tuple(A.shape)}")
    dtype = torch.promote_types(A.dtype, p.dtype)
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
