"""Auxiliary-loss-free load balancing (V3 section 2.1.2) and the MaxVio measure of imbalance.

After every optimiser step each MoE layer's bias b_i moves by -gamma if expert i got more than the mean load over
the step's whole batch, by +gamma if it got less. The bias only steers selection (see Gate), so balancing never
fights the language-modelling gradient.
"""

from __future__ import annotations

import torch

from ..model.transformer import moe_layers


@torch.no_grad()
def update_bias(model: torch.nn.Module, loads: list[torch.Tensor], gamma: float) -> None:
    """loads: tokens per expert (E,) for each MoE layer in `moe_layers` order, summed over the step (layers that did
    not run, e.g. MTP with MTP off, may be missing at the end; a dense model has none)."""
    if not loads or gamma == 0:
        return
    for moe, load in zip(moe_layers(model), loads):
        bias = moe.gate.e_score_correction_bias
        if bias is None:
            continue
        load = load.to(bias.device, torch.float32)
        bias += gamma * torch.sign(load.mean() - load)


def max_violation(load: torch.Tensor) -> float:
    """MaxVio = (max_i load_i - mean load) / mean load; 0 is perfect balance."""
    load = load.float()
    mean = load.mean()
    return float((load.max() - mean) / mean) if mean > 0 else 0.0
