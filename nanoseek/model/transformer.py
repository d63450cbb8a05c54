"""The DeepSeek-V3 decoder: pre-norm blocks of MLA + (dense MLP | DeepSeekMoE), a final norm, the head, and MTP."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ModelConfig
from .attention import MLA, LatentCache, RMSNorm, positions_of
from .moe import MLP, MoE, Experts, Gate
from .rope import RotaryEmbedding


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V): position t predicts token t+1; (M, V) with `logits_at`
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k: (B, T-k, V), position t predicts t+k+1
    router: list[torch.Tensor] = field(default_factory=list)  # per MoE layer that ran: tokens per expert (E,);
    # the main model's layers first, then the MTP layers' when MTP ran, in the order of `moe_layers(model)`
    hidden: torch.Tensor | None = None  # (B, T, D): final normed hidden state, what the head and MTP read
    balance: torch.Tensor | None = None  # training mode: sum over those layers of the sequence-wise balance statistic


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.self_attn = MLA(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_id) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, rope, cache: LatentCache | None = None, start_pos: int = 0, token_mask=None,
                cache_len: int | None = None):
        """x (B, T, D) -> (B, T, D), and for a MoE layer (tokens per expert (E,), balance statistic), else None.
        `cache_len` given: the fixed-shape path (see Transformer.forward)."""
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, start_pos, cache_len)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            h, counts, balance = self.mlp(h, token_mask, fixed_shape=cache_len is not None)
            return x + h, (counts, balance)
        return x + self.mlp(h), None


class MTPLayer(Block):
    """Multi-token prediction module k (V3 section 2.2): h'_i = M_k [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))],
    then one Transformer block; the output head (and embedding) are shared with the main model, after a norm of
    its own. Names match the official checkpoint's layer `num_hidden_layers + k - 1`."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)  # M_k
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h_prev, emb, rope, cache: LatentCache | None = None, start_pos: int = 0,
                cache_len: int | None = None):
        """h_prev, emb (B, T, D) -> normed hidden state h^k (B, T, D) ready for the shared head, and the block's
        routing statistics (as Block.forward)."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        x, routing = super().forward(x, rope, cache, start_pos, cache_len=cache_len)
        return self.shared_head.norm(x), routing


def moe_layers(model: "Transformer") -> list[MoE]:
    """The MoE modules in the order of ModelOutput.router: main layers, then MTP layers."""
    return [m for m in model.modules() if isinstance(m, MoE)]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        n = cfg.num_hidden_layers
        self.mtp = nn.ModuleList(MTPLayer(cfg, n + k) for k in range(cfg.num_nextn_predict_layers))
        self.rope = RotaryEmbedding(cfg)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for matrices and embeddings, ones for norms, zeros for gate biases."""
        std = self.cfg.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding, Gate)):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, Experts):
                for p in m.parameters():
                    nn.init.normal_(p, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            if isinstance(m, Gate) and m.e_score_correction_bias is not None:
                m.e_score_correction_bias.zero_()

    def new_cache(self, batch_size: int, max_len: int, mtp: bool = False) -> list[LatentCache]:
        """An empty latent cache for every main layer (and the MTP layers when `mtp`)."""
        w = self.embed_tokens.weight
        n = len(self.layers) + (len(self.mtp) if mtp else 0)
        return [LatentCache.empty(self.cfg, batch_size, max_len, w.dtype, w.device) for _ in range(n)]

    def forward(self, input_ids: torch.Tensor, cache: list[LatentCache] | None = None,
                start_pos: int | torch.Tensor = 0, return_mtp: bool | None = None,
                token_mask: torch.Tensor | None = None, cache_len: int | None = None,
                logits_at: torch.Tensor | None = None) -> ModelOutput:
        """input_ids (B, T). Without a cache: the whole causal sequence (training). With one: tokens at positions
        start_pos.. that attend to the cached prefix (decoding); start_pos may be a (B,) tensor, one per row.
        MTP logits by default only without a cache. token_mask (B, T): the tokens the main layers' router counts
        include (right-padding excluded); default all. cache_len (with a cache and tensor start_pos): no row
        reaches past position cache_len - 1; given, the forward has no data-dependent shapes (nothing is read
        back from a tensor and the routed experts run without sorting tokens), so it compiles to one graph.
        logits_at (B, T) bool: the head runs only at those positions, logits (M, V) in row-major order."""
        B, T = input_ids.shape
        positions = positions_of(start_pos, B, T, input_ids.device)
        if cache_len is not None:
            last = cache_len
        else:
            last = start_pos + T if isinstance(start_pos, int) else int(positions.max()) + 1
        if last > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence of {last} tokens exceeds max_position_embeddings "
                             f"({self.cfg.max_position_embeddings})")
        rope = self.rope(positions)
        x = self.embed_tokens(input_ids)
        routing = []
        for i, layer in enumerate(self.layers):
            x, r = layer(x, rope, cache[i] if cache else None, start_pos, token_mask, cache_len)
            routing.append(r)
        h = self.norm(x)
        out = ModelOutput(logits=self.lm_head(h if logits_at is None else h[logits_at]), hidden=h)
        if return_mtp if return_mtp is not None else cache is None:
            hiddens, mtp_routing = self.mtp_hidden(input_ids, h, rope)
            out.mtp_logits = [self.lm_head(hk) for hk in hiddens]
            routing += mtp_routing
        routing = [r for r in routing if r is not None]
        out.router = [counts for counts, _ in routing]
        if self.training and routing:
            out.balance = torch.stack([balance for _, balance in routing]).sum()
        return out

    def mtp_hidden(self, input_ids: torch.Tensor, h: torch.Tensor, rope) -> tuple[list[torch.Tensor], list]:
        """Chain the MTP modules over a whole sequence: depth k pairs h^{k-1}_i with Emb(t_{i+k}), i < T-k.
        Returns the hidden states h^k (B, T-k, D) and each MTP block's routing statistics."""
        hiddens, routing, T = [], [], input_ids.shape[1]
        for k, layer in enumerate(self.mtp, start=1):
            if T - k <= 0:
                break
            cos, sin = rope
            h, r = layer(h[:, :T - k], self.embed_tokens(input_ids[:, k:]), (cos[:, :T - k], sin[:, :T - k]))
            hiddens.append(h)
            routing.append(r)
        return hiddens, routing

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
