"""Decoder stacks and their key/value cache, and the causal masks over it.

A causal LM's cache is a KVCache (self attention, growing); an encoder-decoder's is an
EncoderDecoderCache: that self part and a CrossAttentionCache computed once from the encoder
output. Every part names its fields and the logical axes of its arrays (so
flaxauto.sharding.cache_shardings shards it under a mesh) and reorders its batch rows.

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
from flaxauto.outputs import BaseModelOutputWithPast, BaseModelOutputWithPastAndCrossAttentions
from flaxauto.sharding import shard_cache

Array = jax.Array


#: Logical axes of one layer's cached keys / values, heads-first (see KVCache); a stacked
#: cache (scan_layers) puts "layers" in front.
SELF_ATTENTION_AXES = ("batch", "kv_heads", "cache_seq", "head_dim")
CROSS_ATTENTION_AXES = ("batch", "kv_heads", "encoder_seq", "head_dim")


def _per_layer(fn, arrays, axes: tuple[str, ...]):
    """fn(array, logical axes) over a tuple of per-layer arrays or one stacked [L, ...] array."""
    if isinstance(arrays, tuple):
        return tuple(fn(x, axes) for x in arrays)
    return fn(arrays, ("layers", *axes))


def _take_rows(rows: Array):
    """fn(array, axes) gathering `rows` along the "batch" axis, leaving other arrays alone."""

    def take(x, axes):
        return jnp.take(x, rows, axis=axes.index("batch")) if "batch" in axes else x

    return take


class _Cache:
    """What every cache part offers: `map_arrays(fn)` (fn(array, logical axes) on each array,
    the structure kept: sharding.cache_shardings builds on it) and `reorder(rows)`."""

    def map_arrays(self, fn):
        raise NotImplementedError

    def reorder(self, rows: Array):
        """The cache with batch row i taken from row rows[i] (beam search), in every part."""
        return self.map_arrays(_take_rows(jnp.asarray(rows)))


@struct.dataclass
class KVCache(_Cache):
    """The self-attention cache that grows: `keys[i]` / `values[i]` are layer i's [B, K, S, D],
    a tuple of per-layer arrays, or one [L, B, K, S, D] array for a backbone built with
    scan_layers (which scans over it). A causal LM's whole cache; an encoder-decoder's self part.

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

    @property
    def stacked(self) -> bool:
        return not isinstance(self.keys, tuple)

    def map_arrays(self, fn) -> KVCache:
        return KVCache(
            keys=_per_layer(fn, self.keys, SELF_ATTENTION_AXES),
            values=_per_layer(fn, self.values, SELF_ATTENTION_AXES),
            mask=fn(self.mask, ("batch", "cache_seq")),
            length=fn(self.length, ()),
        )


#: The self-attention part of an EncoderDecoderCache is a KVCache.
SelfAttentionCache = KVCache


@struct.dataclass
class CrossAttentionCache(_Cache):
    """Each layer's keys / values over the encoder output [B, K, S_enc, D] (per-layer tuple or
    stacked [L, ...], as KVCache), computed once by the first forward given the encoder output,
    and the encoder's padding mask [B, S_enc] they are attended with."""

    keys: tuple[Array, ...] | Array
    values: tuple[Array, ...] | Array
    mask: Array  # [B, S_enc] int32: 1 = encoder token, 0 = padding

    def map_arrays(self, fn) -> CrossAttentionCache:
        return CrossAttentionCache(
            keys=_per_layer(fn, self.keys, CROSS_ATTENTION_AXES),
            values=_per_layer(fn, self.values, CROSS_ATTENTION_AXES),
            mask=fn(self.mask, ("batch", "encoder_seq")),
        )


@struct.dataclass
class EncoderDecoderCache(_Cache):
    """An encoder-decoder's cache: the self-attention part that grows with every token and the
    cross-attention part, None until the first forward with the encoder output fills it."""

    self_attention: KVCache
    cross_attention: CrossAttentionCache | None = None

    @classmethod
    def create(cls, *args, **kwargs) -> EncoderDecoderCache:
        """An empty self part (KVCache.create's arguments); no cross part yet."""
        return cls(self_attention=KVCache.create(*args, **kwargs))

    @property
    def max_length(self) -> int:
        return self.self_attention.max_length

    @property
    def stacked(self) -> bool:
        return self.self_attention.stacked

    @property
    def length(self) -> Array:
        return self.self_attention.length

    def map_arrays(self, fn) -> EncoderDecoderCache:
        cross = self.cross_attention
        return EncoderDecoderCache(
            self_attention=self.self_attention.map_arrays(fn),
            cross_attention=None if cross is None else cross.map_arrays(fn),
        )


