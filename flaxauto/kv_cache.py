"""The key/value cache of decoder families, and the causal masks over it.

A cache is preallocated for `max_length` slots, so a decoding loop keeps fixed shapes and compiles
once. Slot s holds the s-th token fed to the model, padding included, exactly as transformers
indexes its cache: causal and sliding-window masks compare slot indices, and a slot is attended
only if its token was marked 1 in the attention mask.

    cache = model.init_cache(batch_size=2, max_length=64)
    out = model(input_ids, attention_mask=mask, position_ids=positions, cache=cache)  # prefill
    out = model(next_ids[:, None], cache=out.cache)                                   # one step

With a cache, `attention_mask` covers only the tokens passed in that call ([B, T]); the cache
remembers the earlier ones. Without position_ids a call continues at position `cache.length`,
as transformers does; a left-padded batch should pass its own (generate does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from flaxauto import layers
from flaxauto.outputs import BaseModelOutputWithPast

Array = jax.Array


@struct.dataclass
class KVCache:
    # Stored heads-first, per layer [B, K, S, D]: the layout attention's dots read (batch and
    # head dimensions leading). Stored [B, S, K, D], XLA on CPU copied every layer's whole cache
    # into that layout on every decoding step (measured: a fifth of a batch-8 GPT-2 step).
    keys: tuple[Array, ...]  # per layer [B, K, S, D]
    values: tuple[Array, ...]  # per layer [B, K, S, D]
    mask: Array  # [B, S] int32: 1 where the slot holds a token to attend to
    length: Array  # [] int32: slots written so far (the same for every row)

    @classmethod
    def create(
        cls, batch: int, max_length: int, num_layers: int, kv_heads: int, head_dim: int, dtype
    ) -> KVCache:
        shape = (batch, kv_heads, max_length, head_dim)
        return cls(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            mask=jnp.zeros((batch, max_length), jnp.int32),
            length=jnp.zeros((), jnp.int32),
        )

    @property
    def max_length(self) -> int:
        return self.mask.shape[1]


def _heads_first(x: Array) -> Array:
    return jnp.swapaxes(x, 1, 2)  # [B, S, K, D] <-> [B, K, S, D]


class DecoderStep:
    """What every layer of one decoder forward shares: where the new tokens go, which slots they
    may attend to (one bias per sliding window size), and the cache being filled."""

    def __init__(self, cache: KVCache | None, attention_mask, batch: int, length: int, windows):
        new_mask = (
            jnp.ones((batch, length), jnp.int32)
            if attention_mask is None
            else jnp.asarray(attention_mask, jnp.int32)
        )
        if new_mask.shape != (batch, length):
            raise ValueError(
                f"attention_mask must be [batch, new tokens] = {(batch, length)}, got "
                f"{new_mask.shape}"
                + (" (with a cache it covers only the new tokens)" if cache is not None else "")
            )
        if cache is not None and _overflows(cache, length):
            raise ValueError(
                f"the cache holds {cache.max_length} tokens: {int(cache.length)} written, "
                f"{length} more do not fit"
            )
        self.cache = cache
        if cache is None:
            self.start = jnp.zeros((), jnp.int32)
            self.slot_mask = new_mask  # [B, S=T]
        else:
            self.start = cache.length
            self.slot_mask = jax.lax.dynamic_update_slice(cache.mask, new_mask, (0, self.start))
        query_slots = self.start + jnp.arange(length, dtype=jnp.int32)  # [T]
        self.biases = {w: _bias(self.slot_mask, query_slots, w) for w in set(windows)}
        self.keys: list[Array] = []
        self.values: list[Array] = []

    def default_position_ids(self, length: int) -> Array:
        """[1, T]: continuing from the cache, as transformers does when given no position_ids."""
        return (self.start + jnp.arange(length, dtype=jnp.int32))[None, :]

    def keys_values(self, layer: int, keys: Array, values: Array) -> tuple[Array, Array]:
        """The new tokens' keys/values [B, T, K, D] -> everything to attend to [B, S, K, D].

        With a cache, what is returned is a transposed view of the heads-first buffer: attention
        transposes it back, and XLA cancels the two transposes, so the buffer is read in place."""
        if self.cache is not None:
            keys = self._write(self.cache.keys[layer], keys)
            values = self._write(self.cache.values[layer], values)
            self.keys.append(keys)
            self.values.append(values)
            return _heads_first(keys), _heads_first(values)
        self.keys.append(keys)
        self.values.append(values)
        return keys, values

    def _write(self, buffer: Array, new: Array) -> Array:
        new = _heads_first(new.astype(buffer.dtype))  # [B, K, T, D]
        return jax.lax.dynamic_update_slice(buffer, new, (0, 0, self.start, 0))

    def new_cache(self, length: int) -> KVCache | None:
        if self.cache is None:
            return None
        return KVCache(
            keys=tuple(self.keys),
            values=tuple(self.values),
            mask=self.slot_mask,
            length=self.start + length,
        )


def _overflows(cache: KVCache, length: int) -> bool:
    """Whether `length` more tokens overflow the cache; checked when the cache length is known
    (under jit an overflowing write would be clamped into the last slots, silently)."""
    if isinstance(cache.length, jax.core.Tracer):
        return False
    return int(cache.length) + length > cache.max_length


def _bias(slot_mask: Array, query_slots: Array, window: int | None) -> Array:
    """[B, 1, T, S] additive bias: 0 where a query may attend a slot, the dtype's min elsewhere
    (as transformers' eager mask; a row with nothing to attend becomes uniform, as there)."""
    key_slots = jnp.arange(slot_mask.shape[1], dtype=jnp.int32)[None, :]  # [1, S]
    allowed = key_slots <= query_slots[:, None]  # [T, S] causal
    if window is not None:
        allowed = allowed & (key_slots > query_slots[:, None] - window)
    allowed = allowed[None, None] & (slot_mask[:, None, None, :] != 0)
    return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)


