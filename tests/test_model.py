import ctypes
import os
import subprocess
import sys

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.engine import greedy_generate
from nanoseek.model.moe import Experts, Gate, grouped_linear, sequence_balance
from nanoseek.model.transformer import moe_layers

from .conftest import tiny_config


@pytest.mark.parametrize("overrides", [{}, dict(q_lora_rank=None, rope_scaling=None), dict(n_group=1, topk_group=1)])
def test_absorbed_decoding_matches_naive_path(overrides):
    model = Transformer(tiny_config(**overrides)).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (3, 40))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(3, 40)
        prefix = model(ids[:, :20], cache=cache).logits  # chunked prefill attends within the chunk
        steps = [model(ids[:, t:t + 1], cache=cache, start_pos=t).logits for t in range(20, 40)]
    assert torch.allclose(prefix, full[:, :20], atol=1e-5)
    assert torch.allclose(torch.cat(steps, dim=1), full[:, 20:], atol=1e-5)


def test_cache_holds_only_latent_and_rope_key():
    cfg = ModelConfig.from_preset("tiny")
    cache = Transformer(cfg).new_cache(2, 16)
    assert len(cache) == cfg.num_hidden_layers
    assert cache[0].kv.shape == (2, 16, cfg.kv_lora_rank) and cache[0].pe.shape == (2, 16, cfg.qk_rope_head_dim)


def test_greedy_generate_equals_argmax_of_full_forward():
    model = Transformer(tiny_config()).eval()
    prompt = torch.randint(0, model.cfg.vocab_size, (2, 6))
    out = greedy_generate(model, prompt, max_new_tokens=10)
    with torch.no_grad():
        assert torch.equal(model(out).logits[:, 5:-1].argmax(-1), out[:, 6:])


def test_outputs_and_mtp_shapes():
    cfg = tiny_config(num_nextn_predict_layers=2)
    out = Transformer(cfg)(torch.randint(0, cfg.vocab_size, (2, 12)))
    assert out.logits.shape == (2, 12, cfg.vocab_size)
    assert [m.shape for m in out.mtp_logits] == [(2, 11, cfg.vocab_size), (2, 10, cfg.vocab_size)]
    assert len(out.router) == cfg.n_moe_layers + 2 == len(moe_layers(Transformer(cfg)))  # main, then MTP layers
    tokens = [2 * 12] * cfg.n_moe_layers + [2 * 11, 2 * 10]
    assert [c.sum().item() for c in out.router] == [n * cfg.num_experts_per_tok for n in tokens]
    assert out.balance is not None and out.balance.requires_grad


def test_router_counts_leave_out_masked_padding():
    cfg = tiny_config()
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    real = torch.arange(10)[None, :] < torch.tensor([[10], [6]])  # the second row is padded after 6 tokens
    with torch.no_grad():
        masked = model(ids, return_mtp=False, token_mask=real)
        unmasked = model(ids, return_mtp=False)
        alone = model(ids[1:, :6], return_mtp=False)
    assert torch.equal(masked.logits, unmasked.logits)  # only the statistics change
    first = model(ids[:1], return_mtp=False)
    for m, a, f in zip(masked.router, alone.router, first.router):
        assert torch.equal(m, a + f) and m.sum() == 16 * cfg.num_experts_per_tok


def test_sequence_balance_statistic():
    """V3's sum_i f_i P_i: 1 for uniform scores and uniform choices, E / K_r when every token picks the same K_r
    experts and puts all its score on them."""
    E, K, T = 8, 2, 16
    uniform = torch.full((1, T, E), 0.5)
    round_robin = torch.arange(T * K).view(1, T, K) % E
    assert torch.isclose(sequence_balance(uniform, round_robin), torch.tensor(1.0))
    collapsed = torch.zeros(1, T, E)
    collapsed[..., :K] = 1.0
    assert torch.isclose(sequence_balance(collapsed, torch.arange(K).expand(1, T, K)), torch.tensor(E / K))


def test_mtp_depth1_reads_next_token_embedding():
    """MTP position i must see t_{i+1} (and nothing later): changing the last token changes only the last row."""
    model = Transformer(tiny_config()).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (1, 10))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % model.cfg.vocab_size
    with torch.no_grad():
        a, b = model(ids).mtp_logits[0], model(changed).mtp_logits[0]
    assert torch.allclose(a[:, :-1], b[:, :-1], atol=1e-6) and not torch.allclose(a[:, -1], b[:, -1])


