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


#: Attention implementations: "eager" computes scores and softmax in float32 as transformers'
#: eager attention does (its numbers on CPU); "fused" goes through jax.nn.dot_product_attention
#: (cuDNN flash attention on GPU in bf16/fp16, XLA's own kernel otherwise).
ATTENTION_IMPLEMENTATIONS = ("eager", "fused")


@dataclass(frozen=True)
class Precision:
    """How the model computes, fixed when it is built: compute dtype (activations, matmuls),
    storage dtype (parameters), as in Flax, and the attention implementation (one of
    ATTENTION_IMPLEMENTATIONS; see `attention_implementation` for the automatic choice)."""

    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention: str = "eager"

    def __post_init__(self):
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise NotImplementedError(
                f"attention implementation {self.attention!r} is not implemented; "
                f"supported: {ATTENTION_IMPLEMENTATIONS}"
            )


def attention_implementation(requested: str | None = None, backend: str | None = None) -> str:
    """The implementation a model option asks for; None chooses by platform: "eager" on CPU,
    where it gives transformers' numbers and XLA:CPU has no faster kernel, "fused" on GPU/TPU.
    transformers' own name "sdpa" (PyTorch's fused kernel) means "fused" here."""
    if requested is None:
        return "eager" if (backend or jax.default_backend()) == "cpu" else "fused"
    if requested == "sdpa":
        return "fused"
    if requested not in ATTENTION_IMPLEMENTATIONS:
        raise NotImplementedError(
            f"attn_implementation={requested!r} is not implemented; supported: "
            f'{ATTENTION_IMPLEMENTATIONS} ("sdpa" means "fused"), or None for the platform\'s'
        )
    return requested


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
    value: Array,  # [B, S, K, Dv]
    bias: Array | None = None,  # [B|1, 1, T|1, S]: padding / causal mask as an additive bias
    probs_dropout: nnx.Dropout | None = None,
    *,
    head_bias: Array | None = None,  # [B|1, H|1, T|1, S]: e.g. T5's relative position bias
    scale: float | None = None,  # default 1/sqrt(D); T5 uses 1.0
    implementation: str = "eager",
    output_attentions: bool = False,
) -> tuple[Array, Array | None]:
    """Softmax attention: the one primitive every family's attention ends in.

    Returns the context [B, T, H, Dv] and the attention probabilities [B, H, T, S] (None from
    the fused path). Both biases are added to the scaled scores (a row whose every slot is
    masked becomes uniform, as in transformers' eager attention). The fused path cannot return
    probabilities nor drop them out, so output_attentions or active dropout take the eager one.
    """
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    dropout_active = probs_dropout is not None and _dropout_active(probs_dropout)
    if implementation == "fused" and not (output_attentions or dropout_active):
        return _fused_attention(query, key, value, _sum_biases(bias, head_bias), scale), None
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise NotImplementedError(f"attention implementation {implementation!r}")
    return _eager_attention(query, key, value, bias, head_bias, probs_dropout, scale)


