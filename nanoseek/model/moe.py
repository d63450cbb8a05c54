"""DeepSeekMoE (V3 section 2.1.2): fine-grained routed experts plus always-on shared experts.

Gate (noaux_tc, V3):  s_i = sigmoid(u^T e_i);  selection uses s_i + b_i (the auxiliary-loss-free balancing bias),
restricted to the `topk_group` groups with the largest sum of their top-2 biased scores;  the weights g_i come from
the unbiased s_i of the chosen K_r experts, normalised over them and times `routed_scaling_factor`.
V2-style gates (softmax scores, no bias, group score = max) are covered by `scoring_func` / `topk_method`.

Expert parallelism (V3 section 3.2): `Experts.shard(group)` keeps only this rank's contiguous slice of the routed
experts; tokens then travel to the rank that owns their expert and back with `all_to_all` (dispatch / combine),
while the gate, the shared experts and everything else stay replicated. A model that was never sharded runs exactly
as before.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..config import ModelConfig


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))  # e_i, one row per expert
        # b_i: moved by the balancing rule after each step, never by gradients; used for selection only.
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32)
                             if cfg.topk_method == "noaux_tc" else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D) -> weights (N, K_r), expert indices (N, K_r), scores s (N, E). Computed in fp32."""
        cfg = self.cfg
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if cfg.topk_method != "greedy" and cfg.n_group > 1:
            grouped = choice.view(-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group)
            scores_of_groups = group_score(grouped, biased=self.e_score_correction_bias is not None)
            top_groups = scores_of_groups.topk(cfg.topk_group, dim=-1).indices
            keep = torch.zeros_like(scores_of_groups, dtype=torch.bool).scatter_(1, top_groups, True)
            choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(1)
        indices = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, indices)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, indices, scores


