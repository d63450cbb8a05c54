"""Rotary position embedding with YaRN context extension, as DeepSeek-V3 applies it to the decoupled rope dims.

YaRN (Peng et al. 2023) interpolates the low frequencies by `factor`, keeps the high ones, and ramps linearly
between the dims that turn `beta_fast` and `beta_slow` times over the original context. The attention logits are
then sharpened by mscale^2 (applied to the softmax scale, see `softmax_scale`). Frequencies and the cos/sin factor
follow transformers' `_compute_yarn_parameters` so logits match it to the last bit that fp32 allows.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(d_h + d_h^R), times mscale^2 under YaRN."""
    scale = cfg.qk_head_dim ** -0.5
    if cfg.yarn and cfg.yarn.get("mscale_all_dim"):
        m = yarn_get_mscale(cfg.yarn["factor"], cfg.yarn["mscale_all_dim"])
        scale *= m * m
    return scale


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (d_h^R / 2,) and the factor that scales cos/sin."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    y = cfg.yarn
    if y is None:
        return 1.0 / pos_freqs, 1.0
    factor, original = y["factor"], y["original_max_position_embeddings"]
    beta_fast, beta_slow = y.get("beta_fast") or 32, y.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dim index that turns `rotations` times over `original`
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    # ramp 0: extrapolate (keep the frequency), ramp 1: interpolate (divide it by `factor`)
    inv_freq = 1.0 / (factor * pos_freqs) * ramp + 1.0 / pos_freqs * (1 - ramp)

    attention_factor = y.get("attention_factor")
    if attention_factor is None:
        if y.get("mscale") and y.get("mscale_all_dim"):
            attention_factor = yarn_get_mscale(factor, y["mscale"]) / yarn_get_mscale(factor, y["mscale_all_dim"])
        else:
            attention_factor = yarn_get_mscale(factor)
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Maps positions to (cos, sin), each (B, T, d_h^R / 2); `apply_rope` rotates pairs of dims by them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.reset_parameters()

    def reset_parameters(self, device: torch.device | str | None = None) -> None:
        inv_freq, self.attention_factor = rope_frequencies(self.cfg)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, d/2)
        if freqs.is_cpu and not torch.compiler.is_compiling():
            # eager on a CPU: torch.polar takes cos and sin one element at a time; the vectorised float32 cos gives
            # one of two results per process on some CPUs with two threads, which broke run-to-run determinism
            rotation = torch.polar(torch.full_like(freqs, self.attention_factor), freqs)
            return rotation.real, rotation.imag
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """Rotate x (B, T, H, d) by cos/sin (B, T, d/2).

    interleave=True pairs dims (0,1), (2,3), ... as DeepSeek's weights expect; the result keeps that layout.
    interleave=False pairs dim i with i + d/2 (the "rotate half" layout).
    """
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
