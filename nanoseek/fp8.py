"""Fine-grained FP8 (DeepSeek-V3 section 3.3): block-scaled E4M3 quantisation, FP8 GEMMs for training, and the
weights V3 ships in FP8.

All three GEMMs of a Linear take E4M3 operands, each scaled along the GEMM's contraction dimension (K):

    Fprop  y  = x W^T   x in 1x128 tiles along in_features,   W in 128x128 blocks
    Dgrad  dx = dy W    dy in 1x128 tiles along out_features, W in 128x128 blocks (the same blocks, transposed)
    Wgrad  dW = dy^T x  dy and x both in 1x128 tiles along the tokens (per expert for routed experts)

Every scale is amax / 448 of its tile or block, computed online from the current tensor; edges that are not
multiples of 128 are zero-padded, so a tile or block may be partial. Products are accumulated in fp32: where the
GEMM is emulated (CPU, and CUDA without blockwise FP8 support), each operand is quantised to E4M3, dequantised to
fp32 and multiplied in fp32, i.e. full fp32 accumulation, which the paper's promotion of partial sums to CUDA cores
every 128 elements approximates on tensor cores. On sm90 with torch's blockwise `F.scaled_mm` (cuBLAS, CUDA >=
12.9) the dense Linear's GEMMs run as real FP8 GEMMs when M, N and K are multiples of 128 (`gemm="auto"`). With
`gemm="scaled_mm"` every GEMM takes real E4M3 operands through torch's row-wise `torch._scaled_mm` (which the CPU
has), one call per 128-wide slice of K whose fp32 partial sums are added: V3's promotion every 128 elements. The
high-precision activation x is kept for Wgrad, which re-tiles it along the tokens.

`convert_to_fp8(model)` applies this from outside the model: the nn.Linear layers of MLA (q_a/q_b/q_proj,
kv_a_proj_with_mqa, kv_b_proj, o_proj) and of the SwiGLU MLPs (dense layers and shared experts) become `FP8Linear`,
and the routed experts' grouped GEMM becomes `fp8_grouped_linear`, in the main and the MTP layers. As in V3, the
embedding, the output head, the MoE gate, the norms and the attention core (SDPA, and the absorbed decoding path)
stay in high precision, and so does MTP's eh_proj, which the official checkpoint ships in BF16 while it ships the
weights above in E4M3 (`fp8_weight_names`). Parameters keep their names, shapes and dtype (the fp32 master
weights), so checkpoints and optimiser states are unaffected.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .errors import TrainError
from .model import MLA, MLP, Experts
from .model.moe import grouped_linear

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
TILE, BLOCK = (1, 128), (128, 128)  # activation tiles and weight blocks, (rows, cols)
# config.json of the official FP8 checkpoints
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": list(BLOCK)}
# how the FP8 GEMMs run: auto (blockwise cuBLAS where it exists, else emulated) | emulated | scaled_mm (row-wise
# torch._scaled_mm per 128-wide K slice)
GEMMS = ("auto", "emulated", "scaled_mm")


# ---- block quantisation --------------------------------------------------------------------------------------------
def _blocks(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """(..., R, C) -> (..., ceil(R/br), br, ceil(C/bc), bc), zero-padded at the bottom and right edges."""
    br, bc = block
    x = F.pad(x, (0, -x.shape[-1] % bc, 0, -x.shape[-2] % br))
    return x.unflatten(-1, (-1, bc)).unflatten(-3, (-1, br))


def _unblock(xb: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of `_blocks`: drop the padding."""
    R, C = shape[-2:]
    return xb.flatten(-2).flatten(-3, -2)[..., :R, :C].contiguous()


def quantize(x: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., R, C) -> E4M3 (..., R, C) and fp32 scales (..., ceil(R/br), ceil(C/bc)), x ~ q * scale per block.
    scale = amax / 448, so each block's largest |q| is 448; an all-zero block gets the smallest normal scale."""
    xb = _blocks(x.float(), block)
    amax = xb.abs().amax(dim=(-3, -1), keepdim=True)
    scale = amax.clamp(min=E4M3_MAX * torch.finfo(torch.float32).tiny) / E4M3_MAX
    q = _unblock((xb / scale).to(E4M3), x.shape)
    return q, scale.squeeze(-1).squeeze(-2)


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """E4M3 q (..., R, C) and scales (..., ceil(R/br), ceil(C/bc)) -> fp32 (..., R, C)."""
    return _unblock(_blocks(q.float(), block) * scale[..., :, None, :, None], q.shape)


