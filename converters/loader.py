"""Stream a checkpoint's tensors into an abstractly built model.

Plan first, from names and shapes alone (no tensor data is read): match each checkpoint key to a
parameter, collect every problem and raise them together. Then read tensor by tensor, shard file
by shard file, converting layout and dtype and placing each tensor (into its mesh shards when a
mesh is given) before reading the next: peak host memory is the parameters plus about one tensor.
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass, field

import jax
import numpy as np
from tqdm.auto import tqdm

from flaxauto.converters.errors import CheckpointError
from flaxauto.converters.files import arrange
from flaxauto.converters.layout import Slot, base_model_prefix, parameter_slots, tied_names

logger = logging.getLogger("flaxauto")


def ignored_pattern(family) -> re.Pattern | None:
    """The checkpoint names the family declares ignorable (register(ignored=...)): buffers that
    transformers no longer saves but older versions did (`rotary_emb.inv_freq`, `position_ids`),
    matched as the end of a name at a dot."""
    if not family.ignored:
        return None
    return re.compile(r"(^|\.)(" + "|".join(map(re.escape, family.ignored)) + r")$")


@dataclass
class LoadingInfo:
    """What did not come from the checkpoint, as transformers' output_loading_info reports it."""

    missing_keys: list[str] = field(default_factory=list)  # initialised (heads, optional modules)
    unexpected_keys: list[str] = field(default_factory=list)  # dropped (other tasks' heads)
    mismatched_keys: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # initialised

    def as_dict(self) -> dict:
        return {
            "missing_keys": self.missing_keys,
            "unexpected_keys": self.unexpected_keys,
            "mismatched_keys": self.mismatched_keys,
        }


@dataclass
class _Plan:
    assignments: dict[str, Slot] = field(default_factory=dict)  # checkpoint key -> variable
    #: a further checkpoint key of a tied table -> the key that fills it (they must be equal)
    tie_copies: dict[str, str] = field(default_factory=dict)
    info: LoadingInfo = field(default_factory=LoadingInfo)
    problems: list[str] = field(default_factory=list)


def _candidates(key: str, prefix: str, renames) -> list[str]:
    """Names a checkpoint key may have in the model: as is, with or without the
    base_model_prefix (a base checkpoint in a task model, a task checkpoint in a base model)."""
    key = renames(key) if callable(renames) else renames.get(key, key)
    if not prefix:
        return [key]
    out = [key, prefix + key]
    if key.startswith(prefix):
        out.append(key[len(prefix) :])
    return out


def _names(slots: dict[str, Slot]) -> dict[str, Slot]:
    """Every name that loads into a variable: its own, legacy spellings, tied names."""
    names = {alias: slot for slot in slots.values() for alias in slot.aliases}
    return names | slots


def plan_load(model, source, ignore_mismatched_sizes: bool = False) -> _Plan:
    family = model.family
    base = base_model_prefix(model)
    prefix = base + "." if base else ""
    slots = parameter_slots(model)
    names = _names(slots)
    ignored = ignored_pattern(family)
    tied = tied_names(model)
    backbone_roots = {name.split(".")[0] for name in _backbone_names(slots, prefix)}
    plan = _Plan()
    filled_by: dict[str, str] = {}  # variable's torch name -> the key that fills it
    reinitialized: set[str] = set()
    for key in source.keys():
        match = next((c for c in _candidates(key, prefix, family.renames) if c in names), None)
        if match is None:
            if key not in tied and not (ignored and ignored.search(key)):
                _unmatched(key, plan, prefix, backbone_roots, family.optional_modules)
            continue
        slot = names[match]
        shape = tuple(source.shape(key))
        if shape != slot.torch_shape:
            reinitialized.add(slot.torch_name)  # reported as mis-shaped, not also as missing
            if ignore_mismatched_sizes:
                plan.info.mismatched_keys.append((key, shape, slot.torch_shape))
                continue
            plan.problems.append(
                f"mis-shaped: {key} is {shape} in the checkpoint, the model expects "
                f"{slot.torch_shape}"
            )
            continue
        if is_floating(slot.dtype) and not is_floating(source.dtype(key)):
            plan.problems.append(
                f"wrong kind: {key} is {source.dtype(key)} in the checkpoint, the model's "
                f"parameter is floating ({slot.dtype}); refused, not cast"
            )
            continue
        first = filled_by.get(slot.torch_name)
        if first is None:
            filled_by[slot.torch_name] = key
            plan.assignments[key] = slot
        elif _tie_group(slot) >= {match, _matched(first, prefix, family.renames, names)}:
            plan.tie_copies[key] = first  # one table under several tied names
        else:
            plan.problems.append(f"duplicate: {key} fills {slot.torch_name} a second time")
    filled = set(filled_by) | reinitialized
    for name, slot in slots.items():
        if name in filled or slot.part in ("counter", "computed"):  # filled by init, silently
            continue
        if slot.part == "backbone":
            plan.problems.append(f"missing: {name}")
        else:
            plan.info.missing_keys.append(name)
    return plan


def _tie_group(slot: Slot) -> set[str]:
    return {slot.torch_name, *slot.tied}


def _matched(key: str, prefix: str, renames, names) -> str:
    return next(c for c in _candidates(key, prefix, renames) if c in names)


