"""Classification heads: sequence, token, multiple choice, next sentence, and span (QA)."""

from __future__ import annotations

import jax.numpy as jnp

from flaxauto import layers, outputs
from flaxauto.heads import losses
from flaxauto.heads.base import Head, PooledProjection, classifier_dropout_rate


def _extras(features) -> dict:
    return {"hidden_states": features.hidden_states, "attentions": features.attentions}


class SequenceClassificationHead(Head):
    """Pooled features -> config.num_labels logits; loss by config.problem_type."""

    def __init__(self, config, precision, rngs, **projection_options):
        self.problem_type = config.problem_type
        self.classifier = PooledProjection(
            config, config.num_labels, precision, rngs, **projection_options
        )

    def __call__(self, features, *, backbone, inputs, labels=None):
        mask, ids = inputs.get("attention_mask"), inputs.get("input_ids")
        logits = self.classifier(features, mask, ids)  # [B, num_labels]
        loss = None
        if labels is not None:
            loss = losses.sequence_classification_loss(logits, labels, self.problem_type)
        return outputs.SequenceClassifierOutput(logits=logits, loss=loss, **_extras(features))


class NextSentencePredictionHead(Head):
    """Pooled features -> 2 logits (is-next, is-random); no dropout, as in BERT."""

    def __init__(self, config, precision, rngs, **projection_options):
        projection_options.setdefault("dropout_rate", 0.0)
        self.classifier = PooledProjection(config, 2, precision, rngs, **projection_options)

    def __call__(self, features, *, backbone, inputs, labels=None):
        logits = self.classifier(features)  # [B, 2]
        loss = None if labels is None else losses.cross_entropy(logits, jnp.reshape(labels, -1))
        return outputs.NextSentencePredictorOutput(logits=logits, loss=loss, **_extras(features))


class MultipleChoiceHead(Head):
    """Inputs [B, C, T] are scored as B*C sequences, one logit each, then regrouped [B, C]."""

    def __init__(self, config, precision, rngs, **projection_options):
        self.classifier = PooledProjection(config, 1, precision, rngs, **projection_options)

    def prepare_inputs(self, inputs, labels):
        return {
            name: None if value is None else _flatten_choices(name, value)
            for name, value in inputs.items()
        }

    def __call__(self, features, *, backbone, inputs, labels=None):
        num_choices = _num_choices(inputs)
        flat_mask = inputs.get("attention_mask")
        if flat_mask is not None:
            flat_mask = _flatten_choices("attention_mask", flat_mask)
        logits = self.classifier(features, flat_mask).reshape(-1, num_choices)  # [B, C]
        loss = None if labels is None else losses.cross_entropy(logits, labels)
        return outputs.MultipleChoiceModelOutput(logits=logits, loss=loss, **_extras(features))


def _flatten_choices(name, value):
    value = jnp.asarray(value)
    keep = 2 if name == "inputs_embeds" else 1  # embeddings keep their feature axis
    return value.reshape(-1, *value.shape[value.ndim - keep :])


def _num_choices(inputs) -> int:
    for name in ("input_ids", "inputs_embeds"):
        if inputs.get(name) is not None:
            return jnp.shape(inputs[name])[1]
    raise ValueError("multiple choice needs input_ids or inputs_embeds of shape [B, C, T]")


class TokenClassificationHead(Head):
    """Per-token features -> config.num_labels logits [B, T, num_labels]."""

    def __init__(self, config, precision, rngs, *, dropout_rate: float | None = None):
        rate = classifier_dropout_rate(config) if dropout_rate is None else dropout_rate
        self.dropout = layers.dropout(rate, rngs)
        self.classifier = layers.linear(
            config.hidden_size, config.num_labels, ("embed", None), precision, rngs
        )

    def __call__(self, features, *, backbone, inputs, labels=None):
        logits = self.classifier(self.dropout(features.last_hidden_state))
        loss = None
        if labels is not None:
            flat_labels = jnp.reshape(labels, -1)
            loss = losses.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat_labels)
        return outputs.TokenClassifierOutput(logits=logits, loss=loss, **_extras(features))


class QuestionAnsweringHead(Head):
    """Per-token start and end logits; positions outside the sequence are ignored in the loss."""

    label_names = ("start_positions", "end_positions")

    def __init__(
        self, config, precision, rngs, *, dropout_rate: float = 0.0, num_outputs: int | None = None
    ):
        """num_outputs: 2 where transformers fixes it (GPT-2, Llama); else config.num_labels."""
        self.dropout = layers.dropout(dropout_rate, rngs)  # BERT: none; DistilBERT: qa_dropout
        self.qa_outputs = layers.linear(
            config.hidden_size, num_outputs or config.num_labels, ("embed", None), precision, rngs
        )

    def __call__(self, features, *, backbone, inputs, start_positions=None, end_positions=None):
        logits = self.qa_outputs(self.dropout(features.last_hidden_state))  # [B, T, 2]
        start_logits, end_logits = logits[..., 0], logits[..., 1]
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = (
                _span_loss(start_logits, start_positions) + _span_loss(end_logits, end_positions)
            ) / 2
        return outputs.QuestionAnsweringModelOutput(
            start_logits=start_logits, end_logits=end_logits, loss=loss, **_extras(features)
        )


def _span_loss(logits, positions):
    # transformers clamps positions to [0, T] and ignores T: answers cut off by truncation.
    seq_len = logits.shape[-1]
    positions = jnp.clip(jnp.reshape(jnp.asarray(positions), -1), 0, seq_len)
    return losses.cross_entropy(logits, positions, ignore_index=seq_len)


__all__ = [
    "MultipleChoiceHead",
    "NextSentencePredictionHead",
    "QuestionAnsweringHead",
    "SequenceClassificationHead",
    "TokenClassificationHead",
]
