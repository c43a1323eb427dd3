"""Model outputs: pytree dataclasses with transformers' field names.

Every field defaults to None, as in transformers, so a jitted function can return any of them and
absent fields cost nothing. `out["logits"]` works as well as `out.logits`.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import struct

Array = jax.Array


class _Output:
    def __getitem__(self, name: str):
        return getattr(self, name)

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]


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
