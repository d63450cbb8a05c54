"""Multi-head Latent Attention (DeepSeek-V2 section 2.1, V3 section 2.1.1).

Keys and values are compressed into one latent c^KV = W^DKV h (kv_lora_rank wide) plus one rope key k^R shared by
all heads (qk_rope_head_dim wide). Two ways to attend:

* naive (training): up-project c^KV to per-head keys/values with W^UK, W^UV (`kv_b_proj`) and run ordinary attention.
* absorbed (decoding): fold W^UK into the query and W^UV into the output, so attention runs directly on the cached
  latent. The cache then holds only kv_lora_rank + qk_rope_head_dim values per token per layer (576 for V3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .rope import apply_rope, softmax_scale


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


@dataclass
class LatentCache:
    """One layer's absorbed-MLA cache, preallocated to max_len tokens."""

    kv: torch.Tensor  # (B, max_len, kv_lora_rank): normalised c^KV
    pe: torch.Tensor  # (B, max_len, qk_rope_head_dim): k^R after rope

    def __getitem__(self, rows) -> "LatentCache":
        """A view of some rows (a slice)."""
        return LatentCache(self.kv[rows], self.pe[rows])

    @classmethod
    def empty(cls, cfg: ModelConfig, batch_size: int, max_len: int, dtype=None, device=None) -> "LatentCache":
        return cls(torch.zeros(batch_size, max_len, cfg.kv_lora_rank, dtype=dtype, device=device),
                   torch.zeros(batch_size, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device))


def positions_of(start_pos: int | torch.Tensor, B: int, T: int, device) -> torch.Tensor:
    """(B, T) absolute positions of T new tokens per row, starting at an int or a (B,) tensor of positions."""
    offsets = torch.arange(T, device=device)
    if isinstance(start_pos, int):
        return (start_pos + offsets).expand(B, T)
    return start_pos.to(device).view(B, 1) + offsets


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads = cfg.num_attention_heads
        d, h = cfg.hidden_size, cfg.num_attention_heads
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * cfg.qk_head_dim, bias=False)
        else:  # q = W^UQ RMSNorm(W^DQ h)
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, bias=False)
        # [c^KV ; k^R] = [W^DKV ; W^KR] h
        self.kv_a_proj_with_mqa = nn.Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        # [k^C ; v^C] per head = [W^UK ; W^UV] c^KV
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.v_head_dim, d, bias=False)
        self.scale = softmax_scale(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: LatentCache | None = None,
                start_pos: int | torch.Tensor = 0, cache_len: int | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). With a cache, x holds positions start_pos..start_pos+T-1 and attends to the
        cached prefix too (absorbed path; `cache_len`, when given, bounds the positions any row reaches, so none
        is read back from the tensor); without one, x is a whole causal sequence (naive path)."""
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.q_proj(x) if cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, cfg.qk_head_dim)
        q_nope, q_pe = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        q_pe = apply_rope(q_pe, *rope, cfg.rope_interleave)  # (B, T, H, d_h^R)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # (B, T, d_c)
        k_pe = apply_rope(k_pe.unsqueeze(2), *rope, cfg.rope_interleave)  # (B, T, 1, d_h^R)
        if cache is None:
            out = self._naive(q_nope, q_pe, c_kv, k_pe)
        else:
            out = self._absorbed(q_nope, q_pe, c_kv, k_pe.squeeze(2), cache, start_pos, cache_len)
        return self.o_proj(out.flatten(2))

    def _naive(self, q_nope, q_pe, c_kv, k_pe) -> torch.Tensor:
        cfg = self.cfg
        B, T, H, _ = q_nope.shape
        kv = self.kv_b_proj(c_kv).view(B, T, H, cfg.qk_nope_head_dim + cfg.v_head_dim)
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # (B, H, T, d_h + d_h^R)
        k = torch.cat([k_nope, k_pe.expand(B, T, H, -1)], dim=-1).transpose(1, 2)
        # Fused (flash) attention kernels want equal q/k and v head dims: zero-pad v and drop the padding after.
        pad = cfg.qk_head_dim - cfg.v_head_dim
        v = F.pad(v, (0, pad)) if pad > 0 else v
        out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True, scale=self.scale)
        return out[..., :cfg.v_head_dim].transpose(1, 2)  # (B, T, H, d_v)

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, cache: LatentCache, start_pos: int | torch.Tensor,
                  cache_len: int | None) -> torch.Tensor:
        """Row b holds positions start_pos[b]..start_pos[b]+T-1 (start_pos an int or (B,) tensor); each query sees
        the keys at positions up to its own, so rows of different lengths decode together."""
        cfg = self.cfg
        B, T, H, _ = q_nope.shape
        pos = positions_of(start_pos, B, T, q_nope.device)  # (B, T)
        if isinstance(start_pos, int):
            end = start_pos + T
            cache.kv[:B, start_pos:end] = c_kv
            cache.pe[:B, start_pos:end] = k_pe
        else:
            rows = torch.arange(B, device=pos.device)[:, None].expand(B, T)
            cache.kv[rows, pos] = c_kv
            cache.pe[rows, pos] = k_pe
            end = int(pos.max()) + 1 if cache_len is None else cache_len
        kv, pe = cache.kv[:B, :end], cache.pe[:B, :end]  # (B, S, d_c), (B, S, d_h^R)
        w_kv_b = self.kv_b_proj.weight.view(H, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
        w_uk, w_uv = w_kv_b[:, :cfg.qk_nope_head_dim], w_kv_b[:, cfg.qk_nope_head_dim:]
        q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # W^UK absorbed into q: (B, T, H, d_c)
        scores = (torch.einsum("bthc,bsc->bhts", q_latent, kv) + torch.einsum("bthr,bsr->bhts", q_pe, pe)) * self.scale
        if T > 1 or not isinstance(start_pos, int):  # query at position p sees keys 0..p
            keep = torch.arange(end, device=pos.device) <= pos[..., None]  # (B, T, S)
            scores = scores.masked_fill(~keep[:, None], float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(kv.dtype)
        out_latent = torch.einsum("bhts,bsc->bthc", probs, kv)  # (B, T, H, d_c)
        return torch.einsum("bthc,hvc->bthv", out_latent, w_uv)  # W^UV absorbed into the output: (B, T, H, d_v)
