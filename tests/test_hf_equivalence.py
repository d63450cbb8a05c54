"""nanoseek and transformers' DeepseekV3ForCausalLM give the same logits for the same checkpoint, both ways."""

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.model import moe

from .conftest import tiny_config

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "base": {},  # q LoRA, YaRN, 2 groups (top-1 group), 1 shared expert, 1 dense layer, normalised top-k
    "plain_q": dict(q_lora_rank=None),
    "no_yarn": dict(rope_scaling=None),
    "one_group": dict(n_group=1, topk_group=1),
    "two_shared": dict(n_shared_experts=2),
    "all_moe": dict(first_k_dense_replace=0),
    "unnormalised": dict(norm_topk_prob=False),
}


def hf_model(cfg: ModelConfig):
    """A random transformers model of the same shape, with gate biases big enough to change expert choices."""
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**cfg.to_dict())).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # non-trivial norms, so a misplaced norm shows
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(0.0, 0.05)
    return hf


def logits_diff(hf, ours, ids) -> float:
    with torch.no_grad():
        return (hf(ids).logits - ours(ids).logits).abs().max().item()


@pytest.fixture(params=list(VARIANTS))
def pair(request, tmp_path):
    cfg = tiny_config(**VARIANTS[request.param])
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path / "hf")
    return hf, Transformer.from_pretrained(tmp_path / "hf"), tmp_path


def test_transformers_to_nanoseek(pair):
    hf, ours, _ = pair
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 48))  # past original_max_position_embeddings (32)
    assert logits_diff(hf, ours, ids) <= 1e-5


def test_nanoseek_to_transformers(tmp_path):
    for name, change in VARIANTS.items():
        ours = Transformer(tiny_config(**change)).eval()
        with torch.no_grad():
            for layer in ours.layers:
                if isinstance(layer.mlp, moe.MoE):
                    layer.mlp.gate.e_score_correction_bias.uniform_(0.0, 0.05)
        ours.save_pretrained(tmp_path / name)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        ids = torch.randint(0, ours.cfg.vocab_size, (2, 40))
        assert logits_diff(hf, ours, ids) <= 1e-5, name


# The checks above must be able to fail: each mistake below is one a re-implementation easily makes.
def _bias_leaks_into_weights(monkeypatch):
    original = moe.Gate.forward

    def forward(self, x):
        weights, indices, scores = original(self, x)
        leaked = scores.gather(1, indices) + self.e_score_correction_bias[indices]
        return leaked / leaked.sum(-1, keepdim=True) * self.cfg.routed_scaling_factor, indices, scores
    monkeypatch.setattr(moe.Gate, "forward", forward)


MISTAKES = {
    "bias_in_weights": _bias_leaks_into_weights,
    "group_score_max": lambda mp: mp.setattr(moe, "group_score", lambda grouped, biased: grouped.amax(dim=-1)),
}


@pytest.mark.parametrize("mistake", [*MISTAKES, "rope_not_interleaved"])
def test_equivalence_catches_mistakes(mistake, tmp_path, monkeypatch):
    cfg = tiny_config(first_k_dense_replace=0, n_group=4, topk_group=2)
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (4, 48))
    assert logits_diff(hf, ours, ids) <= 1e-5
    if mistake == "rope_not_interleaved":
        monkeypatch.setattr(ours.cfg, "rope_interleave", False)
    else:
        MISTAKES[mistake](monkeypatch)
    assert logits_diff(hf, ours, ids) > 1e-4
