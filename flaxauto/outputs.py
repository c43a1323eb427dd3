"""Model outputs: pytree dataclasses with transformers' field names.

Every field defaults to None, as in transformers, so a jitted function can return any of them and
absent fields cost nothing. As transformers' ModelOutput: `out["logits"]` works as well as
`out.logits`, `out[0]` is the first field that is set and `out.to_tuple()` all of them, in
transformers' order (loss first, the per-layer hidden states and attentions last), and
`out.past_key_values` is the KV cache (`out.cache`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from flax import struct

Array = jax.Array


class _Output:
    def __getitem__(self, key: str | int | slice):
        if isinstance(key, str):
            return getattr(self, "cache" if key == "past_key_values" else key)
        return self.to_tuple()[key]

    def keys(self) -> list[str]:
        return [name for name in tuple_order(type(self)) if getattr(self, name) is not None]

    def to_tuple(self) -> tuple:
        """The fields that are set, in transformers' order (what `out[i]` indexes)."""
        return tuple(getattr(self, name) for name in self.keys())

    @property
    def past_key_values(self):
        """transformers' name for the KV cache: `cache` here."""
        if not any(f.name == "cache" for f in dataclasses.fields(self)):
            raise AttributeError(f"{type(self).__name__} carries no cache")
        return self.cache


def _per_layer(name: str) -> bool:
    return name.endswith(("hidden_states", "attentions")) and not name.endswith("last_hidden_state")


@functools.cache
def tuple_order(cls) -> tuple[str, ...]:
    """transformers' field order: `loss` first, then the fields in their declared order, the
    per-layer ones (hidden_states, attentions, cross_attentions, ...) last. A class whose
    transformers twin orders otherwise names its order in `_tuple_order` (a tuple of names)."""
    names = [field.name for field in dataclasses.fields(cls)]
    explicit = getattr(cls, "_tuple_order", None)
    if explicit is not None:
        return tuple(explicit) + tuple(n for n in names if n not in explicit)
    return tuple(
        sorted(names, key=lambda n: (n != "loss", _per_layer(n)))  # sorted is stable
    )


@struct.dataclass
class BaseModelOutput(_Output):
    last_hidden_state: Array = None  # [B, T, E]
    pooler_output: Array | None = None  # [B, E], for families with a pooler
    hidden_states: tuple[Array, ...] | None = None  # embeddings + every layer, each [B, T, E]
    attentions: tuple[Array, ...] | None = None  # every layer, each [B, H, T, S]


@struct.dataclass
class _TaskOutput(_Output):
    loss: Array | None = None
    hidden_states: tuple[Array, ...] | None = None
    attentions: tuple[Array, ...] | None = None


@struct.dataclass
class SequenceClassifierOutput(_TaskOutput):
    logits: Array = None  # [B, num_labels]


@struct.dataclass
class TokenClassifierOutput(_TaskOutput):
    logits: Array = None  # [B, T, num_labels]


@struct.dataclass
class MaskedLMOutput(_TaskOutput):
    logits: Array = None  # [B, T, V]


@struct.dataclass
class MultipleChoiceModelOutput(_TaskOutput):
    logits: Array = None  # [B, C]


@struct.dataclass
class NextSentencePredictorOutput(_TaskOutput):
    logits: Array = None  # [B, 2]


@struct.dataclass
class ImageClassifierOutput(_TaskOutput):
    logits: Array = None  # [B, num_labels]


@struct.dataclass
class DistilledImageClassifierOutput(_TaskOutput):
    """DeiT with its distillation head: logits is the mean of the two heads' logits."""

    logits: Array = None  # [B, num_labels]
    cls_logits: Array = None  # [B, num_labels], from the [CLS] token
    distillation_logits: Array = None  # [B, num_labels], from the distillation token


@struct.dataclass
class QuestionAnsweringModelOutput(_TaskOutput):
    start_logits: Array = None  # [B, T]
    end_logits: Array = None  # [B, T]


@struct.dataclass
class BaseModelOutputWithPast(BaseModelOutput):
    cache: object = None  # flaxauto.decoder.KVCache, when the forward was given one


@struct.dataclass
class CausalLMOutputWithPast(_TaskOutput):
    logits: Array = None  # [B, T, V]
    cache: object = None  # flaxauto.decoder.KVCache, when the forward was given one


@struct.dataclass
class TableQuestionAnsweringOutput(_TaskOutput):
    logits: Array = None  # [B, T], cell selection per token
    logits_aggregation: Array | None = None  # [B, num_aggregation_labels], when the head has one


@struct.dataclass
class Wav2Vec2BaseModelOutput(BaseModelOutput):
    extract_features: Array | None = None  # [B, T, C]: the feature encoder's output, normalised


@struct.dataclass
class CausalLMOutput(_TaskOutput):
    logits: Array = None  # [B, T, V]: per-frame CTC logits for speech recognition


@struct.dataclass
class BaseModelOutputWithPastAndCrossAttentions(BaseModelOutputWithPast):
    """A decoder with cross attention (an encoder-decoder's `decode`)."""

    cross_attentions: tuple[Array, ...] | None = None  # every layer, each [B, H, T, S_enc]