def run_decoder_layers(layers, hidden, step: DecoderStep, final_norm, flags: dict, **inputs):
    """Run `layer(hidden, step, index, **inputs) -> (hidden, probs)` for every layer, then the
    final norm. Returns (normed last hidden state, hidden_states, attentions) where, as in
    transformers, hidden_states holds each layer's input and then the normed output."""
    all_hidden, all_probs = [], []
    for index, layer in enumerate(layers):
        all_hidden.append(hidden)
        hidden, probs = layer(hidden, step, index, **inputs)
        all_probs.append(probs)
    hidden = final_norm(hidden)
    return (
        hidden,
        (*all_hidden, hidden) if flags.get("output_hidden_states") else None,
        tuple(all_probs) if flags.get("output_attentions") else None,
    )


class DecoderBackbone(nnx.Module):
    """What decoder backbones share: the cache they fill (`cache_shape` = (layers, kv heads,
    head dim), set by the family) and the forward around their layer stack."""

    cache_shape: tuple[int, int, int]
    compute_dtype: jnp.dtype

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        num_layers, kv_heads, head_dim = self.cache_shape
        dtype = dtype or self.compute_dtype
        return KVCache.create(batch_size, max_length, num_layers, kv_heads, head_dim, dtype)

    def begin(self, embed, input_ids, inputs_embeds, attention_mask, position_ids, cache, windows):
        """-> token embeddings [B, T, E], the DecoderStep, position ids [B or 1, T]."""
        layers.exactly_one(input_ids, inputs_embeds)
        if inputs_embeds is None:
            inputs_embeds = embed(input_ids)
        batch, length = inputs_embeds.shape[:2]
        step = DecoderStep(cache, attention_mask, batch, length, windows)
        if position_ids is None:
            position_ids = step.default_position_ids(length)
        return inputs_embeds, step, position_ids

    def finish(self, stack, hidden, step: DecoderStep, final_norm, flags, **inputs):
        """Run the layers and the final norm -> BaseModelOutputWithPast (with the new cache)."""
        length = hidden.shape[1]
        hidden, all_hidden, all_probs = run_decoder_layers(
            stack, hidden, step, final_norm, flags, **inputs
        )
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,
            hidden_states=all_hidden,
            attentions=all_probs,
            cache=step.new_cache(length),
        )
