"""Encoder-decoder classification and span heads over the decoder's output (transformers'
T5/BART ForSequenceClassification and ForQuestionAnswering).

Without decoder inputs these models feed the decoder the encoder's input_ids shifted right
behind decoder_start_token_id, so the decoder's positions line up with the input tokens: the
sequence classifier pools the decoder state at each row's last eos token of input_ids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxauto import layers, outputs
from flaxauto.heads import losses
from flaxauto.heads.base import Head
from flaxauto.heads.classification import _span_loss
from flaxauto.heads.seq2seq import seq2seq_fields, shift_tokens_right


class _DecoderFromInputIds(Head):
    """decoder_input_ids = input_ids shifted right, when the caller gives no decoder inputs."""

    def _init_shift(self, config):
        self.pad_token_id = config.pad_token_id
        self.decoder_start_token_id = config.decoder_start_token_id

    def prepare_inputs(self, inputs: dict, labels: dict) -> dict:
        given = inputs.get("decoder_input_ids") is not None
        if given or inputs.get("decoder_inputs_embeds") is not None:
            return inputs
        if inputs.get("input_ids") is None:
            raise ValueError(
                "If no `decoder_input_ids` or `decoder_inputs_embeds` are passed, `input_ids` "
                "cannot be `None`. Please pass either `input_ids` or `decoder_input_ids` or "
                "`decoder_inputs_embeds`."
            )
        shifted = shift_tokens_right(
            inputs["input_ids"], self.pad_token_id, self.decoder_start_token_id
        )
        return inputs | {"decoder_input_ids": shifted}


class ClassificationProjection(nnx.Module):
    """dropout -> dense -> tanh -> dropout -> out_proj (T5ClassificationHead,
    BartClassificationHead)."""

    def __init__(self, config, num_labels: int, dropout_rate: float, precision, rngs):
        width = config.d_model
        self.dense = layers.linear(width, width, ("embed", "mlp"), precision, rngs)
        self.out_proj = layers.linear(width, num_labels, ("mlp", None), precision, rngs)
        self.dropout = layers.dropout(dropout_rate, rngs)

    def __call__(self, x):
        x = jnp.tanh(self.dense(self.dropout(x)))
        return self.out_proj(self.dropout(x))


def last_eos(hidden, input_ids, eos_token_id: int):
    """hidden [B, T, E] at each row's last eos token of input_ids [B, T] -> [B, E].

    transformers refuses rows with different numbers of eos tokens, or none; checked here when
    input_ids are concrete (under jit a row without eos would pool its first position)."""
    if input_ids is None:
        raise NotImplementedError(
            "Passing input embeddings is currently not supported for encoder-decoder sequence "
            "classification (it pools at the eos tokens of input_ids)"
        )
    is_eos = jnp.asarray(input_ids) == eos_token_id  # [B, T]
    if is_eos.shape != hidden.shape[:2]:
        raise ValueError(
            f"the decoder output {hidden.shape[:2]} does not line up with input_ids "
            f"{is_eos.shape}: pool at eos needs decoder inputs as long as the input"
        )
    if not isinstance(is_eos, jax.core.Tracer):
        counts = np.asarray(is_eos).sum(axis=1)
        if len(np.unique(counts)) != 1:
            raise ValueError("All examples must have the same number of <eos> tokens.")
        if counts[0] < 1:
            raise ValueError("Each example must contain at least one <eos> token.")
    positions = jnp.arange(is_eos.shape[1], dtype=jnp.int32)
    last = jnp.argmax(jnp.where(is_eos, positions[None, :], -1), axis=-1)  # [B]
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


class Seq2SeqSequenceClassificationHead(_DecoderFromInputIds):
    """The decoder's state at the last eos token -> config.num_labels logits [B, num_labels];
    loss by config.problem_type. Parameters: `classification_head.dense` / `.out_proj`."""

    def __init__(self, config, precision, rngs, *, dropout_rate: float = 0.0):
        self._init_shift(config)
        self.problem_type = config.problem_type
        self.eos_token_id = config.eos_token_id
        self.classification_head = ClassificationProjection(
            config, config.num_labels, dropout_rate, precision, rngs
        )

    def __call__(self, features, *, backbone, inputs, labels=None):
        pooled = last_eos(features.last_hidden_state, inputs.get("input_ids"), self.eos_token_id)
        logits = self.classification_head(pooled)  # [B, num_labels]
        loss = None
        if labels is not None:
            loss = losses.sequence_classification_loss(logits, labels, self.problem_type)
        return outputs.Seq2SeqSequenceClassifierOutput(
            loss=loss, logits=logits, **seq2seq_fields(features)
        )


class Seq2SeqQuestionAnsweringHead(_DecoderFromInputIds):
    """Per decoder position start and end logits [B, T_dec] from `qa_outputs` (num_labels
    outputs, start and end the first two, as transformers splits them); positions past the
    decoder's length are ignored in the loss."""

    label_names = ("start_positions", "end_positions")

    def __init__(self, config, precision, rngs):
        self._init_shift(config)
        self.qa_outputs = layers.linear(
            config.d_model, config.num_labels, ("embed", None), precision, rngs
        )

    def __call__(self, features, *, backbone, inputs, start_positions=None, end_positions=None):
        logits = self.qa_outputs(features.last_hidden_state)  # [B, T_dec, 2]
        if logits.shape[-1] != 2:
            raise ValueError(
                f"question answering splits num_labels={logits.shape[-1]} outputs into start "
                "and end logits: it needs num_labels=2"
            )
        start_logits, end_logits = logits[..., 0], logits[..., 1]
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = (
                _span_loss(start_logits, start_positions) + _span_loss(end_logits, end_positions)
            ) / 2
        return outputs.Seq2SeqQuestionAnsweringModelOutput(
            loss=loss, start_logits=start_logits, end_logits=end_logits,
            **seq2seq_fields(features),
        )  # fmt: skip
