"""Training. One file per stage, each read top to bottom as its algorithm: lm.py (pretraining and SFT: V3's
objective on packed token shards; context extension is the same objective at a longer length, with YaRN), grpo.py (GRPO / Dr. GRPO / DAPO), distill.py (rejection sampling, then SFT of a
student). They share the Trainer (trainer.py: AdamW, schedule, accumulation, checkpoints and exact resume, metrics,
the bias update of balance.py), their settings (recipe.py) and, for GRPO, the policies (policy.py, hf_policy.py)."""

from . import distill, grpo, lm
from .recipe import TrainConfig

STAGE_RUNNERS = {"pretrain": lm.run, "extend": lm.run, "sft": lm.run, "grpo": grpo.run, "distill": distill.run}


def run(cfg: TrainConfig) -> dict:
    """Run the training stage `cfg.stage` names; returns its summary (steps, seconds, model, final loss, ...)."""
    return STAGE_RUNNERS[cfg.stage](cfg)
