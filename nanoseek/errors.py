"""User-facing errors: each names the file, tensor or field at fault. The CLI prints them without a traceback."""


class NanoseekError(ValueError):
    """Base class of errors caused by user input (configs, checkpoints, arguments)."""


class ConfigError(NanoseekError):
    """An invalid model configuration; the message names the field and the rule it breaks."""


class CheckpointError(NanoseekError):
    """A missing, truncated or inconsistent checkpoint; the message names the file or tensor."""
