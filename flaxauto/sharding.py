"""Logical axis names -> mesh shardings, presets, and data-parallel helpers.

Parameters carry logical axes ("vocab", "embed", "heads", "kv", "mlp") as `out_sharding`
metadata. A rules table maps each logical axis to mesh axes; axes without a rule, and rules whose
mesh axes do not divide the dimension, are replicated (a small model on a big mesh still loads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxauto.layers import Buffer

Rules = Mapping[str, str | tuple[str, ...] | None]

MESH_AXES = ("data", "fsdp", "tensor")

#: Every parameter replicated; only the batch is split.
DATA_PARALLEL: Rules = {}
#: Parameters split along their model dimension over "fsdp"; gathered per layer by XLA.
FSDP: Rules = {"embed": "fsdp"}
#: Megatron-style: attention heads, MLP width and vocabulary split over "tensor".
TENSOR_PARALLEL: Rules = {"heads": "tensor", "kv": "tensor", "mlp": "tensor", "vocab": "tensor"}
#: Both at once on a (data, fsdp, tensor) mesh.
FSDP_TENSOR_PARALLEL: Rules = {**FSDP, **TENSOR_PARALLEL}

PRESETS = {
    "data": DATA_PARALLEL,
    "fsdp": FSDP,
    "tensor": TENSOR_PARALLEL,
    "fsdp+tensor": FSDP_TENSOR_PARALLEL,
}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; -1 takes the devices the other axes leave."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    sizes = [devices.size // known if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != devices.size:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} does not use {devices.size} devices"
        )
    return Mesh(devices.reshape(sizes), MESH_AXES)


def resolve_rules(rules: Rules | str | None) -> Rules:
    if rules is None:
        return FSDP
    if isinstance(rules, str):
        if rules not in PRESETS:
            raise ValueError(f"unknown sharding preset {rules!r}; presets: {sorted(PRESETS)}")
        return PRESETS[rules]
    return rules


def partition_spec(
    logical_axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh, rules: Rules
) -> PartitionSpec:
    """The PartitionSpec for one array, dropping mesh axes that are absent or do not divide."""
    if not logical_axes:
        return PartitionSpec()
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape, strict=True):
        target = rules.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a in mesh.shape and a not in used)
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if not axes or dim % size:
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def variable_sharding(variable: nnx.Variable, shape, mesh: Mesh, rules: Rules) -> NamedSharding:
    axes = variable.get_metadata("out_sharding", None)
    return NamedSharding(mesh, partition_spec(axes, shape, mesh, rules))


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Split the batch dimension over the data-like mesh axes that divide it (else replicate)."""
    for axes in (("data", "fsdp"), ("data",), ("fsdp",)):
        axes = tuple(a for a in axes if a in mesh.shape)
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if axes and shape and shape[0] % size == 0:
            return NamedSharding(mesh, PartitionSpec(axes, *([None] * (len(shape) - 1))))
    return NamedSharding(mesh, PartitionSpec())


def put(value, sharding: NamedSharding) -> jax.Array:
    """jax.device_put, also onto a mesh spanning several processes: there each process passes
    the same whole value and places the blocks its own devices hold (typed PRNG keys too)."""
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    if jax.dtypes.issubdtype(getattr(value, "dtype", None), jax.dtypes.prng_key):
        impl = jax.random.key_impl(value)
        data = np.asarray(jax.random.key_data(value))
        spec = PartitionSpec(*sharding.spec, *([None] * (data.ndim - np.ndim(value))))
        bits = put(data, NamedSharding(sharding.mesh, spec))
        return jax.random.wrap_key_data(bits, impl=impl)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_batch(batch: Mapping, mesh: Mesh) -> dict:
    """Place every array of a batch split over its first dimension (on several processes, each
    passes the same global batch and keeps its devices' rows). A list (detection labels: one
    dict of arrays per example, of different sizes) is replicated, leaf by leaf."""
    return {name: _place_batch_entry(value, mesh) for name, value in batch.items()}


