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


def check_heads_divide(config, width: str = "hidden_size", heads: str = "num_attention_heads"):
    """Attention splits the width evenly over the heads; refuse configs where it cannot."""
    if getattr(config, width) % getattr(config, heads):
        raise ValueError(
            f"{width}={getattr(config, width)} is not a multiple of {heads}={getattr(config, heads)}"
        )


def exactly_one(input_ids, inputs_embeds) -> None:
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")


def split_heads(x: Array, num_heads: int) -> Array:
    """[B, T, H*D] -> [B, T, H, D]."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x: Array) -> Array:
    """[B, T, H, D] -> [B, T, H*D]."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
