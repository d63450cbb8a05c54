"""nanoseek: DeepSeek-V3/R1's recipe end to end, small enough to read."""

from .config import PRESETS, ModelConfig
from .errors import CheckpointError, ConfigError, NanoseekError
from .model import ModelOutput, Transformer
from .checkpoint import load_model, save_model  # also gives Transformer its from_pretrained / save_pretrained

__version__ = "0.1.0"
__all__ = ["PRESETS", "ModelConfig", "Transformer", "ModelOutput", "NanoseekError", "ConfigError",
           "CheckpointError", "load_model", "save_model"]
