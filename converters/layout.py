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
    index: int | None = None  # the layer, for a variable stacked over layers (scan_layers)

    @property
    def shape(self) -> tuple[int, ...]:
        """The flax shape of this tensor (one layer's, for a stacked variable)."""
        shape = tuple(self.variable.get_value().shape)
        return shape if self.index is None else shape[1:]

    @property
    def logical_axes(self) -> tuple | None:
        axes = self.variable.get_metadata("out_sharding", None)
        return axes if self.index is None or axes is None else tuple(axes[1:])

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
    """Every parameter of a flaxauto model, keyed by its transformers PyTorch name.

    A variable stacked over layers (stacks.ScannedLayers) gives one slot per layer, named as
    transformers names that layer (`encoder.layer.3.attention...`)."""
    from flaxauto.stacks import ScannedLayers

    family, spec = model.family, model.head_spec
    prefix = "" if model.task == "base" else base_model_prefix(model) + "."
    modules = list(nnx.iter_modules(model))
    stacks = {path: m.num_layers for path, m in modules if isinstance(m, ScannedLayers)}
    slots: dict[str, Slot] = {}
    for path, module in modules:
        leaves = next((LAYOUTS[t] for t in type(module).__mro__ if t in LAYOUTS), {})
        for attr, variable in vars(module).items():
            if not isinstance(variable, nnx.Param):
                continue
            torch_leaf, layout = leaves.get(attr, (attr, None))
            for index, layer_path in _per_layer_paths(path, stacks):
                root, *rest = [str(p) for p in layer_path] or [""]
                local = ".".join([*rest, torch_leaf])
                if root == "backbone":
                    name = prefix + local
                    optional = rest and rest[0] in family.optional_modules
                    part = "optional" if optional else "backbone"
                else:
                    name, part = _rename(local, spec.names), "head"
                kind = _kind(attr, layout)
                slots[name] = Slot(variable, name, layout, part, kind, index)
    return slots


def _per_layer_paths(path: tuple, stacks: dict[tuple, int]):
    """(layer index, path with that index) for each layer a stacked path stands for; a path
    outside any stack stands for itself: (None, path)."""
    for stack_path, num_layers in stacks.items():
        depth = len(stack_path)
        if path[:depth] == stack_path and path[depth : depth + 1] == ("block",):
            inner = path[depth + 1 :]
            return [(i, (*stack_path, i, *inner)) for i in range(num_layers)]
    return [(None, path)]


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
    """transformers' _init_weights: kernels ~ N(0, initializer_range), norms 1, biases 0.

    The value is for the whole variable (every layer of a stacked one)."""
    shape, dtype = tuple(slot.variable.get_value().shape), slot.dtype
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
        value = slot.variable.get_value()
        value = value if slot.index is None else value[slot.index]
        yield name, slot.to_torch(np.asarray(jax.device_get(value)))
