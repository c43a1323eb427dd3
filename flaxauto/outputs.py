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
