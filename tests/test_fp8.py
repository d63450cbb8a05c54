"""Fine-grained FP8 (V3 section 3.3): E4M3 tiles and blocks, the three FP8 GEMMs of a Linear and of the routed experts
against a by-hand emulation, which modules convert_to_fp8 swaps, training in FP8, and FP8 checkpoints."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from nanoseek import CheckpointError, Transformer
from nanoseek.errors import TrainError
from nanoseek.fp8 import (E4M3, QUANTIZATION_CONFIG, FP8Linear, convert_to_fp8, dequantize_blocks, dequantize_tiles,
                          fp8_grouped_linear, fp8_linear, fp8_weight_names, quantize_blocks, quantize_tiles)
from nanoseek.model import RMSNorm
from nanoseek.model.moe import Gate

from .conftest import tiny_config


def fake_quant(x: torch.Tensor, rows: int, cols: int = 128) -> torch.Tensor:
    """The paper's recipe block by block, written out: scale = amax / 448 per rows x cols block (partial at the
    edges), round x / scale to E4M3, multiply back. Returns fp32."""
    out = torch.zeros_like(x)
    for i in range(0, x.shape[0], rows):
        for j in range(0, x.shape[1], cols):
            block = x[i:i + rows, j:j + cols]
            scale = block.abs().max() / 448
            if scale > 0:
                out[i:i + rows, j:j + cols] = (block / scale).to(E4M3).float() * scale
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("shape", [(3, 200), (5, 64), (2, 4, 300)])
def test_tiles_are_e4m3_with_one_scale_per_1x128(shape):
    x = torch.randn(shape) * torch.logspace(-3, 3, shape[-1])  # a wide range of magnitudes along K
    x[..., 0, (shape[-1] - 1) // 128 * 128:] = 0  # row 0's last tile is all zero (the whole row when K <= 128)
    q, scale = quantize_tiles(x)
    assert q.dtype == E4M3 and q.shape == x.shape and scale.shape == (*shape[:-1], math.ceil(shape[-1] / 128))
    assert torch.isfinite(scale).all() and (scale > 0).all()
    expanded = scale.repeat_interleave(128, -1)[..., :shape[-1]]
    assert torch.equal(dequantize_tiles(q, scale), q.float() * expanded)
    tiles = F.pad(q.float(), (0, -shape[-1] % 128)).unflatten(-1, (-1, 128)).abs().amax(-1)
    assert ((tiles == 448) | (tiles == 0)).all() and (tiles == 0).any()
    assert torch.equal(dequantize_tiles(q, scale).flatten(0, -2), fake_quant(x.flatten(0, -2), 1))


@pytest.mark.parametrize("shape", [(200, 300), (64, 40), (2, 130, 64)])
def test_blocks_are_e4m3_with_one_scale_per_128x128(shape):
    w = torch.randn(shape)
    w[..., 128:256, :128] = 0  # an all-zero (partial) block where there is a second block row
    q, scale = quantize_blocks(w)
    *lead, n, k = shape
    assert q.dtype == E4M3 and q.shape == w.shape and scale.shape == (*lead, math.ceil(n / 128), math.ceil(k / 128))
    assert torch.isfinite(scale).all() and (scale > 0).all()
    expanded = scale.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :n, :k]
    assert torch.equal(dequantize_blocks(q, scale), q.float() * expanded)
    blocks = F.pad(q.float(), (0, -k % 128, 0, -n % 128)).unflatten(-1, (-1, 128)).unflatten(-3, (-1, 128))
    amax = blocks.abs().amax(dim=(-3, -1))
    assert ((amax == 448) | (amax == 0)).all() and (amax == 0).any() == (n > 128)
    for we, qe, se in zip(w.view(-1, n, k), q.view(-1, n, k), scale.view(-1, *scale.shape[-2:])):
        assert torch.equal(dequantize_blocks(qe, se), fake_quant(we, 128))


def by_hand(x, w, dy):
    """One expert's Fprop, Dgrad and Wgrad on operands quantised as V3 does, K being each GEMM's contraction dim."""
    w_q = fake_quant(w, 128)  # (N, K): the same 128x128 blocks serve Fprop and Dgrad
    y = fake_quant(x, 1) @ w_q.T  # x (M, K) in 1x128 tiles along K
    dx = fake_quant(dy, 1) @ w_q  # dy (M, N) in 1x128 tiles along N
    dw = fake_quant(dy.T, 1) @ fake_quant(x.T, 1).T  # dy and x in 1x128 tiles along the M tokens
    return y, dx, dw


@pytest.mark.parametrize("gemm", ["emulated", "scaled_mm"])  # dequantised fp32 GEMMs; real E4M3 ones by K slice
@pytest.mark.parametrize("K, N", [(64, 96), (200, 130)])
def test_fp8_linear_three_gemms_match_by_hand_emulation_and_stay_near_fp32(K, N, gemm):
    x = torch.randn(3, 50, K, requires_grad=True)  # 150 tokens: two token tiles for Wgrad, the second partial
    w = (torch.randn(N, K) * 0.05).requires_grad_()
    dy = torch.randn(3, 50, N)
    y = fp8_linear(x, w, gemm)
    y.backward(dy)
    ref = by_hand(x.detach().view(-1, K), w.detach(), dy.view(-1, N))
    atol = 1e-6 if gemm == "emulated" else 1e-5  # K slices summed apart: fp32 additions in another order
    for got, want in zip((y.detach().view(-1, N), x.grad.view(-1, K), w.grad), ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=atol)
    exact = (x.detach() @ w.detach().T, dy @ w.detach(), dy.view(-1, N).T @ x.detach().view(-1, K))
    for got, want in zip((y, x.grad, w.grad), exact):
        assert 1e-4 < rel(got.detach(), want) < 5e-2  # FP8 error: present, and small


@pytest.mark.parametrize("gemm", ["emulated", "scaled_mm"])
def test_fp8_grouped_linear_tiles_tokens_per_expert(gemm):
    counts = torch.tensor([130, 0, 5])  # expert 0 spans two token tiles, expert 1 gets no tokens
    x = torch.randn(int(counts.sum()), 200, requires_grad=True)
    w = (torch.randn(3, 72, 200) * 0.05).requires_grad_()
    dy = torch.randn(len(x), 72)
    y = fp8_grouped_linear(x, w, counts, gemm)
    y.backward(dy)
    rows = counts.tolist()
    ref = [by_hand(xe, we, dye) for xe, we, dye in zip(x.detach().split(rows), w.detach(), dy.split(rows))]
    atol = 1e-6 if gemm == "emulated" else 1e-5
    torch.testing.assert_close(y.detach(), torch.cat([r[0] for r in ref]), rtol=1e-5, atol=atol)
    torch.testing.assert_close(x.grad, torch.cat([r[1] for r in ref]), rtol=1e-5, atol=atol)
    torch.testing.assert_close(w.grad, torch.stack([r[2] for r in ref]), rtol=1e-5, atol=atol)
    assert w.grad[1].abs().max() == 0


# the tiny preset: layer 0 dense, layer 1 and the MTP layer (mtp.0) MoE with one shared expert
SWIGLU = ("gate_proj", "up_proj", "down_proj")
FP8_LINEARS = ([f"{p}.self_attn.{n}" for p in ("layers.0", "layers.1", "mtp.0")
                for n in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")]
               + [f"layers.0.mlp.{n}" for n in SWIGLU]
               + [f"{p}.mlp.shared_experts.{n}" for p in ("layers.1", "mtp.0") for n in SWIGLU])


def test_convert_swaps_exactly_the_modules_v3_runs_in_fp8():
    model = Transformer(tiny_config())
    params = dict(model.named_parameters())
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        before = model(ids).logits
    assert convert_to_fp8(model) is model
    swapped = sorted(name for name, m in model.named_modules() if isinstance(m, FP8Linear))
    assert swapped == sorted(FP8_LINEARS)
    assert all(m.grouped_linear.func is fp8_grouped_linear and m.grouped_linear.keywords == {"gemm": "auto"}
               for m in (model.layers[1].mlp.experts, model.mtp[0].mlp.experts))
    # high precision: embedding, head, gate, norms, MTP's eh_proj
    assert type(model.embed_tokens) is nn.Embedding and type(model.lm_head) is nn.Linear
    assert type(model.mtp[0].eh_proj) is nn.Linear and type(model.layers[1].mlp.gate) is Gate
    assert type(model.norm) is RMSNorm and type(model.layers[0].self_attn.kv_a_layernorm) is RMSNorm
    assert {n: p for n, p in model.named_parameters()} == params  # same names, the very same tensors
    with torch.no_grad():
        after = model(ids).logits
    assert 0 < rel(after, before) < 5e-2
    convert_to_fp8(model)  # converting again changes nothing
    assert sorted(name for name, m in model.named_modules() if isinstance(m, FP8Linear)) == swapped
    convert_to_fp8(model, "scaled_mm")  # ... but the way the GEMMs run
    assert {m.gemm for m in model.modules() if isinstance(m, FP8Linear)} == {"scaled_mm"}
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, after, rtol=1e-4, atol=1e-5)  # the same E4M3 products
    with pytest.raises(TrainError, match="fp8_gemm: 'fast' is not one of auto, emulated, scaled_mm"):
        convert_to_fp8(model, "fast")


def test_plain_q_projection_converts_too():
    model = convert_to_fp8(Transformer(tiny_config(q_lora_rank=None)))
    assert isinstance(model.layers[0].self_attn.q_proj, FP8Linear)


def test_convert_needs_a_model_with_fp8_layers():
    with pytest.raises(TrainError, match="no attention or feed-forward layers"):
        convert_to_fp8(nn.Sequential(nn.Linear(4, 4)))


def test_tiny_model_trains_in_fp8():
    model = convert_to_fp8(Transformer(tiny_config()))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 256, (4, 33))
    losses = []
    for _ in range(10):
        logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights and optimiser state
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())


def hf(name: str) -> str:
    return name if name.startswith("lm_head") else "model." + name.replace("mtp.0.", "layers.2.")


def read_all(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_fp8_checkpoint_round_trip(tmp_path):
    model = Transformer(tiny_config(hidden_size=200))  # 200: partial edge blocks
    model.save_pretrained(tmp_path / "m", dtype=E4M3)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["quantization_config"] == QUANTIZATION_CONFIG
    state = read_all(tmp_path / "m")
    scales = {k.removesuffix("_scale_inv") for k in state if k.endswith("_scale_inv")}
    experts = [f"{p}.mlp.experts.{e}.{n}" for p in ("layers.1", "mtp.0") for e in range(8) for n in SWIGLU]
    assert scales == {hf(n) + ".weight" for n in FP8_LINEARS + experts}
    for name in scales:
        n, k = state[name].shape
        assert state[name].dtype == E4M3 and state[name + "_scale_inv"].dtype == torch.float32
        assert state[name + "_scale_inv"].shape == (math.ceil(n / 128), math.ceil(k / 128))
    assert all(t.dtype == torch.float32 for k, t in state.items() if k not in scales)  # embeddings, heads, gate, ...
    assert "model.layers.2.eh_proj.weight" in state and "model.layers.2.shared_head.head.weight" in state

    loaded = Transformer.from_pretrained(tmp_path / "m")
    original, quantized = model.state_dict(), fp8_weight_names(model)
    for name, t in loaded.state_dict().items():
        want = dequantize_blocks(*quantize_blocks(original[name])) if name in quantized else original[name]
        assert torch.equal(t, want), name
    fp8_bytes = sum(state[n].nbytes + state[n + "_scale_inv"].nbytes for n in scales)
    assert fp8_bytes / sum(state[n].numel() * 4 for n in scales) < 0.26

    loaded.save_pretrained(tmp_path / "plain")  # a plain save drops the quantisation again
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())


def test_fp8_checkpoint_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers' FP8 loader needs it, even to dequantise on CPU
    model = Transformer(tiny_config()).eval()  # dims <= 128: transformers infers the block from the scale grid
    model.save_pretrained(tmp_path / "m", dtype=E4M3)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    ours = Transformer.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)


def test_fp8_checkpoints_are_e4m3_only(tmp_path):
    with pytest.raises(CheckpointError, match="float8_e4m3fn"):
        Transformer(tiny_config()).save_pretrained(tmp_path / "m", dtype=torch.float8_e5m2)