def _backbone_names(slots, prefix):
    for name, slot in slots.items():
        if slot.part != "head":
            yield name[len(prefix) :] if prefix and name.startswith(prefix) else name


def _unmatched(key, plan, prefix, backbone_roots, optional_modules) -> None:
    """A key no variable takes: dropped with a report, or a problem."""
    bare = key[len(prefix) :] if prefix and key.startswith(prefix) else key
    root = bare.split(".")[0]
    in_backbone = (prefix and key.startswith(prefix)) or root in backbone_roots
    if in_backbone and root not in optional_modules:
        plan.problems.append(f"unexpected: {key}")
    else:  # another task's head, or an optional module (a pooler) this task does not use
        plan.info.unexpected_keys.append(key)


def load_weights(
    model,
    source,
    *,
    mesh=None,
    rules=None,
    ignore_mismatched_sizes: bool = False,
    progress: bool | None = None,
    where: str = "checkpoint",
    keep_dtypes: bool = False,
) -> LoadingInfo:
    """Fill `model`'s parameters from `source` (a converters.files.TensorSource). Floating
    tensors are cast to their parameter's dtype, or with keep_dtypes keep the checkpoint's."""
    plan = plan_load(model, source, ignore_mismatched_sizes)
    if plan.problems:
        listing = "\n  ".join(plan.problems)
        raise CheckpointError(
            f"{where} does not fit {type(model).__name__} ({model.config.model_type}, "
            f"{model.task}): {len(plan.problems)} problem(s):\n  {listing}"
        )
    show = sys.stderr.isatty() if progress is None else progress
    stacks = _Stacks(mesh, rules)
    with tqdm(total=len(plan.assignments), desc="loading", unit="tensor", disable=not show) as bar:
        for file_keys in source.keys_by_file():
            for key in file_keys:
                if key in plan.tie_copies:
                    _check_tied_copy(source, key, plan.tie_copies[key], where)
                elif key in plan.assignments:
                    slot = plan.assignments[key]
                    value = _place(source, key, slot, mesh, rules, keep_dtypes)
                    if slot.index is None:
                        slot.variable.set_value(value)
                    else:
                        stacks.add(slot, value)
                    bar.update()
    stacks.check_complete()
    return plan.info


def _check_tied_copy(source, key: str, first: str, where: str) -> None:
    """A checkpoint may carry a tied table under several names; they must be one table."""
    if not np.array_equal(source.read(key), source.read(first)):
        raise CheckpointError(
            f"{where}: {key} and {first} are tied (one table in the model) but their values "
            f"differ in the checkpoint"
        )


class _Stacks:
    """Layers of a stacked (scan_layers) variable arrive one tensor at a time; the variable is
    set once all its layers are placed."""

    def __init__(self, mesh, rules):
        self.mesh, self.rules = mesh, rules
        self.pending: dict[int, tuple[Slot, dict[int, jax.Array]]] = {}

    def add(self, slot: Slot, value: jax.Array) -> None:
        _, layers = self.pending.setdefault(id(slot.variable), (slot, {}))
        layers[slot.index] = value
        num_layers = slot.variable.get_value().shape[0]
        if len(layers) == num_layers:
            stacked = jax.numpy.stack([layers[i] for i in range(num_layers)])
            if self.mesh is not None:
                from flaxauto.sharding import variable_sharding

                sharding = variable_sharding(slot.variable, stacked.shape, self.mesh, self.rules)
                stacked = jax.device_put(stacked, sharding)
            slot.variable.set_value(stacked)
            del self.pending[id(slot.variable)]

    def check_complete(self) -> None:
        if self.pending:
            names = [slot.torch_name for slot, _ in self.pending.values()]
            raise NotImplementedError(
                "with scan_layers, a layer parameter must load for every layer or none "
                f"(ignore_mismatched_sizes re-initialised only some): {names}"
            )


def is_floating(dtype) -> bool:
    """numpy's floating and complex kinds, and ml_dtypes' bfloat16 / float8 (kind "V")."""
    dtype = np.dtype(dtype)
    return dtype.kind in "fc" or dtype.name.startswith(("bfloat", "float8"))


def _place(source, key: str, slot: Slot, mesh, rules, keep_dtypes: bool = False) -> jax.Array:
    dtype = slot.dtype
    if keep_dtypes and is_floating(dtype):
        dtype = source.dtype(key)
    if mesh is None:
        # one copy from the file into a buffer that the CPU device array adopts as it is
        return jax.device_put(arrange(source.read(key), slot.perm, dtype))
    from jax.sharding import NamedSharding

    from flaxauto.sharding import partition_spec

    sharding = NamedSharding(mesh, partition_spec(slot.logical_axes, slot.shape, mesh, rules))
    inverse = np.argsort(slot.perm)
    cache: dict = {}

    def read_shard(index):
        # Each device asks for its block (flax layout); read that block in PyTorch layout, so a
        # host reads only the slices its own devices hold. Replicated blocks are read once.
        index = tuple(index) + (slice(None),) * (len(slot.shape) - len(index))
        torch_index = tuple(index[i] for i in inverse)
        cache_key = tuple((s.start, s.stop, s.step) for s in torch_index)
        if cache_key not in cache:
            block = source.read_slice(key, torch_index)
            cache[cache_key] = slot.to_flax(block).astype(dtype)
        return cache[cache_key]

    return jax.make_array_from_callback(slot.shape, sharding, read_shard)
