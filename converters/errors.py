"""Errors raised while reading or writing checkpoints.

Every problem with a checkpoint surfaces as a `CheckpointError` (a ValueError), so callers such as
the CLI can catch one type and print one clear line.
"""


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, corrupt or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint asked for something other than plain tensors; nothing was executed."""
