"""Tensor names and layouts: flaxauto variable <-> transformers PyTorch tensor.

Modules carry transformers' attribute names, so a tensor's PyTorch name is its module path plus a
leaf name and a layout that depend only on the module's type. Every persistent variable is a
tensor: nnx.Param, nnx.BatchStat (BatchNorm's running statistics) and layers.Buffer (BART's
final_logits_bias); RNG state is not. The family adds its base_model_prefix to backbone names,
names the head's parameters and declares the tables its backbone shares (ties); nothing else is
tabulated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxauto.layers import BatchNorm, Buffer, Conv1D, WeightNormConv

#: variable types saved in and loaded from checkpoints (transformers' state_dict)
PERSISTENT = (nnx.Param, nnx.BatchStat, Buffer)


@dataclass(frozen=True)
class Leaf:
    """How one flax variable of a module type is spelled in PyTorch.

    torch: the PyTorch leaf name (may be dotted: weight norm's `parametrizations.weight.original0`).
    layout: "linear" transposes [in, out] <-> [out, in]; "conv" moves [*spatial, in, out] <->
        [out, in, *spatial]; None keeps the array.
    init: transformers' _init_weights value when a checkpoint lacks it: "normal" (N(0, std)),
        "zeros" or "ones"; None infers it from the flax name (kernel/embedding normal, scale ones,
        else zeros).
    legacy: older PyTorch leaf names that load into it (never written).
    """

    torch: str
    layout: str | None = None
    init: str | None = None
    legacy: tuple[str, ...] = ()


_NORM = {  # LayerNorm, RMSNorm, GroupNorm, BatchNorm: older checkpoints say gamma/beta
    "scale": Leaf("weight", legacy=("gamma",)),
    "bias": Leaf("bias", legacy=("beta",)),
}

# module type -> flax leaf -> Leaf. A subclass takes its nearest listed base's entry
# (flaxauto.layers.RMSNorm is an nnx.RMSNorm); a leaf not listed keeps its name and layout.
LAYOUTS: dict[type, dict[str, Leaf]] = {
    nnx.Linear: {"kernel": Leaf("weight", "linear"), "bias": Leaf("bias")},
    Conv1D: {"kernel": Leaf("weight"), "bias": Leaf("bias")},  # GPT-2 stores [in, out]
    nnx.Conv: {"kernel": Leaf("weight", "conv"), "bias": Leaf("bias")},
    WeightNormConv: {  # torch's parametrizations.weight_norm; weight_g/weight_v before it
        "weight_g": Leaf("parametrizations.weight.original0", "conv", "ones", ("weight_g",)),
        "weight_v": Leaf("parametrizations.weight.original1", "conv", "normal", ("weight_v",)),
        "bias": Leaf("bias"),
    },
    nnx.LayerNorm: _NORM,
    nnx.RMSNorm: {"scale": _NORM["scale"]},
    nnx.GroupNorm: _NORM,
    BatchNorm: {
        **_NORM,
        "mean": Leaf("running_mean", init="zeros"),
        "var": Leaf("running_var", init="ones"),
        "num_batches_tracked": Leaf("num_batches_tracked", init="zeros"),
    },
    nnx.Embed: {"embedding": Leaf("weight")},
}


def flax_axes(layout: str | None, ndim: int) -> tuple[int, ...]:
    """Permutation p with flax_array = torch_array.transpose(p)."""
    if layout == "linear":
        return (1, 0)
    if layout == "conv":
        return (*range(2, ndim), 1, 0)
    return tuple(range(ndim))


@dataclass
class Slot:
    """One persistent model variable and the PyTorch tensor it corresponds to."""

    variable: nnx.Variable
    torch_name: str
    layout: str | None
    # "backbone" (required), "optional" (a backbone module a checkpoint may lack: initialised and
    # reported), "counter" (a statistic such as num_batches_tracked: zero when absent, silently),
    # "computed" (a table transformers computes at init and neither requires nor always saves,
    # Marian's sinusoids: loaded when present, filled by its init when absent, silently) or "head"
    part: str
    # "normal", "zeros", "ones", "sinusoidal(-halves, -timescales)", "kaiming_fan_out" or a float:
    # transformers' _init_weights
    init: str | float
    index: int | None = None  # the layer, for a variable stacked over layers (scan_layers)
    #: other checkpoint names that load into it: legacy spellings and the family's tied names
    aliases: tuple[str, ...] = ()
    #: the subset of aliases that are tied names (several of them may be in one checkpoint)
    tied: tuple[str, ...] = field(default=())

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
    def torch_dtype(self):
        """The dtype transformers stores (int64 counters that jax, without x64, holds as int32)."""
        return np.dtype(self.variable.get_metadata("torch_dtype", None) or self.dtype)

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
        array = np.transpose(array, np.argsort(self.perm))
        if not array.flags.c_contiguous:  # (np.ascontiguousarray would make a scalar [1])
            array = np.ascontiguousarray(array)
        return array.astype(self.torch_dtype, copy=False)


def _rename(local: str, names) -> str:
    """Apply the longest matching head-name prefix."""
    for prefix in sorted(names, key=len, reverse=True):
        if local == prefix or local.startswith(prefix + "."):
            return names[prefix] + local[len(prefix) :]
    return local


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def parameter_slots(model) -> dict[str, Slot]:
    """Every persistent variable of a flaxauto model, keyed by its transformers PyTorch name.

    A variable stacked over layers (stacks.ScannedLayers) gives one slot per layer, named as
    transformers names that layer (`encoder.layer.3.attention...`)."""
    from flaxauto.stacks import ScannedLayers

    family, spec = model.family, model.head_spec
    prefix = "" if model.task == "base" else base_model_prefix(model)
    ties = family.ties(model.config) if callable(family.ties) else family.ties
    modules = list(nnx.iter_modules(model))
    stacks = {path: m.num_layers for path, m in modules if isinstance(m, ScannedLayers)}
    adapters = {path for path, m in modules if isinstance(m, nnx.LoRA)}
    # modules that name the tensors below them themselves (DETR's timm backbone: a name table)
    renamers = {path: m for path, m in modules if hasattr(type(m), "checkpoint_name")}
    slots: dict[str, Slot] = {}
    for path, module in modules:
        path = _without_adapters(path, adapters)
        leaves = next((LAYOUTS[t] for t in type(module).__mro__ if t in LAYOUTS), {})
        for attr, variable in vars(module).items():
            if not issubclass(type(variable), PERSISTENT):  # (flax's isinstance hook is slow)
                continue
            if issubclass(type(variable), nnx.LoRAParam):
                continue  # LoRA adapters are PEFT's tensors (flaxauto.lora), not the model's
            leaf = leaves.get(attr, Leaf(attr))
            init = variable.get_metadata("init", None) or leaf.init or _init(attr, leaf.layout)
            for index, layer_path in _per_layer_paths(path, stacks):
                root, *rest = [str(p) for p in layer_path] or [""]
                local = _join(*rest)
                names = [
                    _renamed_below(path, _join(local, torch), renamers)
                    for torch in (leaf.torch, *leaf.legacy)
                ]
                tied = ()
                if root == "backbone":
                    tied = tuple(_join(prefix, n) for n in _tied_aliases(names[0], ties))
                    names = [_join(prefix, n) for n in names]
                    optional = rest and rest[0] in family.optional_modules
                    part = "optional" if optional else "backbone"
                    if variable.get_metadata("counter", False):
                        part = "counter"
                    elif variable.get_metadata("computed", False):
                        part = "computed"
                else:
                    names, part = [_rename(n, spec.names) for n in names], "head"
                name, *legacy = names
                slots[name] = Slot(
                    variable, name, leaf.layout, part, init, index, (*legacy, *tied), tied
                )
    return slots


def _renamed_below(path: tuple, name: str, renamers: dict) -> str:
    """`name` (below the model's root module) as the nearest enclosing module with a
    `checkpoint_name(name_below_it) -> str` method spells it; unchanged without one."""
    owners = [p for p in renamers if len(p) > 1 and tuple(path[: len(p)]) == p]
    if not owners:
        return name
    owner = max(owners, key=len)
    above = ".".join(str(part) for part in owner[1:])  # the owner's own path, past the root
    below = name[len(above) + 1 :]
    return _join(above, renamers[owner].checkpoint_name(below))


def _without_adapters(path: tuple, adapters: set[tuple]) -> tuple:
    """A layer wrapped in a LoRA adapter (flaxauto.lora) keeps its PyTorch name: the wrapper's
    `base_module` step is not part of it."""
    if not adapters:
        return path
    kept = []
    for index, part in enumerate(path):
        if part == "base_module" and tuple(path[:index]) in adapters:
            continue
        kept.append(part)
    return tuple(kept)


def _tied_aliases(local: str, ties) -> list[str]:
    """The other names the family ties `local` to: {"shared": ("encoder.embed_tokens", ...)}
    makes `shared.weight` also `encoder.embed_tokens.weight`, ... (the model holds one table)."""
    for owner, others in ties.items():
        if local.startswith(owner + "."):
            return [other + local[len(owner) :] for other in others]
    return []


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
    its family: LlamaForQuestionAnswering keeps "transformer"; "" keeps the backbone's names at
    the top, as WhisperForAudioClassification does with `encoder.*`)."""
    prefix = model.head_spec.base_model_prefix
    return model.family.base_model_prefix if prefix is None else prefix


def _init(attr: str, layout: str | None) -> str:
    if layout in ("linear", "conv") or attr in ("kernel", "embedding"):
        return "normal"
    return "ones" if attr == "scale" else "zeros"


def tied_names(model) -> set[str]:
    """PyTorch names transformers ties to another parameter (and does not save)."""
    head = model.head
    if head is None:
        return set()
    return {_rename(name, model.head_spec.names) for name in head.tied_names}


def initial_value(slot: Slot, key: jax.Array, std: float) -> jax.Array:
    """transformers' _init_weights: kernels ~ N(0, initializer_range), norms 1, biases and
    statistics 0 (running variances 1).

    The value is for the whole variable (every layer of a stacked one)."""
    shape, dtype = tuple(slot.variable.get_value().shape), slot.dtype
    if slot.init in ("sinusoidal", "sinusoidal-halves"):
        from flaxauto.layers import sinusoidal_table

        return jnp.asarray(sinusoidal_table(*shape, halves=slot.init == "sinusoidal-halves"), dtype)
    if slot.init == "sinusoidal-timescales":  # Whisper's encoder positions
        from flaxauto.layers import sinusoidal_timescales_table

        return jnp.asarray(sinusoidal_timescales_table(*shape), dtype)
    if slot.init == "normal":
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    if slot.init == "kaiming_fan_out":  # torch's kaiming_normal_(mode="fan_out"), for ReLU
        fan_out = slot.shape[-1] * int(np.prod(slot.shape[:-2]))  # [*kernel, in, out]
        return (np.sqrt(2.0 / fan_out) * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    if isinstance(slot.init, float):  # a constant (ConvNeXt's layer_scale_init_value)
        return jnp.full(shape, slot.init, dtype)
    if slot.init == "ones":
        return jnp.ones(shape, dtype)
    if slot.init == "zeros":
        return jnp.zeros(shape, dtype)
    raise NotImplementedError(f"{slot.torch_name}: initialiser {slot.init!r} is not implemented")


def export_tensors(model):
    """(PyTorch name, numpy array in PyTorch layout and dtype) for every saved tensor, in model
    order; a table the family ties is written once, under its owner's name (as transformers);
    the task's keys_to_ignore_on_save (HeadSpec) are not written."""
    unsaved = model.head_spec.keys_to_ignore_on_save
    for name, slot in parameter_slots(model).items():
        if any(name == key or name.endswith("." + key) for key in unsaved):
            continue
        value = slot.variable.get_value()
        value = value if slot.index is None else value[slot.index]
        yield name, slot.to_torch(np.asarray(jax.device_get(value)))
