"""What every task head shares: how it is built, how it sees its inputs, how it pools.

A head is generic: it knows nothing of a family. The family's register() call chooses a head for a
task, passes its options, and names the head's parameters as transformers names them (e.g. the
head's `out` is BERT's `classifier`, RoBERTa's `classifier.out_proj`).
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from flaxauto import layers
from flaxauto.outputs import BaseModelOutput


class Head(nnx.Module):
    #: keyword inputs the head consumes (the rest go to the backbone)
    label_names: ClassVar[tuple[str, ...]] = ("labels",)
    #: head-local parameter names transformers ties or never saves; they are ignored on load
    tied_names: tuple[str, ...] = ()

    def prepare_inputs(self, inputs: dict) -> dict:
        """Reshape the model's inputs for the backbone (multiple choice flattens choices)."""
        return inputs

    def __call__(self, features: BaseModelOutput, *, backbone, inputs: dict, **labels):
        raise NotImplementedError


def classifier_dropout_rate(config) -> float:
    rate = getattr(config, "classifier_dropout", None)
    return config.hidden_dropout_prob if rate is None else rate


def pool(features: BaseModelOutput, pooling: str, attention_mask=None) -> jax.Array:
    """One vector per sequence [B, E] from the backbone output."""
    if pooling == "pooler":
        return features.pooler_output
    if pooling == "first":
        return features.last_hidden_state[:, 0]
    if pooling == "mean":
        hidden = features.last_hidden_state
        if attention_mask is None:
            return jnp.mean(hidden, axis=1)
        mask = jnp.asarray(attention_mask, hidden.dtype)[..., None]
        return jnp.sum(hidden * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)
    raise NotImplementedError(f"pooling={pooling!r} is not implemented")


class PooledProjection(nnx.Module):
    """Pool, optionally dense + activation, dropout, then the output projection `out`.

    BERT: pooler -> dropout -> out. RoBERTa: first token -> dropout -> dense -> tanh -> dropout
    -> out. DistilBERT: first token -> dense -> relu -> dropout -> out.
    """

    def __init__(
        self,
        config,
        num_outputs: int,
        precision: layers.Precision,
        rngs: nnx.Rngs,
        *,
        pooling: str = "pooler",
        dense_activation: str | None = None,
        dropout_before_dense: bool = False,
        dropout_rate: float | None = None,
    ):
        hidden = config.hidden_size
        self.pooling = pooling
        rate = classifier_dropout_rate(config) if dropout_rate is None else dropout_rate
        self.dropout = layers.dropout(rate, rngs)
        self.dropout_before_dense = dropout_before_dense
        if dense_activation is None:
            self.dense = nnx.data(None)
        else:
            self.dense = layers.linear(hidden, hidden, ("embed", "mlp"), precision, rngs)
            self.dense_activation = layers.activation(dense_activation, "classifier activation")
        self.out = layers.linear(hidden, num_outputs, ("embed", None), precision, rngs)

    def __call__(self, features: BaseModelOutput, attention_mask=None) -> jax.Array:
        x = pool(features, self.pooling, attention_mask)
        if self.dense is not None:
            if self.dropout_before_dense:
                x = self.dropout(x)
            x = self.dense_activation(self.dense(x))
        return self.out(self.dropout(x))