@struct.dataclass
class LayerCache:
    """One layer's part of the cache, as the layer sees it: self-attention keys / values
    [B, K, S, D] and, in a decoder with cross attention, the cross part [B, K, S_enc, D] (None
    until computed)."""

    keys: Array
    values: Array
    cross_keys: Array | None = None
    cross_values: Array | None = None


def _heads_first(x: Array) -> Array:
    return jnp.swapaxes(x, 1, 2)  # [B, S, K, D] <-> [B, K, S, D]


class DecoderStep:
    """What the layers of one decoder forward share: where the new tokens go, which slots they
    may attend to (one bias per sliding window size; `windows` has one per layer, or one for
    all), the encoder output and its bias for cross attention, and the cache being filled.
    Each layer takes its own part through `per_layer` / `layer_inputs`, so the same code runs
    the layers unrolled or scanned over stacked weights and caches.

    Masks become additive biases here, once per forward, never per layer."""

    def __init__(
        self,
        cache: KVCache | EncoderDecoderCache | None,
        attention_mask,
        batch: int,
        length: int,
        windows,
        *,
        encoder_hidden_states: Array | None = None,  # [B, S_enc, E_enc]
        encoder_attention_mask: Array | None = None,  # [B, S_enc], 1 = token, 0 = padding
    ):
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
        self_cache = cache.self_attention if isinstance(cache, EncoderDecoderCache) else cache
        if self_cache is not None and _overflows(self_cache, length):
            raise ValueError(
                f"the cache holds {self_cache.max_length} tokens: {int(self_cache.length)} "
                f"written, {length} more do not fit"
            )
        self.cache, self.self_cache = cache, self_cache
        self.output_attentions = False  # set by DecoderBackbone.finish
        if self_cache is None:
            self.start = jnp.zeros((), jnp.int32)
            self.slot_mask = new_mask  # [B, S=T]
        else:
            self.start = self_cache.length
            self.slot_mask = jax.lax.dynamic_update_slice(
                self_cache.mask, new_mask, (0, self.start)
            )
        query_slots = self.start + jnp.arange(length, dtype=jnp.int32)  # [T]
        distinct = sorted(set(windows), key=lambda w: -1 if w is None else w)
        # [W, B, 1, T, S]; with several window sizes, each layer picks its own by index
        self.biases = jnp.stack([_bias(self.slot_mask, query_slots, w) for w in distinct])
        self.window_ids = (
            jnp.asarray([distinct.index(w) for w in windows], jnp.int32)  # [L]
            if len(distinct) > 1
            else None
        )
        self._init_cross(cache, batch, encoder_hidden_states, encoder_attention_mask)

    def _init_cross(self, cache, batch, encoder_hidden_states, encoder_attention_mask):
        """The cross part: reuse the cache's (computed once, by an earlier forward), else
        attend to encoder_hidden_states (and fill the cache's cross part, if it has one)."""
        cached = cache.cross_attention if isinstance(cache, EncoderDecoderCache) else None
        self.cross_cache = cached
        self.encoder_hidden_states = None if cached is not None else encoder_hidden_states
        self.fills_cross = (
            isinstance(cache, EncoderDecoderCache) and cached is None
        ) and encoder_hidden_states is not None
        if cached is not None:
            self.encoder_mask = cached.mask
        elif encoder_hidden_states is None:
            self.encoder_mask = None
        elif encoder_attention_mask is None:
            self.encoder_mask = jnp.ones((batch, encoder_hidden_states.shape[1]), jnp.int32)
        else:
            self.encoder_mask = jnp.asarray(encoder_attention_mask, jnp.int32)
            expected = (batch, encoder_hidden_states.shape[1])
            if self.encoder_mask.shape != expected:
                raise ValueError(
                    f"encoder_attention_mask must be [batch, encoder tokens] = {expected}, got "
                    f"{self.encoder_mask.shape}"
                )
        #: [B, 1, 1, S_enc] additive bias of every cross attention, or None
        self.cross_bias = layers.padding_bias(self.encoder_mask)

    def per_layer(self) -> tuple:
        """What differs between layers, each entry indexed by layer: the self part's keys and
        values (when decoding with a cache), the cross part's (when the cache has one), and the
        window ids (when layers use different windows)."""
        entries = () if self.self_cache is None else (self.self_cache.keys, self.self_cache.values)
        if self.cross_cache is not None:
            entries += (self.cross_cache.keys, self.cross_cache.values)
        return entries + (() if self.window_ids is None else (self.window_ids,))

    def layer_inputs(self, item: tuple):
        """One layer's entry of `per_layer` -> (its LayerCache or None, its self-attention bias
        [B, 1, T, S])."""
        layer_cache = None
        if self.self_cache is not None:
            cross = item[2:4] if self.cross_cache is not None else (None, None)
            layer_cache = LayerCache(item[0], item[1], *cross)
        bias = self.biases[0 if self.window_ids is None else item[-1]]
        return layer_cache, bias

    def layer_outputs(self, layer_cache: LayerCache | None) -> tuple | None:
        """A layer's new LayerCache -> what `new_cache` collects per layer: the self part, and
        the cross part only when this forward computed it (else the cache keeps its own)."""
        if layer_cache is None:
            return None
        if self.fills_cross:
            return (
                layer_cache.keys,
                layer_cache.values,
                layer_cache.cross_keys,
                layer_cache.cross_values,
            )
        return layer_cache.keys, layer_cache.values

    def default_position_ids(self, length: int) -> Array:
        """[1, T]: continuing from the cache, as transformers does when given no position_ids."""
        return (self.start + jnp.arange(length, dtype=jnp.int32))[None, :]

    def keys_values(self, layer_cache: LayerCache | None, keys: Array, values: Array):
        """The new tokens' keys/values [B, T, K, D] and this layer's cache -> (keys, values to
        attend to [B, S, K, D], the layer's new cache).

        With a cache, what is attended is a transposed view of the heads-first buffer: attention
        transposes it back, and XLA cancels the two transposes, so the buffer is read in place."""
        if layer_cache is None:
            return keys, values, None
        layer_cache = layer_cache.replace(
            keys=self._write(layer_cache.keys, keys), values=self._write(layer_cache.values, values)
        )
        return _heads_first(layer_cache.keys), _heads_first(layer_cache.values), layer_cache

    def cross_keys_values(self, layer_cache: LayerCache | None, project):
        """Cross attention's keys/values [B, S_enc, K, D] and the layer's new cache: the cached
        ones, or `project(encoder_hidden_states) -> (keys, values)` [B, S_enc, K, D], computed
        here once and stored in the cache's cross part."""
        if layer_cache is not None and layer_cache.cross_keys is not None:
            cross_keys, cross_values = layer_cache.cross_keys, layer_cache.cross_values
            return _heads_first(cross_keys), _heads_first(cross_values), layer_cache
        if self.encoder_hidden_states is None:
            raise ValueError(
                "cross attention needs encoder_hidden_states (or a cache whose cross part an "
                "earlier forward filled)"
            )
        keys, values = project(self.encoder_hidden_states)
        if layer_cache is not None:
            # The barrier pins the transpose to this forward. Without it, XLA's while-loop
            # sinking moves the (loop-invariant, "fusible") transpose into a decoding loop's
            # body, which then re-lays the whole cross cache on every step (measured: a copy
            # of every layer's [B, S_enc, K, D] keys and values per Whisper token).
            cross_keys, cross_values = jax.lax.optimization_barrier(
                (_heads_first(keys), _heads_first(values))
            )
            layer_cache = layer_cache.replace(cross_keys=cross_keys, cross_values=cross_values)
            keys, values = _heads_first(cross_keys), _heads_first(cross_values)
        return keys, values, layer_cache

    def _write(self, buffer: Array, new: Array) -> Array:
        new = _heads_first(new.astype(buffer.dtype))  # [B, K, T, D]
        written = jax.lax.dynamic_update_slice(buffer, new, (0, 0, self.start, 0))
        return layers.constrain(written, SELF_ATTENTION_AXES)

    def new_cache(self, per_layer, length: int):
        """The cache after this forward, from every layer's `layer_outputs` (per-layer tuples
        or stacked arrays, as per_layer gave them)."""
        if self.self_cache is None:
            return None
        self_part = KVCache(
            keys=per_layer[0], values=per_layer[1], mask=self.slot_mask,
            length=self.start + length,
        )  # fmt: skip
        if not isinstance(self.cache, EncoderDecoderCache):
            return self_part
        cross = self.cross_cache
        if self.fills_cross:
            cross = CrossAttentionCache(
                keys=per_layer[2], values=per_layer[3], mask=self.encoder_mask
            )
        return EncoderDecoderCache(self_attention=self_part, cross_attention=cross)


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
    head dim), set by the family; `cross_attention` = True for a decoder that also attends to
    an encoder's output, whose cache is then an EncoderDecoderCache), the forward around their
    layer stack, and scan_layers / remat. A layer is `layer(hidden, step, layer_cache, bias,
    **inputs) -> (hidden, probs, new layer cache)`: its self attention goes through
    `step.keys_values`, its cross attention through `step.cross_keys_values` and
    `step.cross_bias`. A layer with cross attention returns probs as the pair (self-attention
    probs, cross-attention probs); `finish` then returns them as attentions and
    cross_attentions (BaseModelOutputWithPastAndCrossAttentions).
    """

    supports_scan_layers = supports_remat = True
    cross_attention: bool = False
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

    def init_cache(
        self, batch_size: int, max_length: int, dtype=None, *, mesh=None, rules=None
    ) -> KVCache | EncoderDecoderCache:
        """An empty cache; on `mesh`, every array is placed in its shards by its logical axes
        and `rules` (see flaxauto.sharding.cache_shardings)."""
        dtype = dtype or self.compute_dtype
        kind = EncoderDecoderCache if self.cross_attention else KVCache
        cache = kind.create(batch_size, max_length, self.cache_shape, dtype, self.scanned)
        if mesh is not None:
            cache = shard_cache(cache, mesh, rules)
        return cache

    def begin(
        self, embed, input_ids, inputs_embeds, attention_mask, position_ids, cache, windows,
        *, encoder_hidden_states=None, encoder_attention_mask=None,
    ):  # fmt: skip
        """-> token embeddings [B, T, E], the DecoderStep, position ids [B or 1, T]."""
        layers.exactly_one(input_ids, inputs_embeds)
        if cache is not None:
            self._check_cache(cache)
        if inputs_embeds is None:
            inputs_embeds = embed(input_ids)
        batch, length = inputs_embeds.shape[:2]
        step = DecoderStep(
            cache, attention_mask, batch, length, windows,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
        )  # fmt: skip
        if position_ids is None:
            position_ids = step.default_position_ids(length)
        return inputs_embeds, step, position_ids

    def _check_cache(self, cache) -> None:
        kind = EncoderDecoderCache if self.cross_attention else KVCache
        if not isinstance(cache, kind):
            raise TypeError(
                f"this decoder takes a {kind.__name__}, got {type(cache).__name__}: make it with "
                "model.init_cache"
            )
        if cache.stacked != self.scanned:
            raise ValueError(
                "the cache's layout does not match this model's layers "
                f"(scan_layers={self.scanned}): make it with model.init_cache"
            )

    def finish(
        self, hidden, step: DecoderStep, final_norm, *,
        output_hidden_states: bool, output_attentions: bool, **inputs,
    ):  # fmt: skip
        """Run the layers and the final norm -> BaseModelOutputWithPast (with the new cache).
        As in transformers, hidden_states holds each layer's input and then the normed output.
        inputs: what every layer takes besides its cache and bias (rope's cos / sin)."""
        step.output_attentions = output_attentions

        def run_layer(layer, hidden, item):
            hidden, probs, layer_cache = layer(hidden, step, *step.layer_inputs(item), **inputs)
            return hidden, probs, step.layer_outputs(layer_cache)

        last, all_hidden, all_probs, new_per_layer = stacks.run_layers(
            self.stack,
            hidden,
            run_layer,
            step.per_layer(),
            output_hidden_states=output_hidden_states,
            output_attentions=step.output_attentions,
            remat=self.remat,
        )
        last = final_norm(last)
        output = dict(
            last_hidden_state=last,
            hidden_states=None if all_hidden is None else (*all_hidden[:-1], last),
            attentions=all_probs,
            cache=step.new_cache(new_per_layer, hidden.shape[1]),
        )
        if not self.cross_attention:
            return BaseModelOutputWithPast(**output)
        # a layer with cross attention returns its probabilities as a (self, cross) pair
        cross = None
        if all_probs is not None:
            output["attentions"] = tuple(probs[0] for probs in all_probs)
            cross = tuple(probs[1] for probs in all_probs)
        return BaseModelOutputWithPastAndCrossAttentions(**output, cross_attentions=cross)
