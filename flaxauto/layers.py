"""Shared building blocks: parameterised layers with logical axes, activations, attention, masks.

Every parameter carries its logical axis names in the `out_sharding` metadata (e.g.
("embed", "mlp")); `flaxauto.sharding` maps them to mesh axes. Eager sharding is off because
models are built abstractly and placed by the loader, not at construction time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array


@dataclass(frozen=True)
class Precision:
    """Compute dtype (activations, matmuls) and storage dtype (parameters), as in Flax."""

    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32


def _axes(*names: str | None) -> dict:
    return {"out_sharding": names, "eager_sharding": False}


# Placeholder initialisers: models are built with nnx.eval_shape and then filled from a checkpoint or
# by `flaxauto.modeling.initialize`, which follows transformers' _init_weights rules.
_ZEROS = nnx.initializers.zeros_init()
_ONES = nnx.initializers.ones_init()


def linear(
    in_features: int,
    out_features: int,
    axes: tuple[str | None, str | None],
    precision: Precision,
    rngs: nnx.Rngs,
    *,
    use_bias: bool = True,
    module: type[nnx.Linear] = nnx.Linear,
) -> nnx.Linear:
    """A Linear layer; the kernel is [in, out] (PyTorch stores the transpose)."""
    return module(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=precision.dtype,
        param_dtype=precision.param_dtype,
        kernel_init=_ZEROS,
        bias_init=_ZEROS,
        kernel_metadata=_axes(*axes),
        bias_metadata=_axes(axes[1]),
        rngs=rngs,
    )


def layer_norm(features: int, eps: float, precision: Precision, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm whose statistics are computed in float32 whatever the compute dtype."""
    return nnx.LayerNorm(
        features,
        epsilon=eps,
        dtype=precision.dtype,
        param_dtype=precision.param_dtype,
        use_fast_variance=False,  # two-pass variance, as torch computes it
        scale_init=_ONES,
        bias_init=_ZEROS,
        scale_metadata=_axes("embed"),
        bias_metadata=_axes("embed"),
        rngs=rngs,
    )


class Conv1D(nnx.Linear):
    """GPT-2's "Conv1D": a Linear whose PyTorch weight is stored [in, out], already the flax
    kernel layout, so converters.layout maps it without a transpose."""


def conv1d(in_features: int, out_features: int, axes, precision: Precision, rngs) -> Conv1D:
    return linear(in_features, out_features, axes, precision, rngs, module=Conv1D)


class RMSNorm(nnx.RMSNorm):
    """RMSNorm in transformers' order (LlamaRMSNorm): normalise in float32, cast back to the
    input dtype, then scale. flax's RMSNorm scales before casting, which rounds differently in
    bf16."""

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        scale = self.scale[...].reshape((1,) * (x.ndim - 1) + (-1,))
        out = scale * normed.astype(x.dtype)
        return out.astype(self.dtype or out.dtype)


def rms_norm(features: int, eps: float, precision: Precision, rngs: nnx.Rngs) -> RMSNorm:
    return RMSNorm(
        features,
        epsilon=eps,
        dtype=precision.dtype,
        param_dtype=precision.param_dtype,
        scale_init=_ONES,
        scale_metadata=_axes("embed"),
        rngs=rngs,
    )


def embedding(
    num: int,
    features: int,
    axes: tuple[str | None, str | None],
    precision: Precision,
    rngs,
    *,
    init: str | None = None,
) -> nnx.Embed:
    """An embedding table [num, features]; init="sinusoidal" for fixed sin/cos tables
    (initialised that way by from_config; checkpoints carry the table like any other)."""
    metadata = _axes(*axes) | ({"init": init} if init else {})
    return nnx.Embed(
        num,
        features,
        dtype=precision.dtype,
        param_dtype=precision.param_dtype,
        embedding_init=_ZEROS,
        embedding_metadata=metadata,
        rngs=rngs,
    )


