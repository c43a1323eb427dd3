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

from flaxauto import layers, stacks
from flaxauto.outputs import BaseModelOutputWithPast

Array = jax.Array


@struct.dataclass
class KVCache:
    """`keys[i]` / `values[i]` are layer i's [B, K, S, D]: a tuple of per-layer arrays, or one
    [L, B, K, S, D] array for a backbone built with scan_layers (which scans over it).

    Stored heads-first, the layout attention's dots read (batch and head dimensions leading):
    stored [B, S, K, D], XLA on CPU copied every layer's whole cache into that layout on every
    decoding step (measured: a fifth of a batch-8 GPT-2 step)."""

    keys: tuple[Array, ...] | Array
    values: tuple[Array, ...] | Array
    mask: Array  # [B, S] int32: 1 where the slot holds a token to attend to
    length: Array  # [] int32: slots written so far (the same for every row)

    @classmethod
    def create(
        cls, batch: int, max_length: int, shape: tuple[int, int, int], dtype, stacked=False
    ) -> KVCache:
        """shape: (layers, kv heads, head dim)."""
        num_layers, kv_heads, head_dim = shape
        layer_shape = (batch, kv_heads, max_length, head_dim)
        if stacked:
            keys, values = (jnp.zeros((num_layers, *layer_shape), dtype) for _ in range(2))
        else:
            keys, values = (
                tuple(jnp.zeros(layer_shape, dtype) for _ in range(num_layers)) for _ in range(2)
            )
        return cls(
            keys=keys,
            values=values,
            mask=jnp.zeros((batch, max_length), jnp.int32),
            length=jnp.zeros((), jnp.int32),
        )

    @property
    def max_length(self) -> int:
        return self.mask.shape[1]

    def reorder(self, rows: Array) -> KVCache:
        """Row i taken from row rows[i] (rows [R], R may differ from B: beams); the batch axis is
        -4 of keys and values, per layer [B, K, S, D] or stacked [L, B, K, S, D]."""
        keys, values = jax.tree.map(lambda x: jnp.take(x, rows, axis=-4), (self.keys, self.values))
        return self.replace(keys=keys, values=values, mask=jnp.take(self.mask, rows, axis=0))


def _heads_first(x: Array) -> Array:
    return jnp.swapaxes(x, 1, 2)  # [B, S, K, D] <-> [B, K, S, D]


class DecoderStep:
    """What the layers of one decoder forward share: where the new tokens go, which slots they
    may attend to (one bias per sliding window size; `windows` has one per layer, or one for
    all), and the cache being filled. Each layer takes its own part through `per_layer` /
    `layer_inputs`, so the same code runs the layers unrolled or scanned over stacked weights
    and caches."""

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
        distinct = sorted(set(windows), key=lambda w: -1 if w is None else w)
        # [W, B, 1, T, S]; with several window sizes, each layer picks its own by index
        self.biases = jnp.stack([_bias(self.slot_mask, query_slots, w) for w in distinct])
        self.window_ids = (
            jnp.asarray([distinct.index(w) for w in windows], jnp.int32)  # [L]
            if len(distinct) > 1
            else None
        )

    def per_layer(self) -> tuple:
        """What differs between layers, each entry indexed by layer: the cache's keys and values
        (when decoding with one) and the window ids (when layers use different windows)."""
        cache = () if self.cache is None else (self.cache.keys, self.cache.values)
        return cache + (() if self.window_ids is None else (self.window_ids,))

    def layer_inputs(self, item: tuple):
        """One layer's entry of `per_layer` -> (its cache (keys, values) or None, its attention
        bias [B, 1, T, S])."""
        layer_cache = item[:2] if self.cache is not None else None
        bias = self.biases[0 if self.window_ids is None else item[-1]]
        return layer_cache, bias

    def default_position_ids(self, length: int) -> Array:
        """[1, T]: continuing from the cache, as transformers does when given no position_ids."""
        return (self.start + jnp.arange(length, dtype=jnp.int32))[None, :]

    def keys_values(self, layer_cache, keys: Array, values: Array):
        """The new tokens' keys/values [B, T, K, D] and this layer's cache (its keys and values
        [B, K, S, D], or None) -> (keys, values to attend to [B, S, K, D], the layer's new cache).

        With a cache, what is attended is a transposed view of the heads-first buffer: attention
        transposes it back, and XLA cancels the two transposes, so the buffer is read in place."""
        if layer_cache is None:
            return keys, values, None
        cached_keys, cached_values = layer_cache
        layer_cache = self._write(cached_keys, keys), self._write(cached_values, values)
        return _heads_first(layer_cache[0]), _heads_first(layer_cache[1]), layer_cache

    def _write(self, buffer: Array, new: Array) -> Array:
        new = _heads_first(new.astype(buffer.dtype))  # [B, K, T, D]
        return jax.lax.dynamic_update_slice(buffer, new, (0, 0, self.start, 0))

    def new_cache(self, keys_values, length: int) -> KVCache | None:
        """The cache after this forward, from every layer's new (keys, values)."""
        if self.cache is None:
            return None
        keys, values = keys_values
        return KVCache(keys=keys, values=values, mask=self.slot_mask, length=self.start + length)


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


