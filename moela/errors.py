"""Errors moela raises for bad input. Each message names the file, field or tensor at fault.

They subclass ValueError so callers that only care about "bad input" can catch that.
"""


class MoelaError(ValueError):
    """Base of every bad-input error; the CLI prints its message as one line and exits 1."""


class ConfigError(MoelaError):
    """config.json is missing, unsupported, or holds an inconsistent value."""


class CheckpointError(MoelaError):
    """A checkpoint file or tensor is missing, corrupt, misshaped or unexpected."""


class TokenizerError(MoelaError):
    """tokenizer.json / tokenizer_config.json is missing or its chat template fails."""
