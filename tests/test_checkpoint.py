"""Training-state checkpoints (flaxauto.TrainingCheckpointer, orbax): model, optimizer state and
step saved asynchronously from a sharded run and restored onto another mesh shape with identical
values, both for an nnx.Optimizer and for a plain optax state."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import flaxauto
from references import task_inputs, task_labels, torch_model


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    torch_model("llama", "causal-lm").save_pretrained(directory)
    return directory


def _batch(model):
    inputs = task_inputs("llama", "causal-lm", config=model.config, batch=8)
    return {**inputs, **task_labels(model, "causal-lm", inputs)}


def _arrays(tree):
    return [np.asarray(jax.device_get(x)) for x in jax.tree.leaves(tree)]


def _assert_same(a, b):
    left, right = _arrays(a), _arrays(b)
    assert len(left) == len(right) > 0
    for x, y in zip(left, right, strict=True):
        np.testing.assert_array_equal(x, y)


def _train(model, optimizer, batch, steps):
    @nnx.jit
    def step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(lambda m: m(**batch).loss)(model)
        optimizer.update(model, grads)
        return loss

    for _ in range(steps):
        step(model, optimizer, batch)


def test_nnx_optimizer_restores_onto_another_mesh(checkpoint_dir, tmp_path):
    saved_mesh = flaxauto.make_mesh(data=2, fsdp=4)
    model = flaxauto.AutoModelForCausalLM.from_pretrained(checkpoint_dir, mesh=saved_mesh)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    _train(model, optimizer, flaxauto.shard_batch(_batch(model), saved_mesh), steps=2)
    with flaxauto.TrainingCheckpointer(tmp_path / "ckpt") as checkpoints:
        assert checkpoints.save(2, model, optimizer)  # asynchronous: returns before writing
        checkpoints.wait()
        assert checkpoints.latest_step() == 2

    new_mesh = flaxauto.make_mesh(data=1, fsdp=2, tensor=4)
    restored = flaxauto.AutoModelForCausalLM.from_pretrained(
        checkpoint_dir, mesh=new_mesh, rules="fsdp+tensor"
    )
    new_optimizer = nnx.Optimizer(restored, optax.adamw(1e-2), wrt=nnx.Param)
    with flaxauto.TrainingCheckpointer(tmp_path / "ckpt") as checkpoints:
        assert checkpoints.restore(restored, new_optimizer) == 2
    _assert_same(nnx.state(model, nnx.Param), nnx.state(restored, nnx.Param))
    _assert_same(nnx.state(optimizer, nnx.OptState), nnx.state(new_optimizer, nnx.OptState))
    assert int(new_optimizer.step[...]) == 2
    # the restored arrays live in the new mesh's shards
    kernel = restored.backbone.layers[0].self_attn.q_proj.kernel.get_value()
    assert kernel.sharding.mesh.shape == new_mesh.shape
    assert not kernel.sharding.is_fully_replicated
    # and training continues identically from either
    batch = _batch(model)
    _train(model, optimizer, flaxauto.shard_batch(batch, saved_mesh), steps=1)
    _train(restored, new_optimizer, flaxauto.shard_batch(batch, new_mesh), steps=1)
    for x, y in zip(
        _arrays(nnx.state(model, nnx.Param)), _arrays(nnx.state(restored, nnx.Param)), strict=True
    ):
        # adam divides each gradient by its own running size, so a reduction-order change in
        # a near-zero gradient moves that parameter's step by a share of the learning rate
        np.testing.assert_allclose(x, y, atol=5e-5)


def test_optax_state_restores_onto_one_device(checkpoint_dir, tmp_path):
    mesh = flaxauto.make_mesh(data=1, fsdp=8)
    model = flaxauto.AutoModelForCausalLM.from_pretrained(checkpoint_dir, mesh=mesh)
    tx = optax.adam(1e-3)
    params = nnx.state(model, nnx.Param)
    grads = jax.tree.map(lambda p: 0.01 * jax.numpy.ones_like(p), params)
    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    nnx.update(model, optax.apply_updates(params, updates))
    checkpoints = flaxauto.TrainingCheckpointer(tmp_path / "ckpt", max_to_keep=1)
    checkpoints.save(7, model, opt_state)
    checkpoints.wait()

    single = flaxauto.AutoModelForCausalLM.from_pretrained(checkpoint_dir)
    template = tx.init(nnx.state(single, nnx.Param))
    step, restored_state = checkpoints.restore_with_state(single, template)
    checkpoints.close()
    assert step == 7
    _assert_same(nnx.state(model, nnx.Param), nnx.state(single, nnx.Param))
    _assert_same(opt_state, restored_state)
    assert jax.tree.structure(restored_state) == jax.tree.structure(opt_state)
    with pytest.raises(TypeError, match="restore_with_state"):
        flaxauto.TrainingCheckpointer(tmp_path / "ckpt").restore(single, template)
