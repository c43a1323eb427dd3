"""Checkpoint IO without torch (installed as `flaxauto.converters`): resolving, streaming
safetensors and pickle-free .bin reading, name and layout tables, saving."""

from flaxauto.converters.errors import CheckpointError, UnsafeCheckpointError

__all__ = ["CheckpointError", "UnsafeCheckpointError"]