def test_backward_reaches_every_trainable_parameter():
    model = Transformer(tiny_config(first_k_dense_replace=0))
    out = model(torch.randint(0, model.cfg.vocab_size, (4, 32)))
    (out.logits.logsumexp(-1).mean() + out.mtp_logits[0].logsumexp(-1).mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert not any(b.requires_grad for b in model.buffers())


GRADIENT_HASH = """
import hashlib, torch
from nanoseek import ModelConfig, Transformer
torch.set_num_threads(2)
torch.manual_seed(0)
model = Transformer(ModelConfig.from_preset("small", vocab_size=512))
model(torch.randint(0, 512, (8, 128))).logits.square().mean().backward()
print(hashlib.sha256(b"".join(p.grad.numpy().tobytes() for p in model.parameters() if p.grad is not None)).hexdigest())
"""


def _fixed_addresses() -> None:
    """Run the child without address-space randomisation (as `setarch -R`): where a buffer lands decides which
    kernel variant some CPU matmuls take, so about one process in ten computes other last bits without it."""
    ctypes.CDLL(None, use_errno=True).personality(0x0040000)  # ADDR_NO_RANDOMIZE


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fixing the address layout needs Linux")
def test_two_threads_give_the_same_gradients_in_every_run():
    """Each run is a fresh process with two threads; the MoE's token gather must have a backward that sums in a
    fixed order (plain indexing's lets two threads add into one row in either order, so every run differed)."""
    runs = [subprocess.run([sys.executable, "-c", GRADIENT_HASH], capture_output=True, text=True, check=True,
                           env={**os.environ, "OMP_NUM_THREADS": "2"}, preexec_fn=_fixed_addresses).stdout
            for _ in range(3)]
    assert len(set(runs)) == 1 and len(runs[0].strip()) == 64


def test_gate_selects_with_bias_but_weighs_without_it():
    cfg = ModelConfig.from_preset("tiny", n_group=1, topk_group=1, num_experts_per_tok=2)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[:, 0] = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0])
        gate.e_score_correction_bias.copy_(torch.tensor([0, 0, 0, 0, 0, 0, 0, 10.0]))
    x = torch.zeros(1, cfg.hidden_size)
    x[0, 0] = 1.0
    weights, idx, scores = gate(x)
    assert sorted(idx[0].tolist()) == [0, 7]  # the bias pulls expert 7 in
    expected = scores[0, [0, 7]] / scores[0, [0, 7]].sum() * cfg.routed_scaling_factor
    assert torch.allclose(weights[0].sort().values, expected.sort().values)


def test_gate_keeps_to_the_best_groups():
    cfg = ModelConfig.from_preset("tiny", n_group=4, topk_group=2, num_experts_per_tok=2)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.normal_()
    weights, idx, scores = gate(torch.randn(256, cfg.hidden_size))
    group_of = idx // 2
    top2_sums = scores.view(-1, 4, 2).sum(-1)  # 2 experts per group: the top-2 sum is the group's sum
    best_groups = top2_sums.topk(2, dim=-1).indices
    assert all(set(g.tolist()) <= set(b.tolist()) for g, b in zip(group_of, best_groups))
    assert torch.allclose(weights.sum(-1), torch.full((256,), cfg.routed_scaling_factor))


@pytest.mark.parametrize("tokens", [1, 30])  # fixed shape: 1 token gathers its experts, 30 sort them (eagerly)
@pytest.mark.parametrize("fixed_shape", [False, True, "compiled"])  # compiled on the CPU: reductions, any number
def test_grouped_experts_equal_a_per_expert_loop(tokens, fixed_shape):
    experts = Experts(4, 16, 8)
    for p in experts.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(tokens, 16)
    weights, indices = torch.rand(tokens, 2), torch.stack([torch.randperm(4)[:2] for _ in range(tokens)])
    run = {False: experts, True: experts.forward_fixed,
           "compiled": torch.compile(experts.forward_fixed, fullgraph=True, dynamic=True)}[fixed_shape]
    with torch.no_grad():
        y, counts = run(x, weights, indices)
    ref = torch.zeros_like(x)
    for t in range(tokens):
        for w, e in zip(weights[t], indices[t]):
            h = torch.nn.functional.silu(experts.gate_proj[e] @ x[t]) * (experts.up_proj[e] @ x[t])
            ref[t] += w * (experts.down_proj[e] @ h)
    assert torch.allclose(y, ref, atol=1e-4) and counts.tolist() == torch.bincount(indices.flatten(), minlength=4).tolist()


def test_fixed_shape_decoding_matches_the_full_forward():
    """Rows at different positions, positions given as a tensor and the cache length as an int (the compiled path)."""
    model = Transformer(tiny_config()).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (3, 24))
    start = torch.tensor([10, 16, 20])
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(3, 24)
        model(ids, cache=cache)
        steps = [model(ids[torch.arange(3), start + t, None], cache=cache, start_pos=start + t,
                       cache_len=int(start.max()) + t + 1).logits[:, 0] for t in range(4)]
    assert torch.allclose(torch.stack(steps, 1), full[torch.arange(3)[:, None], start[:, None] + torch.arange(4)],
                          atol=1e-5)


@pytest.mark.parametrize("dim", [3, 8])  # 3: unaligned, the per-expert fallback; 8: one grouped GEMM
def test_grouped_linear_handles_empty_groups(dim):
    x, w = torch.randn(5, dim), torch.randn(3, 4, dim)
    counts = torch.tensor([2, 0, 3])
    expected = torch.cat([x[:2] @ w[0].T, x[2:] @ w[2].T])
    assert torch.allclose(grouped_linear(x, w, counts), expected, atol=1e-6)


def test_too_long_input_is_refused():
    model = Transformer(ModelConfig.from_preset("tiny", max_position_embeddings=16))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 17, dtype=torch.long))
