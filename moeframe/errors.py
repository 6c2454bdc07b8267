"""moeframe's user-facing error type, in a module with no heavy imports (data-preparation worker
processes import it without loading torch)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration mistake the user can fix; its message says how.

    Instances are remembered (``ConfigError.raised``) because the CLI's argument parser turns
    exceptions raised while it validates a config into its own, much noisier, message; the CLI
    reports the remembered originals instead.
    """

    raised: list["ConfigError"] = []

    def __init__(self, message: str) -> None:
        super().__init__(message)
        ConfigError.raised.append(self)


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used (truncated, corrupted, or from another model config); the
    message names the file and what to do."""


class TrainingFault(RuntimeError):
    """A run stopped for a reason the user must act on (non-finite losses, a full disk, data that
    went away); the CLI prints the message as one line and exits with status 1."""
