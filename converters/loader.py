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
from flaxauto.converters.layout import (
    LEGACY_LEAVES,
    Slot,
    base_model_prefix,
    parameter_slots,
    tied_names,
)

logger = logging.getLogger("flaxauto")

# Buffers transformers never loads (non-persistent in current versions, saved by older ones).
IGNORED_BUFFERS = re.compile(r"(^|\.)(position_ids|token_type_ids|masked_bias|attn\.bias)$")


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
    assignments: dict[str, Slot] = field(default_factory=dict)  # checkpoint key -> parameter
    info: LoadingInfo = field(default_factory=LoadingInfo)
    problems: list[str] = field(default_factory=list)


def _candidates(key: str, prefix: str, renames) -> list[str]:
    """Names a checkpoint key may have in the model: as is, legacy-renamed, with or without the
    base_model_prefix (a base checkpoint in a task model, a task checkpoint in a base model)."""
    key = renames.get(key, key)
    head, _, leaf = key.rpartition(".")
    forms = [key]
    if leaf in LEGACY_LEAVES:
        forms.append(f"{head}.{LEGACY_LEAVES[leaf]}" if head else LEGACY_LEAVES[leaf])
    out = []
    for form in forms:
        out += [form, prefix + form]
        if form.startswith(prefix):
            out.append(form[len(prefix) :])
    return out


def plan_load(model, source, ignore_mismatched_sizes: bool = False) -> _Plan:
    family = model.family
    prefix = base_model_prefix(model) + "."
    slots = parameter_slots(model)
    tied = tied_names(model)
    backbone_roots = {name.split(".")[0] for name in _backbone_names(slots, prefix)}
    plan = _Plan()
    reinitialized: set[str] = set()
    for key in source.keys():
        slot = next(
            (slots[c] for c in _candidates(key, prefix, family.renames) if c in slots), None
        )
        if slot is None:
            _unmatched(key, plan, tied, prefix, backbone_roots, family.optional_modules)
            continue
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
        if slot.torch_name in {s.torch_name for s in plan.assignments.values()}:
            plan.problems.append(f"duplicate: {key} fills {slot.torch_name} a second time")
            continue
        plan.assignments[key] = slot
    filled = {slot.torch_name for slot in plan.assignments.values()} | reinitialized
    for name, slot in slots.items():
        if name in filled:
            continue
        if slot.part == "backbone":
            plan.problems.append(f"missing: {name}")
        else:
            plan.info.missing_keys.append(name)
    return plan


def _backbone_names(slots, prefix):
    for name, slot in slots.items():
        if slot.part != "head":
            yield name[len(prefix) :] if name.startswith(prefix) else name


def _unmatched(key, plan, tied, prefix, backbone_roots, optional_modules) -> None:
    """A key no parameter takes: ignored, dropped with a report, or a problem."""
    if key in tied or IGNORED_BUFFERS.search(key):
        return
    bare = key[len(prefix) :] if key.startswith(prefix) else key
    root = bare.split(".")[0]
    in_backbone = key.startswith(prefix) or root in backbone_roots
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
) -> LoadingInfo:
    """Fill `model`'s parameters from `source` (a converters.files.TensorSource)."""
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
                if key in plan.assignments:
                    slot = plan.assignments[key]
                    value = _place(source, key, slot, mesh, rules)
                    if slot.index is None:
                        slot.variable.set_value(value)
                    else:
                        stacks.add(slot, value)
                    bar.update()
    stacks.check_complete()
    return plan.info


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


def _place(source, key: str, slot: Slot, mesh, rules) -> jax.Array:
    dtype = slot.dtype
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
