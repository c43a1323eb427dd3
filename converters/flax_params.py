"""A model's parameters as a transformers 4 Flax params tree, and back.

Scripts written for transformers 4 Flax hold `model.params`: nested dicts named as the Flax
modules were (`{"bert": {"encoder": {"layer": {"0": {"attention": {"self": {"query": {"kernel":
[in, out]}}}}}}}}`). Optax masks, saved params and partition rules are built over that tree.
`flax_params(model)` gives a flaxauto model's parameters in exactly that form (names, layouts,
dtypes), and `load_flax_params(model, params)` puts such a tree into a model, with every missing,
unexpected or mis-shaped entry raised together as a CheckpointError.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from flaxauto.converters.errors import CheckpointError
from flaxauto.converters.flax_checkpoints import FlaxTreeTensors
from flaxauto.converters.layout import export_tensors, parameter_slots
from flaxauto.converters.loader import load_weights
from flaxauto.layers import Conv1D


def _flax_leaf(module, attr: str) -> str | None:
    """The transformers 4 Flax name of a module's variable, where it differs from PyTorch's."""
    if isinstance(module, nnx.Embed):
        return "embedding"
    if isinstance(module, nnx.RMSNorm):  # transformers 4's Flax RMSNorms named it "weight"
        return "weight"
    if isinstance(module, nnx.LayerNorm | nnx.GroupNorm) and attr == "scale":
        return "scale"
    if isinstance(module, nnx.Linear | Conv1D | nnx.Conv) and attr == "kernel":
        return "kernel"
    return None


def _flax_layout(leaf: str | None, tensor: np.ndarray) -> np.ndarray:
    """PyTorch layout -> transformers 4 Flax layout (the inverse of flax_checkpoints.torch_layout:
    a 2-d kernel is the transpose either way; a conv [out, in, ...] -> [..., in, out])."""
    if leaf != "kernel" or tensor.ndim < 2:
        return tensor
    if tensor.ndim == 2:
        return np.ascontiguousarray(tensor.T)
    return np.ascontiguousarray(np.transpose(tensor, (*range(2, tensor.ndim), 1, 0)))


def flax_params(model) -> dict:
    """The model's parameters as transformers 4's Flax model.params held them (numpy arrays)."""
    leaf_of = {}
    for _, module in nnx.iter_modules(model):
        for attr, variable in vars(module).items():
            if isinstance(variable, nnx.Variable):
                leaf_of[id(variable)] = _flax_leaf(module, attr)
    slots = parameter_slots(model)
    tree: dict = {}
    for name, tensor in export_tensors(model):
        if not isinstance(slots[name].variable, nnx.Param):
            continue  # statistics and buffers were not params in transformers 4
        leaf = leaf_of.get(id(slots[name].variable))
        *path, last = name.split(".")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf or last] = _flax_layout(leaf, tensor)
    return tree


def load_flax_params(model, params) -> None:
    """Set the model's parameters from a transformers 4 Flax params tree (in place). Every
    parameter must be in the tree and every tree entry must fit one."""
    source = FlaxTreeTensors(params, "params")
    info = load_weights(model, source, where="params")
    problems = [f"missing: {k}" for k in info.missing_keys]
    problems += [f"unexpected: {k}" for k in info.unexpected_keys]
    if problems:
        raise CheckpointError("params do not fit the model: " + "; ".join(problems))