@struct.dataclass
class _Seq2SeqFields(_Output):
    """What an encoder-decoder returns besides its task fields, by transformers' names."""

    cache: object = None  # flaxauto.decoder.EncoderDecoderCache, when the forward was given one
    decoder_hidden_states: tuple[Array, ...] | None = None  # each [B, T_dec, E]
    decoder_attentions: tuple[Array, ...] | None = None  # each [B, H, T_dec, T_dec]
    cross_attentions: tuple[Array, ...] | None = None  # each [B, H, T_dec, S_enc]
    encoder_last_hidden_state: Array | None = None  # [B, S_enc, E]
    encoder_hidden_states: tuple[Array, ...] | None = None  # each [B, S_enc, E]
    encoder_attentions: tuple[Array, ...] | None = None  # each [B, H, S_enc, S_enc]

    @property
    def past_key_values(self):
        """transformers' name for the cache."""
        return self.cache


@struct.dataclass
class Seq2SeqModelOutput(_Seq2SeqFields):
    last_hidden_state: Array = None  # [B, T_dec, E]: the decoder's

    @classmethod
    def of(cls, encoded: BaseModelOutput, decoded) -> Seq2SeqModelOutput:
        """An encoder-decoder backbone's output from its encoder's and decoder's."""
        return cls(
            last_hidden_state=decoded.last_hidden_state,
            cache=decoded.cache,
            decoder_hidden_states=decoded.hidden_states,
            decoder_attentions=decoded.attentions,
            cross_attentions=decoded.cross_attentions,
            encoder_last_hidden_state=encoded.last_hidden_state,
            encoder_hidden_states=encoded.hidden_states,
            encoder_attentions=encoded.attentions,
        )


@struct.dataclass
class DetrModelOutput(Seq2SeqModelOutput):
    """DETR's backbone output: the decoder's object queries and the encoder's feature tokens."""

    intermediate_hidden_states: Array | None = None  # [L_dec, B, Q, E], with auxiliary_loss


@struct.dataclass
class DetrObjectDetectionOutput(_Output):
    """transformers' DetrObjectDetectionOutput (its field order)."""

    loss: Array | None = None
    loss_dict: dict | None = None  # loss_ce, loss_bbox, loss_giou, cardinality_error (+ _i)
    logits: Array = None  # [B, Q, num_labels + 1], the last class "no object"
    pred_boxes: Array = None  # [B, Q, 4] normalised (center x, center y, width, height)
    auxiliary_outputs: list | None = None  # [{"logits", "pred_boxes"}] per earlier decoder layer
    last_hidden_state: Array | None = None  # [B, Q, E]
    decoder_hidden_states: tuple[Array, ...] | None = None
    decoder_attentions: tuple[Array, ...] | None = None
    cross_attentions: tuple[Array, ...] | None = None
    encoder_last_hidden_state: Array | None = None  # [B, h * w, E]
    encoder_hidden_states: tuple[Array, ...] | None = None
    encoder_attentions: tuple[Array, ...] | None = None
    _tuple_order = (
        "loss", "loss_dict", "logits", "pred_boxes", "auxiliary_outputs", "last_hidden_state",
        "decoder_hidden_states", "decoder_attentions", "cross_attentions",
        "encoder_last_hidden_state", "encoder_hidden_states", "encoder_attentions",
    )  # fmt: skip


@struct.dataclass
class Seq2SeqLMOutput(_Seq2SeqFields):
    loss: Array | None = None
    logits: Array = None  # [B, T_dec, V]


@struct.dataclass
class Seq2SeqSequenceClassifierOutput(_Seq2SeqFields):
    loss: Array | None = None
    logits: Array = None  # [B, num_labels]


@struct.dataclass
class Seq2SeqQuestionAnsweringModelOutput(_Seq2SeqFields):
    loss: Array | None = None
    start_logits: Array = None  # [B, T_dec]
    end_logits: Array = None  # [B, T_dec]


@struct.dataclass
class ObjectDetectionOutput(_Output):
    """transformers' YolosObjectDetectionOutput and DetrObjectDetectionOutput in one (a family
    sets the fields its twin has; the others stay None and drop out of to_tuple)."""

    loss: Array | None = None
    loss_dict: dict[str, Array] | None = None  # loss_ce, loss_bbox, loss_giou, cardinality_error
    logits: Array = None  # [B, Q, num_labels + 1], the last class "no object"
    pred_boxes: Array = None  # [B, Q, 4] normalised (center x, center y, width, height)
    auxiliary_outputs: list[dict[str, Array]] | None = None  # {"logits", "pred_boxes"} per layer
    last_hidden_state: Array | None = None
    decoder_hidden_states: tuple[Array, ...] | None = None
    decoder_attentions: tuple[Array, ...] | None = None
    cross_attentions: tuple[Array, ...] | None = None
    encoder_last_hidden_state: Array | None = None
    encoder_hidden_states: tuple[Array, ...] | None = None
    encoder_attentions: tuple[Array, ...] | None = None
    hidden_states: tuple[Array, ...] | None = None
    attentions: tuple[Array, ...] | None = None
    _tuple_order = (
        "loss", "loss_dict", "logits", "pred_boxes", "auxiliary_outputs", "last_hidden_state",
        "decoder_hidden_states", "decoder_attentions", "cross_attentions",
        "encoder_last_hidden_state", "encoder_hidden_states", "encoder_attentions",
        "hidden_states", "attentions",
    )  # fmt: skip
