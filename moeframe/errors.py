"""moeframe's user-facing error type, in a module with no heavy imports (data-preparation worker
processes import it without loading torch)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration mistake the user can fix; its message says how."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used (truncated, corrupted, or from another model config); the
    message names the file and what to do."""


class TrainingFault(RuntimeError):
    """A run stopped for a reason the user must act on (non-finite losses, a full disk, data that
    went away); the CLI prints the message as one line and exits with status 1."""