def quantize_tiles(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations, one scale per 1x128 tile along the last (K) dim:
    x (..., M, K) -> E4M3 (..., M, K), scales (..., M, ceil(K/128))."""
    return quantize(x, TILE)


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return dequantize(q, scale, TILE)


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights, one scale per 128x128 block: w (..., N, K) -> E4M3 (..., N, K), (..., ceil(N/128), ceil(K/128)).
    Leading dims (stacked experts) are quantised independently."""
    return quantize(w, BLOCK)


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = BLOCK) -> torch.Tensor:
    """Inverse of `quantize_blocks`; checkpoints may declare other block sizes (`weight_block_size`)."""
    return dequantize(q, scale, block)


# ---- FP8 GEMMs -----------------------------------------------------------------------------------------------------
def _blockwise_cuda(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether torch can run this GEMM as a real blockwise-scaled FP8 GEMM: cuBLAS (CUDA >= 12.9) on sm90."""
    if not (a.is_cuda and torch.version.cuda and hasattr(F, "scaled_mm")):
        return False
    cuda = tuple(int(v) for v in torch.version.cuda.split(".")[:2])
    dims = (*a.shape, b.shape[0])  # M, K, N
    return (torch.cuda.get_device_capability(a.device) == (9, 0) and cuda >= (12, 9)
            and out_dtype in (torch.bfloat16, torch.float32) and all(d % 128 == 0 for d in dims))


def _scaled_mm_by_k(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                    b_block: tuple[int, int]) -> torch.Tensor:
    """Real FP8 GEMMs without a blockwise kernel: for each 128-wide slice of K, a's tile scales are one per row (M, 1)
    and b's block scales one per row of b (1, N), which row-wise `torch._scaled_mm` takes; its fp32 results are
    summed. a (M, K), b (N, K) E4M3 -> fp32 (M, N)."""
    (M, K), N = a.shape, b.shape[0]
    b_rows = b_scale.repeat_interleave(b_block[0], 0)[:N]  # (N, ceil(K/128)): each row's scale in each K slice
    out = torch.zeros(M, N, device=a.device)
    for j, k in enumerate(range(0, K, 128)):
        out += torch._scaled_mm(a[:, k:k + 128].contiguous(), b[:, k:k + 128].contiguous().t(),
                                scale_a=a_scale[:, j:j + 1].contiguous(), scale_b=b_rows[:, j][None].contiguous(),
                                out_dtype=torch.float32)
    return out


def _mm(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], b_block: tuple[int, int],
        out_dtype: torch.dtype, gemm: str = "auto") -> torch.Tensor:
    """a b^T with a = (E4M3 (M, K), 1x128 tile scales) and b = (E4M3 (N, K), scales per `b_block`) -> (M, N)."""
    (a, a_scale), (b, b_scale) = a, b
    if gemm == "scaled_mm":
        return _scaled_mm_by_k(a, a_scale, b, b_scale, b_block).to(out_dtype)
    if gemm == "auto" and _blockwise_cuda(a, b, out_dtype):  # checked on an H200 by benchmarks/gpu.py
        tile = F.ScalingType.BlockWise1x128
        a_scale = a_scale.t().contiguous().t()  # cuBLAS wants 1x128 scales M-major
        if b_block == TILE:
            b_scale, b_recipe = b_scale.t().contiguous().t(), tile
        else:  # 128x128 scales as (round_up(K/128, 4), N/128), K-major
            b_scale = F.pad(b_scale, (0, -b_scale.shape[1] % 4)).contiguous().t()
            b_recipe = F.ScalingType.BlockWise128x128
        return F.scaled_mm(a, b.contiguous().t(), a_scale, tile, b_scale, b_recipe, output_dtype=out_dtype)
    return (dequantize_tiles(a, a_scale) @ dequantize(b, b_scale, b_block).T).to(out_dtype)


def _block_gemm(a, b, counts: torch.Tensor | None, out_dtype: torch.dtype, gemm: str) -> torch.Tensor:
    """a b^T for b = (E4M3, scales) in 128x128 blocks, (N, K) or per expert (E, N, K) with `counts` rows of a each."""
    if counts is None:
        return _mm(a, b, BLOCK, out_dtype, gemm)
    if gemm == "scaled_mm":
        rows = counts.tolist()
        return torch.cat([_mm(a_e, b_e, BLOCK, out_dtype, gemm)
                          for a_e, b_e in zip(zip(*(t.split(rows) for t in a)), zip(*b))])
    with torch.autocast(a[0].device.type, enabled=False):  # the emulation multiplies in fp32, autocast or not
        return grouped_linear(dequantize_tiles(*a), dequantize_blocks(*b), counts).to(out_dtype)


class _FP8Linear(torch.autograd.Function):
    """y = x W^T with E4M3 operands in all three GEMMs. W (N, K); or stacked experts (E, N, K) with x's rows
    sorted by expert, `counts` (E,) rows each."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor | None, gemm: str) -> torch.Tensor:
        w = quantize_blocks(weight)  # (E?, N, K), (E?, ceil(N/128), ceil(K/128))
        ctx.save_for_backward(x, *w, counts)
        ctx.weight_dtype, ctx.gemm = weight.dtype, gemm
        return _block_gemm(quantize_tiles(x), w, counts, x.dtype, gemm)  # Fprop: (M, N)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w_fp8, w_scale, counts = ctx.saved_tensors  # x (M, K), dy (M, N)
        dx = dw = None
        if ctx.needs_input_grad[0]:  # Dgrad dx = dy W: K is N, so dy in tiles along N and W^T's blocks
            dx = _block_gemm(quantize_tiles(dy), (w_fp8.mT, w_scale.mT), counts, x.dtype, ctx.gemm)
        if ctx.needs_input_grad[1]:  # Wgrad dW = dy^T x: K is the tokens, tiled per expert
            rows = [len(x)] if counts is None else counts.tolist()
            dw = torch.stack([_mm(quantize_tiles(dy_e.T), quantize_tiles(x_e.T), TILE, ctx.weight_dtype, ctx.gemm)
                              for dy_e, x_e in zip(dy.split(rows), x.split(rows))]).view(w_fp8.shape)
        return dx, dw, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, gemm: str = "auto") -> torch.Tensor:
    """F.linear(x, weight) in FP8: x (..., K), weight (N, K) -> (..., N)."""
    return _FP8Linear.apply(x.reshape(-1, x.shape[-1]), weight, None, gemm).view(*x.shape[:-1], weight.shape[0])