def sinusoidal_table(num: int, features: int) -> jax.Array:
    """[num, features]: sin on even features, cos on odd, frequency 10000^(-2*(j//2)/features).

    Computed in float64 on the host, as transformers does, then rounded once."""
    positions = np.arange(num, dtype=np.float64)[:, None]
    angles = positions / np.power(10000.0, 2 * (np.arange(features) // 2) / features)[None, :]
    table = np.where(np.arange(features)[None, :] % 2 == 0, np.sin(angles), np.cos(angles))
    return jnp.asarray(table.astype(np.float32))


def dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
    return nnx.Dropout(rate, rngs=rngs)


# --- activations -------------------------------------------------------------------------------


def _gelu_exact(x: Array) -> Array:
    # transformers' "gelu" is the erf form; jax.nn.gelu defaults to the tanh approximation.
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=True)


def _quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name, attribute: str = "hidden_act") -> Callable[[Array], Array]:
    """The activation transformers calls `name`; anything else is refused, not approximated."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise NotImplementedError(
            f"{attribute}={name!r} is not implemented; supported: {sorted(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]


# --- attention ---------------------------------------------------------------------------------


def padding_bias(attention_mask: Array | None, dtype=jnp.float32) -> Array | None:
    """[B, S] mask of 1 (attend) / 0 (padding) -> additive bias [B, 1, 1, S]."""
    if attention_mask is None:
        return None
    if attention_mask.ndim != 2:
        raise ValueError(
            f"attention_mask must be [batch, seq] of 0/1, got shape {attention_mask.shape}"
        )
    keep = attention_mask.astype(bool)[:, None, None, :]
    return jnp.where(keep, 0.0, jnp.finfo(dtype).min).astype(dtype)


def dot_product_attention(
    query: Array,  # [B, T, H, D]
    key: Array,  # [B, S, K, D], K divides H (K < H: grouped- or multi-query attention)
    value: Array,  # [B, S, K, D]
    bias: Array | None,  # [B, 1, T or 1, S]: the same for every head
    probs_dropout: nnx.Dropout | None = None,
    *,
    scale: float | None = None,  # default 1/sqrt(D)
) -> tuple[Array, Array]:
    """Softmax attention; scores and softmax in float32 whatever the compute dtype.

    Each group of H/K query heads shares one key/value head; the keys are never repeated in
    memory (decoding reads the KV cache once per step). Returns the context [B, T, H, D] and the
    attention probabilities [B, H, T, S].
    """
    batch, length, heads, depth = query.shape
    kv_heads = key.shape[2]
    scale = 1.0 / math.sqrt(depth) if scale is None else scale
    grouped = query.reshape(batch, length, kv_heads, heads // kv_heads, depth)  # [B, T, K, G, D]
    scores = jnp.einsum("btkgd,bskd->bkgts", grouped, key, preferred_element_type=jnp.float32)
    scores = scores * scale
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)[:, :, None]
    probs = jax.nn.softmax(scores, axis=-1)  # [B, K, G, T, S]
    weights = probs if probs_dropout is None else probs_dropout(probs)
    context = jnp.einsum("bkgts,bskd->btkgd", weights.astype(value.dtype), value)
    probs = probs.reshape(batch, heads, length, key.shape[1])
    return context.reshape(batch, length, heads, depth), probs


def qkv_projections(hidden: int, precision: Precision, rngs: nnx.Rngs):
    """Query, key and value projections [E] -> [H*D] (named by the family that holds them)."""
    return tuple(linear(hidden, hidden, ("embed", "heads"), precision, rngs) for _ in range(3))


def self_attention(projections, hidden_states, bias, num_heads: int, probs_dropout):
    """Multi-head self-attention over [B, T, E] with the given (query, key, value) projections.

    Returns the merged context [B, T, H*D] (before any output projection) and the probabilities.
    """
    q, k, v = (split_heads(proj(hidden_states), num_heads) for proj in projections)
    context, probs = dot_product_attention(q, k, v, bias, probs_dropout)  # [B, T, H, D]
    return merge_heads(context), probs


class ScannedLayers(nnx.Module):
    """`num_layers` identical layers stored stacked (every parameter [L, ...], logical axis
    "layers" first) and run with jax.lax.scan: one layer is traced and compiled, whatever the
    depth. Checkpoints keep transformers' per-layer names (converters.layout unstacks them)."""

    def __init__(self, make_layer, num_layers: int, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def create(rngs):
            return make_layer(0, rngs)

        self.block = create(rngs)
        self.num_layers = num_layers


def layer_stack(make_layer, num_layers: int, rngs: nnx.Rngs, *, scan: bool = False):
    """`make_layer(index, rngs)` for every layer: an nnx.List (transformers' `layer.0`,
    `layer.1`, ...) or, with scan, one ScannedLayers, which builds layer 0 for all of them (a
    family whose layers differ by index refuses scan_layers for that config)."""
    if scan:
        return ScannedLayers(make_layer, num_layers, rngs)
    return nnx.List([make_layer(index, rngs) for index in range(num_layers)])


class EncoderBackbone(nnx.Module):
    """What BERT-like backbones share: `embeddings.word_embeddings` (tied LM heads read it) and
    the forward from embeddings through the layer stack to the output."""

    def get_input_embeddings(self) -> nnx.Embed:
        return self.embeddings.word_embeddings

    def encode(self, stack, embeddings, attention_mask, flags: dict, pooler=None):
        """embeddings [B, T, E] -> BaseModelOutput; flags: output_hidden_states/attentions."""
        from flaxauto.outputs import BaseModelOutput

        hidden, all_hidden, all_probs = stack(
            embeddings,
            padding_bias(attention_mask),
            flags.get("output_hidden_states", False),
            flags.get("output_attentions", False),
        )
        return BaseModelOutput(
            last_hidden_state=hidden,
            pooler_output=None if pooler is None else pooler(hidden),
            hidden_states=all_hidden,
            attentions=all_probs,
        )


def check_heads_divide(config, width: str = "hidden_size", heads: str = "num_attention_heads"):
    """Attention splits the width evenly over the heads; refuse configs where it cannot."""
    if getattr(config, width) % getattr(config, heads):
        raise ValueError(
            f"{width}={getattr(config, width)} is not a multiple of {heads}={getattr(config, heads)}"
        )


def exactly_one(input_ids, inputs_embeds) -> None:
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")


class Encoder(nnx.Module):
    """Layers under the attribute `layer` (BERT's `encoder`, DistilBERT's `transformer`)."""

    def __init__(self, make_layer, num_layers: int, rngs, *, scan: bool = False, remat=False):
        self.layer = layer_stack(make_layer, num_layers, rngs, scan=scan)
        self.remat = remat

    def __call__(self, hidden_states, bias, output_hidden_states, output_attentions):
        last, all_hidden, all_probs, _ = run_layers(
            self.layer,
            hidden_states,
            lambda layer, hidden, _: (*layer(hidden, bias), None),
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            remat=self.remat,
        )
        return last, all_hidden, all_probs


def run_layers(
    layer_stack,
    hidden_states,
    call,
    per_layer=None,
    *,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
    remat: bool = False,
):
    """Run `call(layer, hidden, item) -> (hidden, probs, new_item)` over the layers in order.

    `per_layer` is a tuple whose entries are indexed by layer (per-layer tuples for a plain stack,
    [L, ...] arrays for ScannedLayers), e.g. a KV cache; `item` is layer i's (x[i] for each x),
    or None. remat recomputes each layer's activations in the backward pass instead of storing
    them (jax.checkpoint per layer).

    Returns (last hidden state, all hidden states incl. the input or None, all probs or None,
    the new per_layer in the same form, or None).
    """

    def step(hidden, layer_state, item, graphdef):
        # A pure function of the layer's state (jax.lax.scan / jax.checkpoint, not their nnx
        # wrappers): it composes with plain jax.grad over nnx.split state, not only nnx.grad.
        layer = nnx.merge(graphdef, layer_state)
        hidden, probs, new_item = call(layer, hidden, item)
        kept = (hidden if output_hidden_states else None, probs if output_attentions else None)
        # in training, dropout advanced its RNG streams: hand them back to the real layer
        streams = nnx.state(layer, nnx.RngState) if _training(layer) else None
        return hidden, (kept, new_item, streams)

    if remat:
        step = jax.checkpoint(step, static_argnums=(3,))
    if isinstance(layer_stack, ScannedLayers):
        graphdef, stacked = nnx.split(layer_stack.block)
        last, ((stacked_hidden, stacked_probs), new_per_layer, new_state) = jax.lax.scan(
            lambda h, xs: step(h, *xs, graphdef), hidden_states, (stacked, per_layer)
        )
        if new_state is not None:
            nnx.update(layer_stack.block, new_state)
        all_hidden = None if stacked_hidden is None else [hidden_states, *stacked_hidden]
        all_probs = None if stacked_probs is None else list(stacked_probs)
    else:
        last, all_hidden, all_probs, new_items = hidden_states, [hidden_states], [], []
        for index, layer in enumerate(layer_stack):
            graphdef, layer_state = nnx.split(layer)
            item = None if per_layer is None else tuple(x[index] for x in per_layer)
            last, ((hidden, probs), new_item, new_state) = step(last, layer_state, item, graphdef)
            if new_state is not None:
                nnx.update(layer, new_state)
            all_hidden.append(hidden)
            all_probs.append(probs)
            new_items.append(new_item)
        no_items = not new_items or new_items[0] is None
        new_per_layer = None if no_items else tuple(zip(*new_items, strict=True))
    return (
        last,
        tuple(all_hidden) if output_hidden_states else None,
        tuple(all_probs) if output_attentions else None,
        new_per_layer,
    )


def _training(module: nnx.Module) -> bool:
    """Whether any dropout in `module` is active (model.train())."""
    return any(
        isinstance(m, nnx.Dropout) and not m.deterministic and m.rate > 0
        for _, m in nnx.iter_modules(module)
    )


def split_heads(x: Array, num_heads: int) -> Array:
    """[B, T, H*D] -> [B, T, H, D]."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x: Array) -> Array:
    """[B, T, H, D] -> [B, T, H*D]."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
