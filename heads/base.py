"""What every task head shares: how it is built, how it sees its inputs, how it pools.

A head is generic: it knows nothing of a family. The family's register() call chooses a head for a
task, passes its options, and names the head's parameters as transformers names them (e.g. the
head's `out` is BERT's `classifier`, RoBERTa's `classifier.out_proj`).
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxauto import layers
from flaxauto.outputs import BaseModelOutput


class Head(nnx.Module):
    #: the label keywords the head takes (never passed to the backbone)
    label_names: ClassVar[tuple[str, ...]] = ("labels",)
    #: further keywords the head reads that the backbone does not take (in `inputs`)
    input_names: ClassVar[tuple[str, ...]] = ()
    #: head-local parameter names transformers ties or never saves; they are ignored on load
    tied_names: tuple[str, ...] = ()

    def prepare_inputs(self, inputs: dict, labels: dict) -> dict:
        """The backbone's inputs from the model's (multiple choice flattens the choices; a
        seq2seq head builds decoder_input_ids from the labels). `labels` holds the label
        keywords given, by name."""
        return inputs

    def backbone_flags(self) -> dict[str, bool]:
        """Backbone flags this head needs whatever the caller asked, e.g.
        {"output_hidden_states": True} for a weighted sum over the layers."""
        return {}

    def __call__(self, features: BaseModelOutput, *, backbone, inputs: dict, **labels):
        raise NotImplementedError


def classifier_dropout_rate(config) -> float:
    # encoders fall back to hidden_dropout_prob; decoder heads (GPT-2, the Llama family) to
    # hidden_dropout, then 0.1
    for attribute in ("classifier_dropout", "hidden_dropout_prob", "hidden_dropout"):
        rate = getattr(config, attribute, None)
        if rate is not None:
            return rate
    return 0.1


def pool(
    features: BaseModelOutput,
    pooling: str,
    attention_mask=None,
    input_ids=None,
    pad_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> jax.Array:
    """One vector per sequence [B, E] from the backbone output."""
    if pooling == "last_token":
        return _last_non_padding(features.last_hidden_state, input_ids, pad_token_id)
    if pooling == "last_eos":
        return _last_eos(features.last_hidden_state, input_ids, eos_token_id)
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


def _last_non_padding(hidden, input_ids, pad_token_id) -> jax.Array:
    """transformers' decoder classifiers: the last position whose token is not pad_token_id (read
    from input_ids, not the attention mask, so left and right padding both work). Without a
    pad_token_id the last position, and then only for a batch of one; with inputs_embeds (no
    ids) the last position."""
    batch, length = hidden.shape[:2]
    if pad_token_id is None:
        if batch != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
        return hidden[:, -1]
    if input_ids is None:
        return hidden[:, -1]
    not_pad = (jnp.asarray(input_ids) != pad_token_id).astype(jnp.int32)  # [B, T]
    last = jnp.argmax(jnp.arange(length, dtype=jnp.int32)[None, :] * not_pad, axis=-1)  # [B]
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


def _last_eos(hidden, input_ids, eos_token_id) -> jax.Array:
    """BART's classifiers: each row's last eos token (read from input_ids). transformers refuses
    rows with different numbers of eos tokens, or none; so does this, where input_ids are
    concrete (under jit they are not, and each row's last eos is pooled, its last position if
    it has none)."""
    if input_ids is None:
        raise NotImplementedError(
            "Passing input embeddings is currently not supported for eos-pooled sequence "
            "classification (BartForSequenceClassification)"
        )
    is_eos = jnp.asarray(input_ids) == eos_token_id  # [B, T]
    if not isinstance(is_eos, jax.core.Tracer):
        counts = np.asarray(is_eos).sum(axis=1)
        if len(np.unique(counts)) > 1:
            raise ValueError("All examples must have the same number of <eos> tokens.")
        if counts.min() < 1:
            raise ValueError("Each example must contain at least one <eos> token.")
    length = is_eos.shape[1]
    positions = jnp.arange(length, dtype=jnp.int32)[None, :]
    last = jnp.max(jnp.where(is_eos, positions, -1), axis=-1) % length  # [B]
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


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
        use_bias: bool = True,
    ):
        hidden = config.hidden_size
        self.pooling = pooling
        self.pad_token_id = config.pad_token_id if pooling == "last_token" else None
        self.eos_token_id = config.eos_token_id if pooling == "last_eos" else None
        rate = classifier_dropout_rate(config) if dropout_rate is None else dropout_rate
        self.dropout = layers.dropout(rate, rngs)
        self.dropout_before_dense = dropout_before_dense
        if dense_activation is None:
            self.dense = nnx.data(None)
        else:
            self.dense = layers.linear(hidden, hidden, ("embed", "mlp"), precision, rngs)
            self.dense_activation = layers.activation(dense_activation, "classifier activation")
        self.out = layers.linear(
            hidden, num_outputs, ("embed", None), precision, rngs, use_bias=use_bias
        )

    def __call__(self, features: BaseModelOutput, attention_mask=None, input_ids=None):
        x = pool(
            features, self.pooling, attention_mask, input_ids, self.pad_token_id,
            self.eos_token_id,
        )  # fmt: skip
        if self.dense is not None:
            if self.dropout_before_dense:
                x = self.dropout(x)
            x = self.dense_activation(self.dense(x))
        return self.out(self.dropout(x))
