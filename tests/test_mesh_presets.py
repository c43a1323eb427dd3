"""Every sharding preset for every family, on the 8 simulated CPU devices of tests/conftest.py:
"data", "fsdp", "tensor" and "fsdp+tensor" give one device's numbers (outputs and loss), place
about 1/N of the parameters on each device where N is the sharded axes' size, constrain
activations and the KV cache by their logical axes, and tensor-parallel generation gives one
device's tokens. `replicate` (for jax.pmap) places one copy per device."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxauto
from flaxauto.registry import TASK_AUTO_CLASSES
from references import (
    DECODERS,
    LABEL_FACTORIES,
    TINY_CONFIGS,
    output_diff,
    run_compiled,
    task_inputs,
    task_labels,
    task_pairs,
    tiny_config,
    torch_model,
)

#: preset -> (data, fsdp, tensor) mesh on 8 devices
MESHES = {"data": (8, 1, 1), "fsdp": (1, 8, 1), "tensor": (2, 1, 4), "fsdp+tensor": (1, 2, 4)}
#: one labelled task per family: the loss and the head's gradients-to-be run sharded too
FAMILY_TASKS = {}
for _model_type, _task in task_pairs():
    if _task in LABEL_FACTORIES and _model_type in TINY_CONFIGS:
        FAMILY_TASKS.setdefault(_model_type, _task)
CASES = [(m, p) for m in FAMILY_TASKS for p in MESHES]
BATCH = 8  # divides every preset's data-parallel axes


def _mesh(preset):
    data, fsdp, tensor = MESHES[preset]
    return flaxauto.make_mesh(data=data, fsdp=fsdp, tensor=tensor)


def _auto_class(task):
    return getattr(flaxauto, TASK_AUTO_CLASSES[task])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """model_type -> (task, checkpoint directory, unsharded model), built on first use."""
    made = {}

    def get(model_type):
        if model_type not in made:
            task = FAMILY_TASKS[model_type]
            directory = tmp_path_factory.mktemp(model_type)
            torch_model(model_type, task).save_pretrained(directory)
            made[model_type] = (task, directory, _auto_class(task).from_pretrained(directory))
        return made[model_type]

    return get


@pytest.fixture(scope="module")
def one_device(checkpoints):
    """model_type -> (inputs, batch with labels, the unsharded model's output): computed once
    per family, not once per preset (every preset compares with the same numbers)."""
    made = {}

    def get(model_type):
        if model_type not in made:
            task, _, single = checkpoints(model_type)
            inputs = task_inputs(model_type, task, seed=2, config=single.config, batch=BATCH)
            batch = {**inputs, **task_labels(single, task, inputs, seed=2)}
            made[model_type] = (inputs, batch, single(**batch))
        return made[model_type]

    return get


def per_device_parameter_bytes(model) -> dict:
    """Bytes of parameters each device holds (its shards, replicas included)."""
    held: dict = {}
    for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held


@pytest.mark.parametrize("model_type,preset", CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_preset_matches_one_device(model_type, preset, checkpoints, one_device):
    task, directory, single = checkpoints(model_type)
    inputs, batch, expected = one_device(model_type)
    mesh = _mesh(preset)
    sharded = _auto_class(task).from_pretrained(directory, mesh=mesh, rules=preset)
    output = run_compiled(
        lambda model, batch: model(**batch), sharded, flaxauto.shard_batch(batch, mesh)
    )
    fields = [
        f
        for f in ("logits", "start_logits", "end_logits")
        if getattr(expected, f, None) is not None
    ]
    for field in (*fields, "loss"):
        diff = output_diff(
            model_type, inputs, field, getattr(output, field), getattr(expected, field)
        )
        # sharded sums add in another order: float32 rounding relative to the field's size
        # (mT5's tied logits, not rescaled, reach ~10), as in the conformance suite
        scale = max(1.0, float(np.max(np.abs(np.asarray(getattr(expected, field))))))
        assert diff <= 1e-5 * scale, f"{field}: {diff:.2e}"
    held = per_device_parameter_bytes(sharded)
    assert len(held) == 8
    total = sum(x.nbytes for x in jax.tree.leaves(nnx.state(single, nnx.Param)))
    if preset == "data":
        assert set(held.values()) == {total}  # a full replica on each device
    else:
        assert max(held.values()) < total  # something is split


#: Width overrides that every sharded dimension divides (tiny configs use odd sizes on purpose,
#: 37 and 99, which stay replicated), by each config class's attribute name.
WIDE = {"vocab_size": 128, "intermediate_size": 64, "n_inner": 64, "hidden_dim": 64}


def _wide_config(model_type: str, task: str):
    config = tiny_config(model_type, task)
    for name, value in WIDE.items():
        if name in config.to_dict():
            setattr(config, name, value)
    return config


#: the share of the parameters one device may hold beyond total / N: the replicated small
#: vectors (norm scales, biases of split-free axes, position tables under tensor parallelism)
SLACK = {"fsdp": 0.10, "tensor": 0.35, "fsdp+tensor": 0.35}
SPLIT = {"fsdp": 8, "tensor": 4, "fsdp+tensor": 8}
#: one family per architecture kind (encoder, Conv1D decoder, grouped-query decoder): the byte
#: count depends on the logical axes, which the families of a kind share
BYTES_FAMILIES = [m for m in ("bert", "gpt2", "llama") if m in FAMILY_TASKS]
BYTES_CASES = [(m, p) for m in BYTES_FAMILIES for p in SPLIT]


@pytest.mark.parametrize("model_type,preset", BYTES_CASES, ids=[f"{m}-{p}" for m, p in BYTES_CASES])
def test_per_device_parameter_bytes_about_one_nth(model_type, preset):
    task = FAMILY_TASKS[model_type]
    config = _wide_config(model_type, task)
    model = _auto_class(task).from_config(config, mesh=_mesh(preset), rules=preset)
    total = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    largest = max(per_device_parameter_bytes(model).values())
    share = largest / total
    assert share <= 1 / SPLIT[preset] + SLACK[preset], f"{share:.3f} of {total} bytes"


def _constraint_shapes(model, batch) -> list[tuple[int, ...]]:
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda state, batch: nnx.merge(graphdef, state)(**batch))(state, batch)
    shapes = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "sharding_constraint":
                shapes.append(tuple(eqn.invars[0].aval.shape))
            for sub in jax.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return shapes


def test_activations_carry_sharding_constraints_only_on_a_mesh(checkpoints):
    task, directory, single = checkpoints("llama")
    inputs = task_inputs("llama", task, config=single.config, batch=BATCH)
    assert _constraint_shapes(single, inputs) == []
    sharded = _auto_class(task).from_pretrained(directory, mesh=_mesh("tensor"), rules="tensor")
    shapes = _constraint_shapes(sharded, inputs)
    config = single.config
    length = inputs["input_ids"].shape[1]
    hidden = (BATCH, length, config.hidden_size)
    queries = (BATCH, length, config.num_attention_heads, config.head_dim)
    assert shapes.count(hidden) == config.num_hidden_layers
    assert shapes.count(queries) == config.num_hidden_layers


GENERATORS = sorted(m for m in FAMILY_TASKS if m in DECODERS)


@pytest.mark.parametrize("model_type", GENERATORS)
def test_generate_on_tensor_parallel_mesh_gives_the_same_tokens(model_type, tmp_path):
    torch_model(model_type, "causal-lm").save_pretrained(tmp_path)
    single = flaxauto.AutoModelForCausalLM.from_pretrained(tmp_path)
    mesh = _mesh("tensor")
    sharded = flaxauto.AutoModelForCausalLM.from_pretrained(tmp_path, mesh=mesh, rules="tensor")
    inputs = task_inputs(model_type, "causal-lm", seed=3, config=single.config, batch=2)
    settings = dict(max_new_tokens=6, do_sample=False)
    expected = single.generate(inputs["input_ids"], inputs["attention_mask"], **settings)
    tokens = sharded.generate(inputs["input_ids"], inputs["attention_mask"], **settings)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(expected))
    cache = sharded.init_cache(2, 16)
    keys = cache.keys[0] if isinstance(cache.keys, tuple) else cache.keys
    assert not keys.sharding.is_fully_replicated  # the cache follows the heads' split


def test_replicate_places_one_copy_per_device():
    tree = {"w": jnp.arange(12.0).reshape(3, 4), "b": np.ones(5, np.float32)}
    replicated = flaxauto.replicate(tree)
    devices = jax.local_devices()
    for name, leaf in replicated.items():
        assert leaf.shape == (len(devices), *np.shape(tree[name]))
        assert {s.device for s in leaf.addressable_shards} == set(devices)
        for shard in leaf.addressable_shards:
            assert shard.data.shape == (1, *np.shape(tree[name]))
            np.testing.assert_array_equal(np.asarray(shard.data[0]), np.asarray(tree[name]))
    out = jax.pmap(lambda t: t["w"].sum() + t["b"].sum())(replicated)
    np.testing.assert_allclose(np.asarray(out), np.full(len(devices), 66.0 + 5.0))


_TRANSFER = re.compile(r"(host|device)-to-device transfer: aval=ShapedArray\((\w+)\[([\d,]*)\]\)")


def _transfers(log: str) -> list[tuple[int, ...]]:
    """The shapes of the arrays JAX's transfer guard logged as moved onto a device."""
    return [tuple(int(d) for d in dims.split(",") if d) for _, _, dims in _TRANSFER.findall(log)]


def test_replicate_never_builds_the_copies_on_one_device(capfd):
    """What moves onto the devices, as JAX's transfer guard logs every explicit transfer: one
    [1, ...] copy into each device (and the value itself once), never an array holding the N
    copies, which would have been materialised whole on one device first. The observable is
    checked against the naive way (stack, then place) in the same test, so it can fail."""
    devices = jax.local_devices()
    n = len(devices)
    leaf = np.arange(15, dtype=np.float32).reshape(3, 5)
    capfd.readouterr()
    with jax.transfer_guard("log_explicit"):
        replicated = flaxauto.replicate({"w": leaf})
        jax.block_until_ready(replicated)
    moved = _transfers(capfd.readouterr().err)
    assert moved, "the transfer guard logged nothing: the observable is gone"
    assert all(shape in ((1, 3, 5), (3, 5)) for shape in moved), moved
    assert moved.count((1, 3, 5)) >= n - 1  # every device but the source receives one copy
    assert {s.device for s in replicated["w"].addressable_shards} == set(devices)

    sharding = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.asarray(devices), ("devices",)), jax.sharding.PartitionSpec("devices")
    )
    with jax.transfer_guard("log_explicit"):
        naive = jax.device_put(jnp.stack([jnp.asarray(leaf)] * n), sharding)
        jax.block_until_ready(naive)
    assert (n, 3, 5) in _transfers(capfd.readouterr().err)  # the naive way is seen