def fp8_grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, gemm: str = "auto") -> torch.Tensor:
    """`moe.grouped_linear` in FP8: rows of x (M, in) sorted by expert, counts (E,), w (E, out, in) -> (M, out).
    Per-expert 128x128 weight blocks, Wgrad token tiles restart at each expert; Fprop and Dgrad are emulated
    (dequantised operands through `grouped_linear`) unless `gemm="scaled_mm"`."""
    return _FP8Linear.apply(x, w, counts, gemm)


class FP8Linear(nn.Linear):
    """nn.Linear whose GEMMs run in FP8; same parameters, so the state dict is unchanged."""
    gemm = "auto"  # see GEMMS

    @classmethod
    def from_linear(cls, linear: nn.Linear, gemm: str = "auto") -> "FP8Linear":
        with torch.device("meta"):
            fp8 = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        fp8.weight, fp8.bias, fp8.gemm = linear.weight, linear.bias, gemm
        return fp8.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.gemm)
        return y if self.bias is None else y + self.bias


# ---- which modules ------------------------------------------------------------------------------------------------
def fp8_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules V3 runs in FP8, by name: every nn.Linear of MLA and of the SwiGLU MLPs (dense layers, shared
    experts), and the routed Experts; in the main layers and the MTP layers alike."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, Experts):
            found[name] = module
        elif isinstance(module, (MLA, MLP)):
            found.update({f"{name}.{child_name}": child for child_name, child in module.named_children()
                          if isinstance(child, nn.Linear)})
    return found


def fp8_weight_names(model: nn.Module) -> set[str]:
    """State-dict names of the weights those modules multiply by: what an FP8 checkpoint stores in E4M3."""
    names = set()
    for name, module in fp8_modules(model).items():
        names |= {f"{name}.weight"} if isinstance(module, nn.Linear) else {n for n, _ in module.named_parameters(name)}
    return names


def convert_to_fp8(model: nn.Module, gemm: str = "auto") -> nn.Module:
    """Run the GEMMs of `fp8_modules(model)` in FP8 (the way `gemm` says, see GEMMS), in place; returns the model."""
    if gemm not in GEMMS:
        raise TrainError(f"fp8_gemm: {gemm!r} is not one of {', '.join(GEMMS)}")
    modules = fp8_modules(model)
    if not modules:
        raise TrainError(f"fp8: {type(model).__name__} has no attention or feed-forward layers to run in FP8")
    for name, module in modules.items():
        if isinstance(module, Experts):
            module.grouped_linear = functools.partial(fp8_grouped_linear, gemm=gemm)
        elif isinstance(module, FP8Linear):
            module.gemm = gemm
        else:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, FP8Linear.from_linear(module, gemm))
    return model
