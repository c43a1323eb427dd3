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
) -> nnx.Linear:
    """A Linear layer; the kernel is [in, out] (PyTorch stores the transpose)."""
    return nnx.Linear(
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


def embedding(
    num: int, features: int, axes: tuple[str | None, str | None], precision: Precision, rngs
) -> nnx.Embed:
    return nnx.Embed(
        num,
        features,
        dtype=precision.dtype,
        param_dtype=precision.param_dtype,
        embedding_init=_ZEROS,
        embedding_metadata=_axes(*axes),
        rngs=rngs,
    )


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
    key: Array,  # [B, S, H, D]
    value: Array,  # [B, S, H, D]
    bias: Array | None,  # broadcastable to [B, H, T, S]
    probs_dropout: nnx.Dropout | None = None,
) -> tuple[Array, Array]:
    """Softmax attention; scores and softmax in float32 whatever the compute dtype.

    Returns the context [B, T, H, D] and the attention probabilities [B, H, T, S].
    """
    scale = 1.0 / math.sqrt(query.shape[-1])
    scores = jnp.einsum("bthd,bshd->bhts", query, key, preferred_element_type=jnp.float32)
    scores = scores * scale
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    probs = jax.nn.softmax(scores, axis=-1)
    weights = probs if probs_dropout is None else probs_dropout(probs)
    context = jnp.einsum("bhts,bshd->bthd", weights.astype(value.dtype), value)
    return context, probs


def split_heads(x: Array, num_heads: int) -> Array:
    """[B, T, H*D] -> [B, T, H, D]."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x: Array) -> Array:
    """[B, T, H, D] -> [B, T, H*D]."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
