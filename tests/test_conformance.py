"""The conformance suite: every (model_type, task) the registry knows, against live transformers.

A family that registers gets all of it: parity (fp32, padded batch, eager and jitted, losses
included) from safetensors and pytorch_model.bin, bit-exact round trip back into transformers,
abstract construction, and sharded execution on an 8-device FSDP mesh.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import flaxauto
from flaxauto import modeling
from references import TINY_CONFIGS, make_case, max_diff, task_pairs, tiny_config

TOLERANCE = 1e-4
PAIRS = task_pairs()
IDS = [f"{model_type}-{task}" for model_type, task in PAIRS]


@pytest.fixture(scope="module", params=PAIRS, ids=IDS)
def case(request, tmp_path_factory):
    model_type, task = request.param
    return make_case(model_type, task, tmp_path_factory.mktemp(f"{model_type}-{task}"))


@pytest.fixture(scope="module")
def loaded(case):
    return case.auto_class.from_pretrained(case.safetensors_dir)


def _assert_parity(case, output):
    for field in case.fields:
        diff = case.diff(field, getattr(output, field), getattr(case.reference, field))
        assert diff <= TOLERANCE, f"{field}: max |diff| {diff:.2e}"
    if getattr(case.reference, "loss", None) is not None:
        assert max_diff(output.loss, case.reference.loss) <= TOLERANCE


def test_every_model_type_has_a_tiny_reference():
    assert {model_type for model_type, _ in PAIRS} <= set(TINY_CONFIGS)


def test_parity_eager_safetensors(case, loaded):
    _assert_parity(case, loaded(**case.inputs, **case.labels))


def test_parity_jit_over_split_state(case, loaded):
    # (jax.jit over the module itself is exercised by the mesh test below)
    graphdef, state = nnx.split(loaded)
    forward = jax.jit(lambda state, batch: nnx.merge(graphdef, state)(**batch))
    _assert_parity(case, forward(state, {**case.inputs, **case.labels}))


def test_parity_pytorch_bin(case):
    model = case.auto_class.from_pretrained(case.bin_dir)
    _assert_parity(case, model(**case.inputs, **case.labels))


def test_hidden_states_and_attentions(case, loaded):
    from references import run_torch

    flags = {"output_hidden_states": True, "output_attentions": True}
    reference = run_torch(case.torch_model, case.inputs, **flags)
    output = loaded(**case.inputs, **flags)
    assert len(output.hidden_states) == len(reference.hidden_states)
    assert len(output.attentions) == len(reference.attentions)
    for field in ("hidden_states", "attentions"):
        for ours, theirs in zip(getattr(output, field), getattr(reference, field), strict=True):
            assert case.diff(field, ours, theirs) <= TOLERANCE, field


def test_round_trip_into_transformers_is_bit_exact(case, loaded, tmp_path):
    loaded.save_pretrained(tmp_path)
    torch_class = type(case.torch_model)
    reloaded, info = torch_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    original = case.torch_model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_abstract_construction_matches_loaded_shapes(case, loaded):
    config = tiny_config(case.model_type, case.task)
    abstract = modeling.build_abstract(config, case.task, modeling._precision(None, None))
    abstract_state = nnx.state(abstract, nnx.Param)
    loaded_state = nnx.state(loaded, nnx.Param)
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), abstract_state)
    assert shapes == jax.tree.map(lambda x: (x.shape, x.dtype), loaded_state)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract_state))


def test_from_config_runs_and_is_seeded(case):
    config = tiny_config(case.model_type, case.task)
    first = case.auto_class.from_config(config, seed=3)
    again = case.auto_class.from_config(config, seed=3)
    other = case.auto_class.from_config(config, seed=4)
    field = case.fields[0]
    out = np.asarray(getattr(first(**case.inputs), field))
    assert np.isfinite(out).all()
    assert np.array_equal(out, np.asarray(getattr(again(**case.inputs), field)))
    assert not np.array_equal(out, np.asarray(getattr(other(**case.inputs), field)))


def test_sharded_on_fsdp_mesh_matches_single_device(case, loaded):
    assert jax.device_count() == 8, "tests/conftest.py asks XLA for 8 CPU devices"
    mesh = flaxauto.make_mesh(data=2, fsdp=4)
    sharded = case.auto_class.from_pretrained(case.safetensors_dir, mesh=mesh, rules="fsdp")
    kernels = [v for _, v in nnx.iter_graph(sharded) if isinstance(v, nnx.Param)]
    assert any(not v.get_value().sharding.is_fully_replicated for v in kernels)
    batch = flaxauto.shard_batch({**case.inputs, **case.labels}, mesh)
    output = jax.jit(lambda model, batch: model(**batch))(sharded, batch)
    expected = loaded(**case.inputs, **case.labels)
    for field in case.fields:
        assert max_diff(getattr(output, field), getattr(expected, field)) <= 1e-5


def test_parity_with_scan_layers_and_remat(case, loaded, tmp_path):
    scanned = case.auto_class.from_pretrained(case.safetensors_dir, scan_layers=True, remat=True)
    forward = jax.jit(lambda model, batch: model(**batch))
    _assert_parity(case, forward(scanned, {**case.inputs, **case.labels}))
    scanned.save_pretrained(tmp_path)  # stacked layers unstack into transformers' names
    reloaded = type(case.torch_model).from_pretrained(tmp_path)
    original = case.torch_model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
