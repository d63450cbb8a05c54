"""GGUF export: a model directory as one file that llama.cpp (and so Ollama and LM Studio) runs.

llama.cpp runs DeepSeek-V2/V3/R1 as its `deepseek2` architecture; this writes what its own converter
(convert_hf_to_gguf.py, `DeepseekV2Model`) writes for an official checkpoint, with the `gguf` package (for the demo's
model, told that its tokenizer is DeepSeek-V3's, the converter's file holds the same tensors byte for byte and the
same architecture and tokenizer keys):

* hyper-parameters under `deepseek2.*`; MLA is stored as one-KV-head attention over the latent
  (key length d_c + d_h^R, value length d_c) plus the per-head sizes (`*_length_mla`);
* W^{UK}W^{UV} (`kv_b_proj`, (H * (d_h + d_h^v), d_c)) split into `attn_k_b` (H, d_c, d_h), transposed for
  absorption, and `attn_v_b` (H, d_h^v, d_c); routed experts stacked (E, ...) as `ffn_*_exps`;
* MTP modules are left out (llama.cpp's converter drops them too);
* the tokenizer as `gpt2` (byte-level BPE) with DeepSeek-V3's pre-tokenizer, `deepseek-v3`.

Types: f32, f16 or q8_0 for the matrices; norms, 1-D tensors and the router stay f32, and a matrix whose rows do not
split into q8_0's blocks of 32 falls back to f16, as in llama.cpp.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch

from .checkpoint import load_model
from .config import ModelConfig
from .errors import NanoseekError
from .rundir import atomic_file
from .tokenizer import CHAT_TEMPLATE, Tokenizer, split_patterns

ARCH = gguf.MODEL_ARCH.DEEPSEEK2
OUTTYPES = {"f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
            "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
            "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0)}
_F32_ALWAYS = ("ffn_gate_inp",)  # the router: its top-k must not flip under rounding


class ExportError(NanoseekError):
    pass


def export_gguf(model_dir: str | Path, out: str | Path, outtype: str = "f32") -> dict:
    """Write `out` (atomically) from the model directory; returns a summary (tensors, bytes, types). The model is
    loaded whole in fp32: right for the models trained here, not for a 671B checkpoint (llama.cpp's own converter
    reads one lazily)."""
    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    model_dir, out = Path(model_dir), Path(out)
    model = load_model(model_dir)
    cfg = model.cfg
    _check_exportable(cfg, model_dir)
    ftype, qtype = OUTTYPES[outtype]

    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[ARCH])
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(model_dir.resolve().name)
        writer.add_file_type(ftype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_sampling(writer, model_dir)
        _add_hparams(writer, cfg)
        _add_tokenizer(writer, model_dir, cfg)
        types = {}
        for name, t in _gguf_tensors(model):
            data, types[name] = _quantize(name, t.numpy(), qtype)
            writer.add_tensor(name, data, raw_dtype=types[name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"tensors": len(types), "bytes": out.stat().st_size,
            "types": {q.name: sum(v == q for v in types.values()) for q in set(types.values())}}


def _add_sampling(w: gguf.GGUFWriter, model_dir: Path) -> None:
    """generation_config.json's temperature and top-p, as llama.cpp's default sampling."""
    path = model_dir / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    if isinstance(config.get("temperature"), (int, float)):
        w.add_sampling_temp(config["temperature"])
    if isinstance(config.get("top_p"), (int, float)):
        w.add_sampling_top_p(config["top_p"])


def _check_exportable(cfg: ModelConfig, model_dir: Path) -> None:
    if not cfg.rope_interleave:
        raise ExportError(f"{model_dir}/config.json: rope_interleave is false; llama.cpp's deepseek2 rotates "
                          f"interleaved pairs, as DeepSeek's weights do")
    if cfg.moe_layer_freq != 1:
        raise ExportError(f"{model_dir}/config.json: moe_layer_freq {cfg.moe_layer_freq}; llama.cpp's deepseek2 "
                          f"places an MoE in every layer after the first `first_k_dense_replace`")


def _add_hparams(w: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)  # MLA as MQA over the latent
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_q_lora_rank(cfg.q_lora_rank or 0)  # 0: a plain q projection (`attn_q`)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_group_count(cfg.n_group)
    w.add_expert_group_used_count(cfg.topk_group)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_expert_weights_norm(cfg.norm_topk_prob)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.scoring_func == "sigmoid"
                             else gguf.ExpertGatingFuncType.SOFTMAX)
    if (y := cfg.yarn) is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(y["factor"])
        w.add_rope_scaling_orig_ctx_len(y["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(y.get("beta_fast") or 32)
        w.add_rope_scaling_yarn_beta_slow(y.get("beta_slow") or 1)
        if y.get("mscale_all_dim"):
            w.add_rope_scaling_yarn_log_mul(0.1 * y["mscale_all_dim"])  # llama.cpp divides the 0.1 back out


def _add_tokenizer(w: gguf.GGUFWriter, model_dir: Path, cfg: ModelConfig) -> None:
    """Byte-level BPE: tokens in id order (padded to the model's vocab_size), their types, merges, special ids."""
    tok = Tokenizer.load(model_dir)
    spec = json.loads(tok.to_json())
    _check_pre_tokenizer(spec, model_dir)
    added = {a["content"]: a for a in spec["added_tokens"]}
    vocab = {**spec["model"]["vocab"], **{t: a["id"] for t, a in added.items()}}
    if len(vocab) > cfg.vocab_size:
        raise ExportError(f"{model_dir}: the tokenizer has {len(vocab)} tokens, more than config.json's "
                          f"vocab_size {cfg.vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(cfg.vocab_size)]
    types = [gguf.TokenType.UNUSED if i not in by_id else
             gguf.TokenType.NORMAL if t not in added else
             gguf.TokenType.CONTROL if added[t]["special"] else gguf.TokenType.USER_DEFINED  # <think> and kin
             for i, t in enumerate(tokens)]
    config_file = model_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("deepseek-v3")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(bool(config.get("add_bos_token", True)))
    w.add_add_sep_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(config.get("chat_template") or CHAT_TEMPLATE)


def _check_pre_tokenizer(spec: dict, model_dir: Path) -> None:
    """llama.cpp splits text by DeepSeek-V3's rules, numbers in runs of up to 3 digits. A tokenizer trained on runs of
    1 (`tokenizer_digits: 1`) encodes the same there, as long as none of its tokens holds two digits."""
    parts = (spec.get("pre_tokenizer") or {}).get("pretokenizers") or []
    splits = [p["pattern"].get("Regex") for p in parts if p.get("type") == "Split"]
    same = next((d for d in (3, 2, 1) if splits == split_patterns(d)), None)
    if same is None:
        raise ExportError(f"{model_dir}/tokenizer.json: the pre-tokenizer is not DeepSeek-V3's, so llama.cpp would "
                          f"split text differently; GGUF export needs a tokenizer trained by nanoseek or DeepSeek's")
    two_digits = [t for t in spec["model"]["vocab"] if same < 3 and re.search(r"[0-9]{2}", t)]
    if two_digits:
        raise ExportError(f"{model_dir}/tokenizer.json: token {two_digits[0]!r} holds two digits, which "
                          f"DeepSeek-V3's pre-tokenizer would split otherwise than this one ({same}-digit runs)")


def _gguf_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, fp32 tensor) for every weight of the main model (MTP modules left out)."""
    cfg = model.cfg
    names = gguf.get_tensor_name_map(ARCH, cfg.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name.startswith("mtp.") or (cfg.tie_word_embeddings and name == "lm_head.weight"):
            continue
        hf = name if name.startswith("lm_head.") else "model." + name
        hf = hf.replace("e_score_correction_bias", "e_score_correction.bias")
        if hf.endswith("_proj") and ".experts." in hf:  # stacked experts (E, out, in)
            hf += ".weight"
        t = t.detach().float()
        if name.endswith("kv_b_proj.weight"):  # (H * (d_h + d_h^v), d_c) -> k_b (H, d_c, d_h), v_b (H, d_h^v, d_c)
            kv_b = t.view(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
            k_b, v_b = kv_b.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)
            pairs = ((hf.replace("kv_b_proj", "k_b_proj"), k_b.transpose(1, 2)), (hf.replace("kv_b_proj", "v_b_proj"), v_b))
        else:
            pairs = ((hf, t),)
        for hf_name, tensor in pairs:
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ExportError(f"tensor {name}: no llama.cpp deepseek2 name for {hf_name}")
            yield gguf_name, tensor.contiguous()


def _quantize(name: str, data: np.ndarray, qtype: gguf.GGMLQuantizationType):
    """(data, type) as llama.cpp's converter stores it: 1-D tensors, norms and the router in f32."""
    if (data.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight")
            or name.split(".")[-2] in _F32_ALWAYS):
        qtype = gguf.GGMLQuantizationType.F32
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:  # rows that do not split into blocks of 32
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16
