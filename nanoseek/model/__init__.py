"""The DeepSeek-V3 model: rope.py (RoPE + YaRN), attention.py (MLA), moe.py (DeepSeekMoE), transformer.py (+ MTP)."""

from .attention import MLA, LatentCache, RMSNorm
from .moe import MLP, Experts, Gate, MoE
from .transformer import Block, ModelOutput, MTPLayer, Transformer

__all__ = ["MLA", "LatentCache", "RMSNorm", "MLP", "Experts", "Gate", "MoE", "Block", "ModelOutput", "MTPLayer",
           "Transformer"]