def _place_batch_entry(value, mesh: Mesh):
    if value is None:
        return None
    if isinstance(value, list):
        return jax.tree.map(lambda leaf: put(leaf, NamedSharding(mesh, PartitionSpec())), value)
    return put(value, batch_sharding(mesh, np.shape(value)))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules | str | None = None) -> nnx.Module:
    """Move an existing model's parameters, batch statistics and buffers into their shards on
    `mesh` (in place)."""
    rules = resolve_rules(rules)
    for _, variable in nnx.iter_graph(model):
        if isinstance(variable, (nnx.Param, nnx.BatchStat, Buffer)):
            value = variable.get_value()
            variable.set_value(
                jax.device_put(value, variable_sharding(variable, value.shape, mesh, rules))
            )
    if hasattr(model, "static"):  # a flaxauto Model: caches and activations follow the mesh
        model.static.placement = (mesh, rules)
    return model


#: Mesh axes a batch dimension splits over, in order of preference: the first whose size
#: divides the batch (the data-parallel axes, fsdp's included: it splits the batch too).
BATCH_AXES = (("data", "fsdp"), ("data",), ("fsdp",))


def cache_partition_spec(
    logical_axes: Sequence[str], shape: Sequence[int], mesh: Mesh, rules: Rules
) -> PartitionSpec:
    """One cache array's PartitionSpec: "batch" over BATCH_AXES, "kv_heads" as the rules split
    the key/value projections ("kv", so tensor parallelism keeps each head's cache with its
    weights), any other logical axis ("layers", "cache_seq", ...) by its own rule, if any."""
    spec: list = []
    used: set[str] = set()
    for name, dim in zip(logical_axes, shape, strict=True):
        if name == "batch":
            candidates = BATCH_AXES
        else:
            target = rules.get("kv" if name == "kv_heads" else name)
            candidates = ((target,) if isinstance(target, str) else tuple(target or ()),)
        chosen = None
        for axes in candidates:
            axes = tuple(a for a in axes if a in mesh.shape and a not in used)
            if axes and dim % int(np.prod([mesh.shape[a] for a in axes])) == 0:
                chosen = axes
                break
        if chosen is None:
            spec.append(None)
            continue
        used.update(chosen)
        spec.append(chosen[0] if len(chosen) == 1 else chosen)
    return PartitionSpec(*spec)


def cache_shardings(cache, mesh: Mesh, rules: Rules | str | None = None):
    """The cache's structure with a NamedSharding for each array (flaxauto.decoder's caches
    name every array's logical axes through `map_arrays`): for jax.device_put, jit's
    out_shardings, or a sharding constraint."""
    rules = resolve_rules(rules)
    return cache.map_arrays(
        lambda x, axes: NamedSharding(mesh, cache_partition_spec(axes, x.shape, mesh, rules))
    )


def shard_cache(cache, mesh: Mesh, rules: Rules | str | None = None):
    """The cache placed in its shards (a sharding constraint when traced under jit)."""
    shardings = cache_shardings(cache, mesh, rules)
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(cache)):
        return jax.lax.with_sharding_constraint(cache, shardings)
    return jax.device_put(cache, shardings)


def replicate(tree, devices=None):
    """Copy a pytree (e.g. `nnx.state(model)`) onto each local device with a leading device
    axis, for `jax.pmap`: each device receives its one copy [1, ...] directly (no [N, ...]
    array is ever built on one device)."""
    devices = list(jax.local_devices() if devices is None else devices)
    sharding = NamedSharding(Mesh(np.asarray(devices), ("devices",)), PartitionSpec("devices"))

    def place(x):
        one = jnp.asarray(x)[None]  # [1, ...]
        copies = [jax.device_put(one, device) for device in devices]
        return jax.make_array_from_single_device_arrays(
            (len(devices), *one.shape[1:]), sharding, copies
        )

    return jax.tree.map(place, tree)


def activation_placer(mesh: Mesh, rules: Rules | str | None = None):
    """place(x, logical axes) -> NamedSharding for activations (layers.activation_sharding):
    "batch" over the data-parallel axes, any other logical axis by its rule, as for the cache."""
    rules = resolve_rules(rules)
    return lambda x, axes: NamedSharding(mesh, cache_partition_spec(axes, x.shape, mesh, rules))