class DecoderBackbone(nnx.Module):
    """What decoder backbones share: the cache they fill (`cache_shape` = (layers, kv heads,
    head dim), set by the family), the forward around their layer stack, and scan_layers /
    remat. A layer is `layer(hidden, step, layer_cache, bias, **inputs) -> (hidden, probs, new
    layer cache)`.
    """

    supports_scan_layers = supports_remat = True
    cache_shape: tuple[int, int, int]
    compute_dtype: jnp.dtype
    remat: bool = False

    def layer_stack(self, make_layer, num_layers: int, rngs, scan_layers: bool, remat: bool):
        """The layers (`make_layer(index, rngs)`), remembering how they run."""
        self.remat = remat
        return stacks.layer_stack(make_layer, num_layers, rngs, scan=scan_layers)

    @property
    def scanned(self) -> bool:
        return isinstance(self.stack, stacks.ScannedLayers)

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        dtype = dtype or self.compute_dtype
        return KVCache.create(batch_size, max_length, self.cache_shape, dtype, self.scanned)

    def begin(self, embed, input_ids, inputs_embeds, attention_mask, position_ids, cache, windows):
        """-> token embeddings [B, T, E], the DecoderStep, position ids [B or 1, T]."""
        layers.exactly_one(input_ids, inputs_embeds)
        if cache is not None and isinstance(cache.keys, tuple) == self.scanned:
            raise ValueError(
                "the cache's layout does not match this model's layers "
                f"(scan_layers={self.scanned}): make it with model.init_cache"
            )
        if inputs_embeds is None:
            inputs_embeds = embed(input_ids)
        batch, length = inputs_embeds.shape[:2]
        step = DecoderStep(cache, attention_mask, batch, length, windows)
        if position_ids is None:
            position_ids = step.default_position_ids(length)
        return inputs_embeds, step, position_ids

    def finish(self, hidden, step: DecoderStep, final_norm, flags, **inputs):
        """Run the layers and the final norm -> BaseModelOutputWithPast (with the new cache).
        As in transformers, hidden_states holds each layer's input and then the normed output."""
        last, all_hidden, all_probs, new_keys_values = stacks.run_layers(
            self.stack,
            hidden,
            lambda layer, hidden, item: layer(hidden, step, *step.layer_inputs(item), **inputs),
            step.per_layer(),
            output_hidden_states=flags.get("output_hidden_states", False),
            output_attentions=flags.get("output_attentions", False),
            remat=self.remat,
        )
        last = final_norm(last)
        return BaseModelOutputWithPast(
            last_hidden_state=last,
            hidden_states=None if all_hidden is None else (*all_hidden[:-1], last),
            attentions=all_probs,
            cache=step.new_cache(new_keys_values, hidden.shape[1]),
        )
