"""nanoseek: DeepSeek-V3/R1's recipe end to end, small enough to read."""

from .config import PRESETS, ModelConfig
from .errors import CheckpointError, ConfigError, NanoseekError
from .model import ModelOutput, Transformer

__version__ = "0.1.0"
__all__ = ["PRESETS", "ModelConfig", "Transformer", "ModelOutput", "NanoseekError", "ConfigError",
           "CheckpointError"]
