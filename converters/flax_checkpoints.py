"""transformers 4 Flax checkpoints, read without torch: `flax_model.msgpack` (one file, or shards
`flax_model-0000i-of-0000n.msgpack` with `flax_model.msgpack.index.json`) and `model.safetensors`
whose metadata says `format: flax`.

Their tensors carry Flax names and layouts (`.../query/kernel` [in, out], `.../LayerNorm/scale`,
`.../word_embeddings/embedding`), the mirror image of the rule transformers 4 used to convert
PyTorch weights to Flax. The readers here undo it, so the rest of the loader sees PyTorch names
and layouts, as from any other checkpoint: `kernel` -> `weight` transposed (a Dense [in, out] ->
Linear [out, in]; GPT-2's Conv1D kernel [out, in] -> Conv1D weight [in, out]; a conv kernel
[..., in, out] -> [out, in, ...]), `scale` -> `weight`, `embedding` -> `weight`; other names
unchanged. Msgpack is decoded by flax.serialization (data only: arrays, numbers, dicts), whole
file by file, so a load holds one msgpack file's tensors at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flaxauto.converters.errors import CheckpointError

FLAX_WEIGHTS = "flax_model.msgpack"
FLAX_INDEX = "flax_model.msgpack.index.json"

_RENAMED = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def torch_name(flax_path: tuple[str, ...]) -> str:
    """("bert", "encoder", "layer", "0", "attention", "self", "query", "kernel") ->
    "bert.encoder.layer.0.attention.self.query.weight"."""
    *module, leaf = flax_path
    return ".".join([*module, _RENAMED.get(leaf, leaf)])


def torch_layout(flax_path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    """A Flax tensor in PyTorch's layout (a view where it can be)."""
    if flax_path[-1] != "kernel" or array.ndim < 2:
        return array
    if array.ndim == 2:
        return array.T
    # conv [..spatial, in, out] -> [out, in, ..spatial]
    return np.transpose(array, (array.ndim - 1, array.ndim - 2, *range(array.ndim - 2)))


def index_key_name(key: str) -> str:
    """A key of flax_model.msgpack.index.json ("bert/pooler/dense/kernel") as a PyTorch name."""
    return torch_name(tuple(key.split("/")))


def _flatten(tree, prefix=()) -> dict[tuple[str, ...], object]:
    if isinstance(tree, dict):
        flat = {}
        for key, value in tree.items():
            flat.update(_flatten(value, (*prefix, str(key))))
        return flat
    return {prefix: tree}


class FlaxTreeTensors:
    """A transformers 4 Flax params tree (nested dicts of arrays) as a tensor source with
    PyTorch names and layouts (what the loader reads)."""

    def __init__(self, tree, where: str):
        if isinstance(tree, dict) and set(tree) == {"params"}:  # saved with its collection
            tree = tree["params"]
        if not isinstance(tree, dict):
            raise CheckpointError(f"{where}: a Flax checkpoint holds a dict of tensors")
        self._tensors = {}
        for flax_path, value in _flatten(tree).items():
            if not hasattr(value, "shape") or not flax_path:
                shown = "/".join(flax_path)
                raise CheckpointError(f"{where}: {shown!r} is {type(value).__name__}, not a tensor")
            name = torch_name(flax_path)
            if name in self._tensors:
                raise CheckpointError(f"{where}: two tensors map to {name!r}")
            self._tensors[name] = torch_layout(flax_path, np.asarray(value))

    def keys(self) -> list[str]:
        return list(self._tensors)

    def keys_by_file(self) -> list[list[str]]:
        return [self.keys()]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._tensors[key].shape

    def dtype(self, key: str) -> np.dtype:
        return self._tensors[key].dtype

    def read(self, key: str) -> np.ndarray:
        return self._tensors[key]

    def read_slice(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        return self._tensors[key][index]

    def close(self) -> None:
        self._tensors = {}


class FlaxMsgpackFile(FlaxTreeTensors):
    """One flax_model.msgpack file (or shard), decoded whole, offering PyTorch names."""

    def __init__(self, path: Path):
        from flax import serialization

        self.path = path
        try:
            tree = serialization.msgpack_restore(path.read_bytes())
        except Exception as error:  # msgpack raises many types on damaged input
            raise CheckpointError(f"{path}: unreadable or corrupt Flax msgpack ({error})") from None
        super().__init__(tree, str(path))


class FlaxSafetensorsFile:
    """A model.safetensors written by transformers 4 Flax (`format: flax`): keys are Flax paths
    joined by dots; tensors are read in Flax layout and handed out in PyTorch's."""

    def __init__(self, reader):
        self._reader, self.path = reader, reader.path
        self._flax_key = {}
        for key in reader.keys():
            name = torch_name(tuple(key.split(".")))
            if name in self._flax_key:
                raise CheckpointError(f"{self.path}: two tensors map to {name!r}")
            self._flax_key[name] = key

    def keys(self) -> list[str]:
        return list(self._flax_key)

    def _path(self, key: str) -> tuple[str, ...]:
        return tuple(self._flax_key[key].split("."))

    def shape(self, key: str) -> tuple[int, ...]:
        shape = self._reader.shape(self._flax_key[key])
        return torch_layout(self._path(key), np.broadcast_to(np.empty((), np.bool_), shape)).shape

    def dtype(self, key: str) -> np.dtype:
        return self._reader.dtype(self._flax_key[key])

    def read(self, key: str) -> np.ndarray:
        return torch_layout(self._path(key), self._reader.read(self._flax_key[key]))

    def read_slice(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        return np.ascontiguousarray(self.read(key)[index])

    def close(self) -> None:
        self._reader.close()
