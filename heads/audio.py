"""Speech heads: utterance classification (keyword spotting, speaker id, emotion) and CTC speech
recognition, over any backbone that turns audio into frames.

A backbone whose frames come from a strided feature encoder (wav2vec2, HuBERT) offers
`frame_mask(attention_mask [B, samples], num_frames) -> [B, T] bool` and
`frame_lengths(sample_lengths [B]) -> [B]`, the valid frames of each row as transformers computes
them; the heads pool and score over those frames only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flaxauto import layers, outputs
from flaxauto.heads import losses
from flaxauto.heads.base import Head


def _extras(features) -> dict:
    return {"hidden_states": features.hidden_states, "attentions": features.attentions}


class AudioClassificationHead(Head):
    """Frames -> (weighted sum over the layers) -> projector -> mean over valid frames ->
    classifier: transformers' Wav2Vec2ForSequenceClassification, HubertForSequenceClassification
    and WhisperForAudioClassification. The loss is plain cross-entropy over config.num_labels
    (these classes read no problem_type).

    mask_frames: pool over the frames the attention mask leaves (wav2vec2, HuBERT); Whisper
    averages every frame of its fixed 30 s window."""

    def __init__(self, config, precision, rngs, *, mask_frames: bool = True):
        hidden = config.hidden_size
        self.mask_frames = mask_frames
        self.use_weighted_layer_sum = bool(config.use_weighted_layer_sum)
        if self.use_weighted_layer_sum:
            # transformers starts at 1/L each; a constant gives the same softmax, the same sum
            num_layers = config.num_hidden_layers + 1  # the layers' input, then every layer
            self.layer_weights = layers.parameter((num_layers,), (None,), precision, init="ones")
        self.projector = layers.linear(
            hidden, config.classifier_proj_size, ("embed", "mlp"), precision, rngs
        )
        self.classifier = layers.linear(
            config.classifier_proj_size, config.num_labels, ("mlp", None), precision, rngs
        )

    def backbone_flags(self) -> dict[str, bool]:
        return {"output_hidden_states": True} if self.use_weighted_layer_sum else {}

    def __call__(self, features, *, backbone, inputs, labels=None):
        if self.use_weighted_layer_sum:
            stacked = jnp.stack(features.hidden_states, axis=0)  # [L, B, T, E]
            weights = jax.nn.softmax(self.layer_weights[...].astype(jnp.float32))
            hidden = jnp.einsum("lbte,l->bte", stacked, weights.astype(stacked.dtype))
        else:
            hidden = features.last_hidden_state  # [B, T, E]
        projected = self.projector(hidden)  # [B, T, P]
        mask = inputs.get("attention_mask") if self.mask_frames else None
        if mask is None:
            pooled = jnp.mean(projected, axis=1)
        else:
            valid = backbone.frame_mask(mask, projected.shape[1])  # [B, T]
            valid = valid.astype(projected.dtype)[..., None]
            pooled = jnp.sum(projected * valid, axis=1) / jnp.sum(valid, axis=1)
        logits = self.classifier(pooled)  # [B, num_labels]
        loss = None
        if labels is not None:
            loss = losses.cross_entropy(logits, jnp.reshape(labels, -1))
        return outputs.SequenceClassifierOutput(logits=logits, loss=loss, **_extras(features))


class CTCHead(Head):
    """Per-frame vocabulary logits (dropout config.final_dropout, then `lm_head`) and the CTC loss
    as transformers computes it: the pad token is the blank, labels -100 (and blank) are left out,
    each row's frames are those its attention mask leaves, config.ctc_loss_reduction and
    config.ctc_zero_infinity."""

    def __init__(self, config, precision, rngs):
        if config.vocab_size is None:
            raise ValueError("a CTC head needs config.vocab_size (the tokenizer's vocabulary)")
        self.vocab_size = config.vocab_size
        self.blank_id = config.pad_token_id
        self.reduction = config.ctc_loss_reduction
        self.zero_infinity = bool(config.ctc_zero_infinity)
        if self.reduction not in losses.CTC_REDUCTIONS:
            raise NotImplementedError(
                f"ctc_loss_reduction={self.reduction!r} is not implemented; "
                f"supported: {losses.CTC_REDUCTIONS}"
            )
        self.dropout = layers.dropout(config.final_dropout, rngs)
        self.lm_head = layers.linear(
            config.hidden_size, config.vocab_size, ("embed", "vocab"), precision, rngs
        )

    def __call__(self, features, *, backbone, inputs, labels=None):
        logits = self.lm_head(self.dropout(features.last_hidden_state))  # [B, T, V]
        loss = None
        if labels is not None:
            self._check_labels(labels)
            mask = inputs.get("attention_mask")
            if mask is None:
                samples = inputs["input_values"].shape[-1]
                sample_lengths = jnp.full((logits.shape[0],), samples, jnp.int32)
            else:
                sample_lengths = jnp.sum(jnp.asarray(mask, jnp.int32), axis=-1)
            loss = losses.ctc_loss(
                logits,
                backbone.frame_lengths(sample_lengths),
                labels,
                blank_id=self.blank_id,
                reduction=self.reduction,
                zero_infinity=self.zero_infinity,
            )
        return outputs.CausalLMOutput(logits=logits, loss=loss, **_extras(features))

    def _check_labels(self, labels) -> None:
        try:
            largest = int(np.max(np.asarray(labels)))
        except jax.errors.TracerArrayConversionError:  # under jit the values are not known yet
            return
        if largest >= self.vocab_size:
            raise ValueError(f"Label values must be <= vocab_size: {self.vocab_size}")


__all__ = ["AudioClassificationHead", "CTCHead"]
