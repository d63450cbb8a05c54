import pytest
import torch

from nanoseek import ModelConfig

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}


def tiny_config(**overrides) -> ModelConfig:
    """The tiny preset with YaRN on (context 32 -> 128) unless overridden."""
    return ModelConfig.from_preset("tiny", **{"rope_scaling": YARN, "max_position_embeddings": 128, **overrides})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