def group_score(grouped: torch.Tensor, biased: bool) -> torch.Tensor:
    """(N, n_group, E / n_group) -> (N, n_group): V3 sums each group's top-2 biased scores; V2 takes the max."""
    return grouped.topk(2, dim=-1).values.sum(dim=-1) if biased else grouped.amax(dim=-1)


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked weights; tokens are sorted by expert and run as one grouped GEMM each."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # (E, I, D), as nn.Linear stores it
        self.up_proj = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter_dim))  # (E, D, I)
        self.grouped_linear = grouped_linear  # the grouped GEMM; precision wrappers (fp8.py) replace it
        self.n_experts = n_experts  # all routed experts, wherever they live
        self.ep_group: dist.ProcessGroup | None = None  # expert parallelism: the ranks that split the experts
        self.ep_size, self.first = 1, 0  # ... how many, and the first expert this rank holds

    def shard(self, group: dist.ProcessGroup) -> None:
        """Expert parallelism: keep this rank's slice (E / size consecutive experts) of the stacked weights."""
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        local = self.n_experts // size
        with torch.no_grad():
            for name in ("gate_proj", "up_proj", "down_proj"):
                full = getattr(self, name)
                setattr(self, name, nn.Parameter(full[rank * local:(rank + 1) * local].clone(),
                                                 requires_grad=full.requires_grad))
        self.ep_group, self.ep_size, self.first = group, size, rank * local

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D), weights/indices (N, K) -> output (N, D) and tokens per expert (E,)."""
        flat = indices.flatten()  # (N*K,)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts)
        token = order // indices.shape[1]  # which token each sorted slot belongs to
        # (N*K, D), grouped by expert. index_select, not x[token]: its backward (index_add_) sums in a fixed order,
        # while indexing's (index_put_ with accumulate) lets CPU threads add in any order, so runs would differ
        xs = x.index_select(0, token)
        ys = self.mlp(xs, counts) if self.ep_group is None else self.dispatch_combine(xs, counts)
        ys = ys * weights.flatten()[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys), counts

    def forward_fixed(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` without data-dependent shapes (the compiled decode step). Compiled on a CPU, each token's K
        chosen experts are products with their weights, summed: reductions that read the chosen weights where they
        lie (faster than sorted grouped GEMMs or running every expert, at 1 to 128 rows of `small`). Otherwise a
        fixed number N of tokens that choose fewer slots than there are experts (N K < E) gathers copies of its
        experts' weights for batched GEMMs; in a compiled graph any other number runs every expert, weighted zero
        where not chosen (one graph for every batch size), while eagerly it takes `forward`'s sorted grouped GEMMs,
        which skip the unchosen experts. Unsharded experts in the weights' own precision."""
        N, (E, I, D) = indices.shape[0], self.gate_proj.shape
        gather = statically_known_true(N * indices.shape[1] < E)  # N a number, not a compiled graph's symbol
        compiling = torch.compiler.is_compiling()
        if not gather and not compiling:
            return self(x, weights, indices)
        flat = indices.flatten()
        counts = torch.zeros(E, dtype=torch.long, device=x.device).index_add_(0, flat, torch.ones_like(flat))
        g = weights.to(x.dtype)
        if compiling and x.device.type == "cpu":
            xk = x[:, None, None, :]  # (N, 1, 1, D) against the chosen (N, K, I, D)
            h = F.silu((xk * self.gate_proj[indices]).sum(-1)) * (xk * self.up_proj[indices]).sum(-1) * g[..., None]
            return (h[:, :, None, :] * self.down_proj[indices]).sum((1, 3)), counts  # (N, K, D, I) -> (N, D)
        if gather:
            h = F.silu(torch.einsum("nd,nkid->nki", x, self.gate_proj[indices]))
            h = h * torch.einsum("nd,nkid->nki", x, self.up_proj[indices]) * g[..., None]
            return torch.einsum("nki,nkdi->nd", h, self.down_proj[indices]), counts
        chosen = torch.zeros(N, E, dtype=x.dtype, device=x.device).scatter(1, indices, g)  # (N, E): g_i, or 0
        h = F.silu(F.linear(x, self.gate_proj.view(E * I, D))) * F.linear(x, self.up_proj.view(E * I, D))
        h = h.view(N, E, I) * chosen[..., None]
        return torch.bmm(h.transpose(0, 1), self.down_proj.transpose(1, 2)).sum(0), counts  # (E, N, D) -> (N, D)

    def mlp(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows xs (M, D) sorted by (local) expert, counts (E_local,) -> each row through its expert (M, D)."""
        h = F.silu(self.grouped_linear(xs, self.gate_proj, counts)) * self.grouped_linear(xs, self.up_proj, counts)
        return self.grouped_linear(h, self.down_proj, counts)

    def dispatch_combine(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Expert parallelism. xs (M, D) sorted by global expert, so rank r's rows come r-th; counts (E,). Send each
        rank the rows of its experts, run them, send the results back: (M, D) in the order of xs."""
        size, group = self.ep_size, self.ep_group
        send = counts.view(size, -1)  # (ranks, local experts): rows this rank sends to each expert
        recv = torch.empty_like(send)  # rows each rank sends to this rank's experts
        dist.all_to_all_single(recv, send.contiguous(), group=group)
        send_rows, recv_rows = send.sum(1).tolist(), recv.sum(1).tolist()
        received = AllToAll.apply(xs, recv_rows, send_rows, group)  # grouped by source rank, then by expert
        local = torch.arange(send.shape[1], device=xs.device).repeat(size).repeat_interleave(recv.flatten())
        by_expert = local.argsort(stable=True)
        ys = self.mlp(received.index_select(0, by_expert), recv.sum(0)).index_select(0, by_expert.argsort())
        return AllToAll.apply(ys, send_rows, recv_rows, group)


class AllToAll(torch.autograd.Function):
    """`all_to_all_single` along rows, differentiable: the gradient goes back along the same routes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_rows: list[int], in_rows: list[int], group) -> torch.Tensor:
        ctx.rows, ctx.group = (out_rows, in_rows), group
        out = x.new_empty((sum(out_rows), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_rows, in_rows, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_rows, in_rows = ctx.rows
        back = grad.new_empty((sum(in_rows), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_rows, out_rows, group=ctx.group)
        return back, None, None, None


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x (M, in) sorted by group, counts (E,) rows per group, w (E, out, in) -> (M, out)."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):  # as autocast does for a matmul: bf16 operands
        x = x.to(torch.get_autocast_dtype("cuda"))
    aligned = all(n * x.element_size() % 16 == 0 for n in w.shape[1:])  # grouped_mm wants 16-byte strides
    # CUDA runs it in bf16 only, and its compile-time (fake) kernel insists on bf16 everywhere
    supported = x.dtype == torch.bfloat16 or (x.device.type == "cpu" and not torch.compiler.is_compiling())
    if hasattr(F, "grouped_mm") and aligned and supported:
        offsets = counts.cumsum(0).to(torch.int32)
        return F.grouped_mm(x, w.to(x.dtype).transpose(1, 2), offs=offsets)  # fp32 master weights in x's dtype
    return torch.cat([xe @ we.T for xe, we in zip(x.split(counts.tolist()), w)])


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None, fixed_shape: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x (B, T, D) -> (B, T, D), tokens routed to each expert (E,) (only those token_mask (B, T) marks, when
        given: padding is routed but not counted), and in training mode the sequence-wise balance statistic (a
        scalar, see `sequence_balance`), else None. fixed_shape: `Experts.forward_fixed`."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, indices, scores = self.gate(x)
        experts = self.experts.forward_fixed if fixed_shape else self.experts
        y, counts = experts(x, weights, indices)
        if token_mask is not None:
            counts = torch.bincount(indices[token_mask.flatten()].flatten(), minlength=counts.shape[0])
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        balance = sequence_balance(scores.view(*shape[:2], -1), indices.view(*shape[:2], -1)) if self.training else None
        return y.view(shape), counts, balance


def sequence_balance(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """V3 eq. 17-20 without alpha: sum_i f_i P_i per sequence, averaged over the batch. scores s (B, T, E),
    chosen experts (B, T, K_r). f_i = E / (K_r T) * #tokens choosing i; P_i = mean_t s_i / sum_j s_j.
    Perfectly balanced routing gives 1; all tokens on K_r experts gives E / K_r."""
    B, T, E = scores.shape
    K = indices.shape[-1]
    chosen = torch.zeros_like(scores).scatter_(-1, indices, 1.0).sum(dim=1)  # (B, E)
    f = chosen * E / (K * T)
    P = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # (B, E)
    return (f * P).sum(dim=-1).mean()
