"""Parameter names and layouts: flaxauto parameter <-> transformers PyTorch tensor.

Modules carry transformers' attribute names, so a parameter's PyTorch name is its module path
plus a leaf name and a layout that depend only on the module's type. The family adds its
base_model_prefix to backbone names and names the head's parameters; nothing else is tabulated.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxauto.layers import Conv1D

# module type -> flax leaf -> (PyTorch leaf, layout). Layout "linear" transposes [in, out] <->
# [out, in]; "conv" moves [*spatial, in, out] <-> [out, in, *spatial]; None keeps the array.
# A subclass takes its nearest listed base's entry (flaxauto.layers.RMSNorm is an nnx.RMSNorm).
LAYOUTS: dict[type, dict[str, tuple[str, str | None]]] = {
    nnx.Linear: {"kernel": ("weight", "linear"), "bias": ("bias", None)},
    Conv1D: {"kernel": ("weight", None), "bias": ("bias", None)},  # GPT-2 stores [in, out]
    nnx.Conv: {"kernel": ("weight", "conv"), "bias": ("bias", None)},
    nnx.LayerNorm: {"scale": ("weight", None), "bias": ("bias", None)},
    nnx.RMSNorm: {"scale": ("weight", None)},
    nnx.Embed: {"embedding": ("weight", None)},
}

# Names older PyTorch checkpoints used for LayerNorm parameters (transformers renames them too).
LEGACY_LEAVES = {"gamma": "weight", "beta": "bias"}


def flax_axes(layout: str | None, ndim: int) -> tuple[int, ...]:
    """Permutation p with flax_array = torch_array.transpose(p)."""
    if layout == "linear":
        return (1, 0)
    if layout == "conv":
        return (*range(2, ndim), 1, 0)
    return tuple(range(ndim))


@dataclass
class Slot:
    """One model parameter and the PyTorch tensor it corresponds to."""

    variable: nnx.Variable
    torch_name: str
    layout: str | None
    part: str  # "backbone", "optional" (a backbone module a checkpoint may lack) or "head"
    kind: str  # "kernel", "embedding", "scale" or "bias": decides the initialiser

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.variable.get_value().shape)

    @property
    def dtype(self):
        return self.variable.get_value().dtype

    @property
    def perm(self) -> tuple[int, ...]:
        return flax_axes(self.layout, len(self.shape))

    @property
    def torch_shape(self) -> tuple[int, ...]:
        shape = self.shape
        inverse = np.argsort(self.perm)
        return tuple(shape[i] for i in inverse)

    def to_flax(self, tensor: np.ndarray) -> np.ndarray:
        return np.transpose(tensor, self.perm)

    def to_torch(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.transpose(array, np.argsort(self.perm)))


def _rename(local: str, names) -> str:
    """Apply the longest matching head-name prefix."""
    for prefix in sorted(names, key=len, reverse=True):
        if local == prefix or local.startswith(prefix + "."):
            return names[prefix] + local[len(prefix) :]
    return local


def parameter_slots(model) -> dict[str, Slot]:
    """Every parameter of a flaxauto model, keyed by its transformers PyTorch name."""
    family, spec = model.family, model.head_spec
    prefix = "" if model.task == "base" else base_model_prefix(model) + "."
    slots: dict[str, Slot] = {}
    for path, module in nnx.iter_modules(model):
        leaves = next((LAYOUTS[t] for t in type(module).__mro__ if t in LAYOUTS), {})
        for attr, variable in vars(module).items():
            if not isinstance(variable, nnx.Param):
                continue
            torch_leaf, layout = leaves.get(attr, (attr, None))
            root, *rest = [str(p) for p in path] or [""]
            local = ".".join([*rest, torch_leaf])
            if root == "backbone":
                name = prefix + local
                optional = rest and rest[0] in family.optional_modules
                part = "optional" if optional else "backbone"
            else:
                name, part = _rename(local, spec.names), "head"
            slots[name] = Slot(variable, name, layout, part, _kind(attr, layout))
    return slots


def base_model_prefix(model) -> str:
    """transformers' attribute name for the backbone in this task model (a task may differ from
    its family: LlamaForQuestionAnswering keeps "transformer")."""
    return model.head_spec.base_model_prefix or model.family.base_model_prefix


def _kind(attr: str, layout: str | None) -> str:
    if layout in ("linear", "conv") or attr in ("kernel", "embedding"):
        return "kernel"
    return "scale" if attr == "scale" else "bias"


def tied_names(model) -> set[str]:
    """PyTorch names transformers ties to another parameter (and does not save)."""
    head = model.head
    if head is None:
        return set()
    return {_rename(name, model.head_spec.names) for name in head.tied_names}


def initial_value(slot: Slot, key: jax.Array, std: float) -> jax.Array:
    """transformers' _init_weights: kernels ~ N(0, initializer_range), norms 1, biases 0."""
    shape, dtype = slot.shape, slot.dtype
    if slot.variable.get_metadata("init", None) == "sinusoidal":
        from flaxauto.layers import sinusoidal_table

        return sinusoidal_table(*shape).astype(dtype)
    if slot.kind == "kernel":
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    if slot.kind == "scale":
        return jnp.ones(shape, dtype)
    return jnp.zeros(shape, dtype)


def export_tensors(model):
    """(PyTorch name, numpy array in PyTorch layout) for every saved parameter, in model order."""
    for name, slot in parameter_slots(model).items():
        array = np.asarray(jax.device_get(slot.variable.get_value()))
        yield name, slot.to_torch(array)
