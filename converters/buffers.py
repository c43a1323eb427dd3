"""Host buffers tensors are read into: filled straight from a file, aligned so that XLA's CPU
client adopts them without a copy. Shared by the safetensors and the pytorch_model.bin readers."""

from __future__ import annotations

import numpy as np

from flaxauto.converters.errors import CheckpointError


def read_into(file, offset: int, array: np.ndarray, path) -> None:
    """Fill `array` (C-ordered) with the file's bytes from `offset`: straight into its memory."""
    view = memoryview(array.reshape(-1).view(np.uint8))
    file.seek(offset)
    done = 0
    while done < len(view):
        got = file.readinto(view[done:])
        if not got:
            raise CheckpointError(f"{path}: ends inside a tensor; the file is truncated")
        done += got


# XLA's CPU client adopts a host buffer aligned to this many bytes instead of copying it.
ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised C-ordered array whose data starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)