def _eager_attention(query, key, value, bias, head_bias, probs_dropout, scale):
    """Scores and softmax in float32 whatever the compute dtype. Each group of H/K query heads
    shares one key/value head; the keys are never repeated in memory (decoding reads the KV
    cache once per step)."""
    batch, length, heads, depth = query.shape
    kv_heads = key.shape[2]
    grouped = query.reshape(batch, length, kv_heads, heads // kv_heads, depth)  # [B, T, K, G, D]
    scores = jnp.einsum("btkgd,bskd->bkgts", grouped, key, preferred_element_type=jnp.float32)
    scores = scores * scale
    for extra in (head_bias, bias):  # transformers adds the position bias, then the mask
        if extra is not None:
            scores = scores + _grouped_bias(extra.astype(jnp.float32), kv_heads)
    probs = jax.nn.softmax(scores, axis=-1)  # [B, K, G, T, S]
    weights = probs if probs_dropout is None else probs_dropout(probs)
    context = jnp.einsum("bkgts,bskd->btkgd", weights.astype(value.dtype), value)
    probs = probs.reshape(batch, heads, length, key.shape[1])
    return context.reshape(batch, length, heads, value.shape[-1]), probs


def _grouped_bias(bias: Array, kv_heads: int) -> Array:
    """[B|1, H|1, T|1, S] -> [B|1, K|1, G|1, T|1, S], the grouped layout of the scores."""
    if bias.ndim != 4:
        raise ValueError(f"an attention bias is [B|1, H|1, T|1, S], got shape {bias.shape}")
    if bias.shape[1] == 1:
        return bias[:, :, None]
    return bias.reshape(bias.shape[0], kv_heads, bias.shape[1] // kv_heads, *bias.shape[2:])


def _sum_biases(bias: Array | None, head_bias: Array | None) -> Array | None:
    if bias is None or head_bias is None:
        return head_bias if bias is None else bias
    return head_bias.astype(jnp.float32) + bias.astype(jnp.float32)


def _fused_attention(query, key, value, bias, scale: float) -> Array:
    """jax.nn.dot_product_attention: cuDNN's flash attention on GPU where it takes the shapes
    and dtype (bf16/fp16 only), XLA's kernel otherwise (jax's own default, implementation=None,
    is always XLA today, so the cuDNN kernel is asked for by name)."""
    key, value = key.astype(query.dtype), value.astype(query.dtype)
    if jax.default_backend() == "gpu" and query.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(
                query, key, value, _bias_in(bias, query.dtype, query.shape[1]), scale=scale,
                implementation="cudnn",
            )  # fmt: skip
        except (ValueError, NotImplementedError, RuntimeError):
            pass  # a shape, layout or cuDNN version it refuses: XLA's kernel below
    return jax.nn.dot_product_attention(
        query, key, value, None if bias is None else bias.astype(jnp.float32), scale=scale,
        implementation="xla",
    )  # fmt: skip


def _bias_in(bias: Array | None, dtype, length: int) -> Array | None:
    """The bias as cuDNN takes it: [B|1, H|1, T, S] (it refuses a query axis of 1, e.g. a
    padding bias [B, 1, 1, S]), in the half dtype, clipped to that dtype's min first: float32's
    min rounds to -inf there, and a row with nothing to attend would become NaN."""
    if bias is None:
        return None
    bias = jnp.broadcast_to(bias, (*bias.shape[:2], length, bias.shape[-1]))
    return jnp.maximum(bias, jnp.finfo(dtype).min).astype(dtype)


def _dropout_active(dropout: nnx.Dropout) -> bool:
    return not dropout.deterministic and dropout.rate > 0


def qkv_projections(hidden: int, precision: Precision, rngs: nnx.Rngs, inner: int | None = None):
    """Query, key and value projections [E] -> [H*D] (inner = H*D, default E; named by the
    family that holds them)."""
    inner = hidden if inner is None else inner
    return tuple(linear(hidden, inner, ("embed", "heads"), precision, rngs) for _ in range(3))


def attention_heads(
    projections,
    hidden_states: Array,  # [B, T, E]: the queries' source
    key_value_states: Array | None = None,  # [B, S, E']: cross attention; None: self attention
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    query_positions: Array | None = None,  # [B|1, T, E]
    key_positions: Array | None = None,  # [B|1, S, E']
) -> tuple[Array, Array, Array]:
    """(query, key, value) projections -> q [B, T, H, D], k, v [B, S, K, D].

    Positions (DETR's) are added to the sources of the queries and keys, never of the values.
    The head width D is each projection's width over its heads, so inner_dim = H*D may differ
    from the hidden size (T5's d_kv)."""
    q_proj, k_proj, v_proj = projections
    source = hidden_states if key_value_states is None else key_value_states
    if key_value_states is None and key_positions is None:
        key_positions = query_positions
    query_source = hidden_states if query_positions is None else hidden_states + query_positions
    key_source = source if key_positions is None else source + key_positions
    kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    return (
        split_heads(q_proj(query_source), num_heads),
        split_heads(k_proj(key_source), kv_heads),
        split_heads(v_proj(source), kv_heads),
    )


def attend(
    projections,
    hidden_states: Array,  # [B, T, E]
    key_value_states: Array | None = None,  # [B, S, E'] for cross attention
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    bias: Array | None = None,  # [B|1, 1, T|1, S]
    head_bias: Array | None = None,  # [B|1, H|1, T|1, S]
    query_positions: Array | None = None,
    key_positions: Array | None = None,
    scale: float | None = None,
    dropout: nnx.Dropout | None = None,
    implementation: str = "eager",
    output_attentions: bool = False,
) -> tuple[Array, Array | None]:
    """Multi-head attention from projections to the merged context [B, T, H*D] (before any
    output projection) and the probabilities [B, H, T, S] (None on the fused path): self or
    cross attention, grouped heads, per-head bias, q/k-only positions (see attention_heads)."""
    q, k, v = attention_heads(
        projections, hidden_states, key_value_states, num_heads=num_heads,
        num_kv_heads=num_kv_heads, query_positions=query_positions, key_positions=key_positions,
    )  # fmt: skip
    context, probs = dot_product_attention(
        q, k, v, bias, dropout, head_bias=head_bias, scale=scale,
        implementation=implementation, output_attentions=output_attentions,
    )  # fmt: skip
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
