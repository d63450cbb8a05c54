"""Generation on the absorbed-MLA latent cache: one prefill forward, then one forward per new token."""

from __future__ import annotations

import torch

from .model import Transformer


@torch.inference_mode()
def greedy_generate(model: Transformer, input_ids: torch.Tensor, max_new_tokens: int,
                    eos_token_id: int | None = None) -> torch.Tensor:
    """input_ids (B, T) of equal-length prompts -> (B, T + n) with n <= max_new_tokens greedy tokens. Stops early
    once every sequence has produced `eos_token_id`; finished sequences are padded with it."""
    B, T = input_ids.shape
    cache = model.new_cache(B, T + max_new_tokens)
    logits = model(input_ids, cache=cache).logits[:, -1]  # prefill
    out, done = [], torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        token = logits.argmax(dim=-1)
        if eos_token_id is not None:
            token = token.masked_fill(done, eos_token_id)
            done |= token == eos_token_id
        out.append(token)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = model(token[:, None], cache=cache, start_pos=T + step).logits[:, -1]
    return torch.cat([input_ids, torch.stack(out, dim=1)], dim=1) if out else input_ids
