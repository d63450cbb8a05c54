"""GGUF export: read back with the `gguf` package (every weight, its values, the hyper-parameters and the tokenizer),
and, where llama-cpp-python is installed, run by llama.cpp with the engine's greedy tokens and logits."""

import json

import gguf
import numpy as np
import pytest
import torch

from nanoseek import Transformer
from nanoseek.cli import main
from nanoseek.engine import Engine
from nanoseek.export import ExportError, export_gguf
from nanoseek.sampling import SamplingParams

from .conftest import TEXTS, memorised, tiny_config


def _model_dir(tmp_path, tok, **overrides):
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tok.vocab_size, **overrides))
    model.save_pretrained(tmp_path / "model")
    tok.save(tmp_path / "model")
    return model, tmp_path / "model"


def _read(path):
    reader = gguf.GGUFReader(path)
    fields = {name: f.contents() for name, f in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def _values(t) -> np.ndarray:
    """A tensor of the file in PyTorch's dim order, dequantized to fp32."""
    data = gguf.quants.dequantize(t.data, t.tensor_type)
    return data.reshape(tuple(reversed([int(n) for n in t.shape])))


def test_export_holds_every_weight_of_the_main_model_and_its_settings(tmp_path, tok):
    model, path = _model_dir(tmp_path, tok)
    cfg = model.cfg
    summary = export_gguf(path, tmp_path / "m.gguf")
    fields, tensors = _read(tmp_path / "m.gguf")

    assert fields["general.architecture"] == "deepseek2"
    expected = {"block_count": cfg.num_hidden_layers, "embedding_length": cfg.hidden_size,
                "attention.head_count": cfg.num_attention_heads, "attention.head_count_kv": 1,
                "attention.q_lora_rank": cfg.q_lora_rank, "attention.kv_lora_rank": cfg.kv_lora_rank,
                "attention.key_length": cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                "attention.value_length": cfg.kv_lora_rank,
                "attention.key_length_mla": cfg.qk_nope_head_dim + cfg.qk_rope_head_dim,
                "attention.value_length_mla": cfg.v_head_dim, "rope.dimension_count": cfg.qk_rope_head_dim,
                "expert_count": cfg.n_routed_experts, "expert_used_count": cfg.num_experts_per_tok,
                "expert_group_count": cfg.n_group, "expert_group_used_count": cfg.topk_group,
                "expert_shared_count": cfg.n_shared_experts, "leading_dense_block_count": cfg.first_k_dense_replace,
                "expert_feed_forward_length": cfg.moe_intermediate_size, "expert_gating_func": 2,
                "rope.scaling.type": "yarn", "rope.scaling.factor": 4.0,
                "rope.scaling.original_context_length": 32}
    for key, value in expected.items():
        assert fields[f"deepseek2.{key}"] == pytest.approx(value), key

    # every weight once, MTP left out, values exact in f32; kv_b = [k_b^T; v_b] per head
    assert summary["tensors"] == len(tensors)
    assert not any("nextn" in name or f"blk.{cfg.num_hidden_layers}." in name for name in tensors)
    n_weights = sum(t.numel() for name, t in model.state_dict().items() if not name.startswith("mtp."))
    assert sum(int(np.prod(t.shape)) for t in tensors.values()) == n_weights
    attn = model.layers[1].self_attn
    k_b, v_b = _values(tensors["blk.1.attn_k_b.weight"]), _values(tensors["blk.1.attn_v_b.weight"])
    kv_b = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(-1, cfg.kv_lora_rank)
    np.testing.assert_array_equal(kv_b, attn.kv_b_proj.weight.detach().numpy())
    experts = model.layers[1].mlp.experts
    np.testing.assert_array_equal(_values(tensors["blk.1.ffn_gate_exps.weight"]), experts.gate_proj.detach().numpy())
    np.testing.assert_array_equal(_values(tensors["blk.1.exp_probs_b.bias"]),
                                  model.layers[1].mlp.gate.e_score_correction_bias.numpy())
    np.testing.assert_array_equal(_values(tensors["output.weight"]), model.lm_head.weight.detach().numpy())

    # the tokenizer, in id order, with DeepSeek-V3's pre-tokenizer and the chat template
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "deepseek-v3"
    vocab = json.loads(tok.to_json())
    by_id = {i: t for t, i in vocab["model"]["vocab"].items()}
    assert fields["tokenizer.ggml.tokens"][:tok.vocab_size] == [by_id[i] for i in range(tok.vocab_size)]
    types = fields["tokenizer.ggml.token_type"]
    assert types[tok.bos_id] == gguf.TokenType.CONTROL and types[tok.token_id("<think>")] == gguf.TokenType.USER_DEFINED
    assert types[tok.encode("hello")[0]] == gguf.TokenType.NORMAL
    assert fields["tokenizer.ggml.bos_token_id"] == tok.bos_id and fields["tokenizer.ggml.eos_token_id"] == tok.eos_id
    assert "<｜Assistant｜>" in fields["tokenizer.chat_template"]


@pytest.mark.parametrize("outtype, qtype, tolerance", [("f16", "F16", 1e-3), ("q8_0", "Q8_0", 1e-2)])
def test_f16_and_q8_0_store_matrices_in_their_type_and_keep_norms_and_router_in_f32(tmp_path, tok, outtype, qtype,
                                                                                      tolerance):
    model, path = _model_dir(tmp_path, tok, hidden_size=128, moe_intermediate_size=64)
    summary = export_gguf(path, tmp_path / "m.gguf", outtype)
    _, tensors = _read(tmp_path / "m.gguf")
    assert summary["types"][qtype] > 0
    assert tensors["blk.1.ffn_gate_exps.weight"].tensor_type.name == qtype
    for name in ("blk.1.ffn_gate_inp.weight", "blk.1.attn_norm.weight", "blk.1.exp_probs_b.bias"):
        assert tensors[name].tensor_type.name == "F32", name
    if outtype == "q8_0":  # k_b's rows (d_h = 16) do not split into blocks of 32: f16, as llama.cpp does
        assert tensors["blk.1.attn_k_b.weight"].tensor_type.name == "F16"
    got = _values(tensors["blk.1.ffn_gate_exps.weight"])
    want = model.layers[1].mlp.experts.gate_proj.detach().numpy()
    assert np.abs(got - want).max() <= tolerance * np.abs(want).max()


def test_export_refuses_what_llama_cpp_would_run_wrongly(tmp_path, tok):
    _, path = _model_dir(tmp_path, tok, rope_interleave=False)
    with pytest.raises(ExportError, match="rope_interleave"):
        export_gguf(path, tmp_path / "m.gguf")
    _, path = _model_dir(tmp_path, tok)
    spec = json.loads((path / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{N}+"
    (path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ExportError, match="pre-tokenizer is not DeepSeek-V3's"):
        export_gguf(path, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_cli_export_prints_what_it_wrote_and_names_a_bad_type(tmp_path, tok, capsys):
    _, path = _model_dir(tmp_path, tok)
    assert main(["export", str(path), "--gguf", str(tmp_path / "m.gguf"), "--outtype", "q8_0"]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "m.gguf").stat().st_size > 0
    with pytest.raises(SystemExit) as e:
        main(["export", str(path), "--gguf", str(tmp_path / "x.gguf"), "--outtype", "q4"])
    assert e.value.code == 2 and "invalid choice: 'q4'" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nowhere"), "--gguf", str(tmp_path / "x.gguf")]) == 2
    assert "not a model directory" in capsys.readouterr().err


def _llama(path, monkeypatch, **kw):
    """llama.cpp's `Llama` on a GGUF file, its weights in plain CPU buffers (llama-server's `--no-repack`): on CPUs
    with AMX, llama.cpp 0.3.36 moves f16 / q8_0 matrices into AMX buffers, which hold no kernel for the per-head
    `attn_k_b` / `attn_v_b` products of deepseek2, and aborts the process while building its graph."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (scripts/test.sh builds it)")
    default = llama_cpp.llama_cpp.llama_model_default_params

    def plain_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    monkeypatch.setattr(llama_cpp.llama.llama_cpp, "llama_model_default_params", plain_buffers)
    return llama_cpp.Llama(model_path=str(path), n_threads=2, verbose=False, **kw)


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_llama_cpp_decodes_the_engines_greedy_tokens(tmp_path, tok, outtype, monkeypatch):
    prompts = [tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       tokenize=False) for text in ("Sort: 3, 1, 2", "What is 12+30?")]
    ids = [tok.encode(p) for p in prompts]
    model = memorised(tok, [(ids[0], "<think> 1 2 3 </think> <answer>1, 2, 3</answer>"),
                            (ids[1], "<think> 2+0=2, 1+3=4 </think> <answer>42</answer>")], hidden_size=128,
                      moe_intermediate_size=64)
    model.save_pretrained(tmp_path / "model")
    tok.save(tmp_path / "model")
    export_gguf(tmp_path / "model", tmp_path / "m.gguf", outtype)
    llm = _llama(tmp_path / "m.gguf", monkeypatch, n_ctx=256)
    engine = Engine(model, tok)
    for prompt, prompt_ids in zip(prompts, ids):
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == prompt_ids
        want = engine.generate([prompt_ids], SamplingParams(max_new_tokens=40))[0].token_ids
        llm.reset()
        got = []
        for t in llm.generate(prompt_ids, temp=0.0, top_k=1):
            got.append(t)
            if t == tok.eos_id or len(got) == len(want):
                break
        assert got == want


def test_llama_cpp_logits_equal_the_models_past_the_original_context_under_yarn(tmp_path, tok, monkeypatch):
    model, path = _model_dir(tmp_path, tok)  # YaRN 32 -> 128
    export_gguf(path, tmp_path / "m.gguf")
    llm = _llama(tmp_path / "m.gguf", monkeypatch, n_ctx=128, logits_all=True)
    ids = tok.encode(" ".join(TEXTS))[:100]
    llm.eval(ids)
    got = np.array(llm.scores[:len(ids)])
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
        plain = Transformer(model.cfg.replace(rope_scaling=None))
        plain.load_state_dict(model.state_dict())
        without_yarn = plain.eval()(torch.tensor([ids])).logits[0].numpy()
    gap = np.abs(got - want)[32:].max()
    assert gap < 5e-4 and gap < np.abs(without_yarn - want)[32:].max() / 5  # YaRN's own effect is far larger
