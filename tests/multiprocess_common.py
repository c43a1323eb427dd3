"""The batch and the training step tests/test_multiprocess.py runs in one process and in two."""

from __future__ import annotations

import numpy as np

BATCH, LENGTH = 8, 9
LEARNING_RATE = 0.1


def batch_for(config) -> dict[str, np.ndarray]:
    """One global batch, the same in every process (seeded)."""
    rng = np.random.default_rng(5)
    ids = rng.integers(2, config.vocab_size, size=(BATCH, LENGTH))
    mask = np.ones((BATCH, LENGTH), np.int64)
    mask[1::2, 6:] = 0
    labels = rng.integers(0, config.num_labels, size=BATCH)
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


def train_step(model, batch):
    """One jitted SGD step on the loss (eval mode: no dropout); returns (loss, new params)."""
    import jax
    import optax
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = optax.sgd(LEARNING_RATE)

    def step(params, rest, batch):
        loss, grads = jax.value_and_grad(
            lambda p: nnx.merge(graphdef, p, rest, copy=True)(**batch).loss
        )(params)
        updates, _ = optimizer.update(grads, optimizer.init(params), params)
        return loss, optax.apply_updates(params, updates)

    return jax.jit(step)(params, rest, batch)
