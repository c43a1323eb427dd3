"""Shared building blocks: parameterised layers with logical axes, activations, attention, masks.

Every parameter carries its logical axis names in the `out_sharding` metadata (e.g.
("embed", "mlp")); `flaxauto.sharding` maps them to mesh axes. Eager sharding is off because
models are built abstractly and placed by the loader, not at construction time.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
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


# --- activation sharding -----------------------------------------------------------------------
# A model placed on a mesh (flaxauto.sharding) traces its forward inside `activation_sharding`,
# and the hot activations (each layer's hidden states, attention heads, the KV cache it writes)
# are constrained by their logical axes, so XLA's sharding propagation cannot wander off
# (e.g. gather a tensor-parallel head axis early). Outside a mesh, `constrain` is the identity.

_ACTIVATION_SHARDING: contextvars.ContextVar = contextvars.ContextVar(
    "flaxauto_activation_sharding", default=None
)


@contextlib.contextmanager
def activation_sharding(place: Callable | None):
    """Within it, constrain(x, axes) applies place(x, axes) -> a sharding (None: no mesh)."""
    token = _ACTIVATION_SHARDING.set(place)
    try:
        yield
    finally:
        _ACTIVATION_SHARDING.reset(token)


def constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
    """x with a sharding constraint from its logical axes ("batch", "seq", "embed", "heads",
    "kv_heads", "cache_seq", ...) under the current activation_sharding; traced arrays only."""
    place = _ACTIVATION_SHARDING.get()
    if place is None or not isinstance(x, jax.core.Tracer):
        return x
    return jax.lax.with_sharding_constraint(x, place(x, axes))


# --- abstract construction ---------------------------------------------------------------------
# Models are built abstractly without tracing: every parameter's initialiser returns a
# jax.ShapeDtypeStruct and RNG streams hold ShapeDtypeStructs too, so a build runs no XLA program
# (a first eager jax.random op costs 0.1-0.6 s of compilation) and allocates nothing. The loader
# then fills the variables from a checkpoint, and `flaxauto.modeling.initialize_abstract` gives
# what is left transformers' _init_weights values and the RNG streams their keys.


def _placeholder(key, shape, dtype=jnp.float32, **_) -> jax.ShapeDtypeStruct:
    """An initialiser for flax modules that returns the shape and dtype only (the key is None)."""
    del key
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


_ZEROS = _ONES = _placeholder  # the names say what initialize_abstract gives them


@functools.cache
def _key_type() -> jax.ShapeDtypeStruct:
    """The abstract form of a jax.random.key under the configured PRNG implementation."""
    return jax.eval_shape(jax.random.key, 0)  # one primitive, once per process


@functools.cache
def key_data_shape() -> tuple[int, ...]:
    """The uint32 words of one key (jax.random.key_data's trailing shape)."""
    return jax.eval_shape(jax.random.key_data, _key_type()).shape


def is_abstract(value) -> bool:
    return isinstance(value, jax.ShapeDtypeStruct)


class DeferredRngStream(nnx.RngStream):
    """An nnx.RngStream whose key and count stay abstract until initialize_abstract sets them.

    While abstract, drawing a key gives None (the placeholder initialisers ignore it) and fork()
    gives another deferred stream; once the values are set it is an ordinary RngStream."""

    def __init__(self, key=None, *, tag: str, shape: tuple[int, ...] = ()):
        if key is not None:  # fork() and split() of a concrete stream
            super().__init__(key, tag=tag)
            return
        self.tag = tag
        self.key = nnx.RngKey(jax.ShapeDtypeStruct(shape, _key_type().dtype), tag=tag)
        self.count = nnx.RngCount(jax.ShapeDtypeStruct(shape, jnp.uint32), tag=tag)

    def _deferred(self) -> bool:
        return is_abstract(self.key.get_value())

    def __call__(self):
        return None if self._deferred() else super().__call__()

    def fork(self, **kwargs):
        if self._deferred():
            return type(self)(tag=self.tag, shape=self.key.get_value().shape)
        return super().fork(**kwargs)


def abstract_rngs() -> nnx.Rngs:
    """Rngs for an abstract build: every stream (params, dropout, ...) is one deferred stream."""
    rngs = nnx.Rngs()
    rngs.default = DeferredRngStream(tag="default")
    return rngs


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
    padding_idx: int | None = None,
) -> nnx.Embed:
    """An embedding table [num, features]; init="sinusoidal" (or "sinusoidal-halves", see
    sinusoidal_table) for fixed sin/cos tables (initialised that way by from_config; checkpoints
    carry the table like any other). padding_idx: the row that looking up never trains, as
    torch's nn.Embedding(padding_idx=)."""
    metadata = _axes(*axes) | ({"init": init} if init else {})
    module = nnx.Embed if padding_idx is None else PaddingEmbed
    table = module(
        num,
        features,
        dtype=precision.dtype,
        param_dtype=precision.param_dtype,
        embedding_init=_ZEROS,
        embedding_metadata=metadata,
        rngs=rngs,
    )
    if padding_idx is not None:
        table.padding_idx = padding_idx
    return table


class PaddingEmbed(nnx.Embed):
    """torch's nn.Embedding(padding_idx=p): a lookup of row p passes no gradient to the table
    (the row still takes gradients through other uses, e.g. a tied LM head's attend).
    `padding_idx` is set by `embedding`."""

    def __call__(self, inputs: Array) -> Array:  # [...] -> [..., features]
        looked_up = super().__call__(inputs)
        padding = (inputs == self.padding_idx)[..., None]
        return jnp.where(padding, jax.lax.stop_gradient(looked_up), looked_up)


class FixedTable(nnx.Module):
    """A position table torch keeps frozen (nn.Embedding(_freeze=True): Marian's and Pegasus'
    sinusoids): a Buffer named `weight`, so an optimiser over nnx.Param leaves it alone, as
    torch's does. computed: transformers computes it at init and neither saves nor requires it
    (Marian): converters.layout gives it the slot kind "computed" (filled by its init when a
    checkpoint lacks it, silently)."""

    def __init__(self, num: int, features: int, axes, dtype, *, init: str, computed: bool):
        metadata = _axes(*axes) | ({"computed": True} if computed else {})
        self.weight = Buffer(_placeholder(None, (num, features), dtype), init=init, **metadata)

    def __call__(self, ids: Array) -> Array:  # [...] -> [..., features]
        return jnp.take(self.weight[...], ids, axis=0)


def sinusoidal_table(num: int, features: int, *, halves: bool = False) -> np.ndarray:
    """[num, features]: sin on even features, cos on odd, frequency 10000^(-2*(j//2)/features);
    with halves (Marian, Pegasus) the sines of the even features fill the first half and the
    cosines of the odd ones the second.

    Computed in float64 on the host, as transformers does, then rounded once; a numpy array,
    so a caller inside a trace gets a constant."""
    positions = np.arange(num, dtype=np.float64)[:, None]
    angles = positions / np.power(10000.0, 2 * (np.arange(features) // 2) / features)[None, :]
    if halves:
        table = np.concatenate([np.sin(angles[:, 0::2]), np.cos(angles[:, 1::2])], axis=1)
    else:
        table = np.where(np.arange(features)[None, :] % 2 == 0, np.sin(angles), np.cos(angles))
    return table.astype(np.float32)


def sinusoidal_timescales_table(num: int, features: int) -> np.ndarray:
    """[num, features]: sin on the first half of the features, cos on the second, timescales
    10000 ** (j / (features / 2 - 1)) (Whisper's encoder positions, transformers' `sinusoids`)."""
    half = features // 2
    inverse = np.exp(-np.log(10000.0) / (half - 1) * np.arange(half, dtype=np.float32))
    angles = np.arange(num, dtype=np.float32)[:, None] * inverse[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


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
    cache once per step).

    Both products are batched over (B, K) in the heads-first layout the CPU/GPU dot kernels
    take without copies (rows [G*T, D] x [S, D] and [G*T, S] x [S, Dv]): only the small
    [B, T|S, K, D] operands are transposed. Left to jnp.einsum, XLA:CPU chose the transposed
    score matrix and copied the whole [B, K, T, S] scores twice per layer (measured: half of a
    Whisper encoder layer's attention at 1,500 frames)."""
    batch, length, heads, depth = query.shape
    kv_heads, source = key.shape[2], key.shape[1]
    groups = heads // kv_heads
    grouped = query.reshape(batch, length, kv_heads, groups, depth)  # [B, T, K, G, D]
    rows = jnp.transpose(grouped, (0, 2, 3, 1, 4)).reshape(batch, kv_heads, groups * length, depth)
    keys = jnp.swapaxes(key, 1, 2)  # [B, K, S, D]
    heads_batch = ((0, 1), (0, 1))
    scores = jax.lax.dot_general(
        rows, keys, (((3,), (3,)), heads_batch), preferred_element_type=jnp.float32
    )  # [B, K, G*T, S]
    scores = scores * scale
    grouped_shape = (batch, kv_heads, groups, length, source)
    for extra in (head_bias, bias):  # transformers adds the position bias, then the mask
        if extra is not None:
            scores = scores.reshape(grouped_shape) + _grouped_bias(
                extra.astype(jnp.float32), kv_heads
            )
    # softmax over the 4-d scores: on a 5-d view XLA:CPU picks the transposed layout again
    probs = jax.nn.softmax(scores.reshape(batch, kv_heads, groups * length, source), axis=-1)
    weights = probs if probs_dropout is None else probs_dropout(probs)
    weights = weights.astype(value.dtype)  # [B, K, G*T, S]
    values = jnp.swapaxes(value, 1, 2)  # [B, K, S, Dv]
    context = jax.lax.dot_general(weights, values, (((3,), (2,)), heads_batch))  # [B, K, GT, Dv]
    context = context.reshape(batch, kv_heads, groups, length, value.shape[-1])
    context = jnp.transpose(context, (0, 3, 1, 2, 4))  # [B, T, K, G, Dv]
    probs = probs.reshape(batch, heads, length, source)
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
    if bias is not None:
        query, bias = _unattended_rows_uniform(query, bias)
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


def _unattended_rows_uniform(query: Array, bias: Array) -> tuple[Array, Array]:
    """A query row whose every slot is masked attends uniformly in eager attention (as in
    transformers': each score plus the same float32 min), and decoders' left padding makes such
    rows, which losses over every position (span heads) read. Fused kernels need not agree
    (flash kernels may zero a row with nothing to attend), so those rows get a zero query and
    a zero bias: equal scores, the same uniform weights, on any kernel."""
    bias = bias.astype(jnp.float32)
    masked = jnp.all(bias <= jnp.finfo(jnp.float32).min / 2, axis=-1, keepdims=True)
    query = jnp.where(jnp.swapaxes(masked, 1, 2), jnp.zeros((), query.dtype), query)  # [B, T, H, D]
    return query, jnp.where(masked, 0.0, bias)  # masked: [B|1, H|1, T|1, 1]


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


#: logical axes of attention's per-head activations [B, T, H, D]
HEAD_AXES = ("batch", "seq", "heads", None)
#: logical axes of hidden states [B, T, E] between layers
HIDDEN_AXES = ("batch", "seq", "embed")


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
    """[B, T, H*D] -> [B, T, H, D], constrained by HEAD_AXES on a placed model (a key/value
    head axis splits as the query heads': every preset maps "heads" and "kv" alike)."""
    heads = x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)
    return constrain(heads, HEAD_AXES) if heads.ndim == len(HEAD_AXES) else heads


def merge_heads(x: Array) -> Array:
    """[B, T, H, D] -> [B, T, H*D]."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


# --- persistent buffers, convolution, batch and group normalisation (vision and speech) ---------


class Buffer(nnx.Variable):
    """A persistent tensor that is not trained (transformers' register_buffer with
    persistent=True, e.g. BART's final_logits_bias): saved and loaded like a parameter, but an
    optimiser or nnx.grad over nnx.Param leaves it alone."""


def parameter(shape, axes: tuple, precision: Precision, *, init: str | None = None) -> nnx.Param:
    """A bare parameter (e.g. a head's output bias); init as converters.layout.Leaf.init."""
    metadata = _axes(*axes) | ({"init": init} if init else {})
    return nnx.Param(_placeholder(None, shape, precision.param_dtype), **metadata)


def buffer(shape, axes: tuple, dtype, *, init: str = "zeros") -> Buffer:
    return Buffer(_placeholder(None, shape, dtype), **_axes(*axes), init=init)


def _spatial(value, n: int, name: str) -> tuple[int, ...]:
    values = (value,) * n if isinstance(value, int) else tuple(value)
    if len(values) != n:
        raise ValueError(f"{name}={value!r} does not give one value per spatial dimension ({n})")
    return values


def _spatial_dims(kernel_size, spatial_dims: int | None) -> int:
    """Conv1d, 2d or 3d: from a tuple kernel_size, or given with an int one (torch's class)."""
    if spatial_dims is None:
        if isinstance(kernel_size, int):
            raise ValueError("an int kernel_size needs spatial_dims (1, 2 or 3: torch's Conv{N}d)")
        return len(kernel_size)
    return spatial_dims


def conv_padding(padding, kernel_size, dilation) -> tuple[tuple[int, int], ...]:
    """torch's Conv padding (an int, one int per dimension, "valid" or "same") as (low, high)
    pairs. "same" puts the odd element at the end, as torch does. A tuple: modules keep it as a
    static attribute, which jit hashes with the graph definition."""
    n = len(kernel_size)
    if padding == "valid":
        return ((0, 0),) * n
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel_size, dilation, strict=True)]
        return tuple((t // 2, t - t // 2) for t in totals)
    if isinstance(padding, str):
        raise NotImplementedError(f"padding={padding!r} is not implemented")
    return tuple((p, p) for p in _spatial(padding, n, "padding"))


def conv(
    in_features: int,
    out_features: int,
    kernel_size,
    axes: tuple[str | None, str | None],
    precision: Precision,
    rngs: nnx.Rngs,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    use_bias: bool = True,
    padding_mode: str = "zeros",
    spatial_dims: int | None = None,
) -> nnx.Conv:
    """torch.nn.Conv{N}d (stride, padding, dilation, groups as torch takes them) over
    channels-last inputs [B, *spatial, C]. The kernel is [*kernel_size, C / groups, O] (HWIO);
    PyTorch stores [O, C / groups, *kernel_size] and the converters transpose it.
    axes: the logical axes of the input and output channels; spatial_dims: N, needed when
    kernel_size is one int."""
    if padding_mode != "zeros":
        raise NotImplementedError(f"padding_mode={padding_mode!r} is not implemented")
    n = _spatial_dims(kernel_size, spatial_dims)
    kernel_size, dilation = (
        _spatial(kernel_size, n, "kernel_size"),
        _spatial(dilation, n, "dilation"),
    )
    if padding == "same" and any(s != 1 for s in _spatial(stride, n, "stride")):
        raise ValueError("padding='same' is not supported for strided convolutions (as in torch)")
    return nnx.Conv(
        in_features,
        out_features,
        kernel_size,
        strides=_spatial(stride, n, "stride"),
        padding=conv_padding(padding, kernel_size, dilation),
        kernel_dilation=dilation,
        feature_group_count=groups,
        use_bias=use_bias,
        dtype=precision.dtype,
        param_dtype=precision.param_dtype,
        kernel_init=_placeholder,
        bias_init=_placeholder,
        kernel_metadata=_axes(*([None] * n), *axes),
        bias_metadata=_axes(axes[1]),
        rngs=rngs,
    )


class WeightNormConv(nnx.Module):
    """A Conv under torch's weight_norm(conv, dim=dim) (wav2vec2's positional convolution uses
    dim=2, the kernel axis): kernel = weight_g * weight_v / ||weight_v||, the norm taken over
    every axis but `dim`. weight_v is stored like Conv's kernel, [*kernel_size, C / groups, O];
    weight_g has its rank, 1 along every axis but `dim` (torch dims; the layout moves them)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size,
        axes: tuple[str | None, str | None],
        precision: Precision,
        *,
        dim: int,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        use_bias: bool = True,
        spatial_dims: int | None = None,
    ):
        n = _spatial_dims(kernel_size, spatial_dims)
        kernel_size = _spatial(kernel_size, n, "kernel_size")
        self.dilation = _spatial(dilation, n, "dilation")
        self.strides = _spatial(stride, n, "stride")
        self.padding = conv_padding(padding, kernel_size, self.dilation)
        self.groups = groups
        self.dtype = precision.dtype
        torch_shape = (out_features, in_features // groups, *kernel_size)
        if not -len(torch_shape) <= dim < len(torch_shape):
            raise NotImplementedError(f"weight_norm dim={dim!r} is not implemented")
        dim %= len(torch_shape)
        # flax axis j holds torch axis (*range(2, n + 2), 1, 0)[j]
        self.norm_axis = (*range(2, n + 2), 1, 0).index(dim)
        shape = (*kernel_size, in_features // groups, out_features)
        g_shape = tuple(s if j == self.norm_axis else 1 for j, s in enumerate(shape))
        param = precision.param_dtype
        self.weight_g = nnx.Param(_placeholder(None, g_shape, param), **_axes(*([None] * (n + 2))))
        self.weight_v = nnx.Param(_placeholder(None, shape, param), **_axes(*([None] * n), *axes))
        bias = _placeholder(None, (out_features,), param)
        self.bias = nnx.Param(bias, **_axes(axes[1])) if use_bias else nnx.data(None)

    def kernel(self) -> Array:
        v = self.weight_v[...]
        others = tuple(j for j in range(v.ndim) if j != self.norm_axis)
        norm = jnp.sqrt(jnp.sum(jnp.square(v.astype(jnp.float32)), axis=others, keepdims=True))
        return (v * (self.weight_g[...] / norm).astype(v.dtype)).astype(self.dtype)

    def __call__(self, x: Array) -> Array:  # [B, *spatial, C] -> [B, *spatial', O]
        kernel = self.kernel()
        ndim = kernel.ndim
        numbers = jax.lax.ConvDimensionNumbers(
            lhs_spec=(0, ndim - 1, *range(1, ndim - 1)),
            rhs_spec=(ndim - 1, ndim - 2, *range(ndim - 2)),
            out_spec=(0, ndim - 1, *range(1, ndim - 1)),
        )
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel,
            window_strides=self.strides,
            padding=self.padding,
            rhs_dilation=self.dilation,
            dimension_numbers=numbers,
            feature_group_count=self.groups,
        )
        if self.bias is not None:
            y = y + _per_channel(self.bias[...], y.ndim).astype(y.dtype)
        return y


def _per_channel(values: Array, ndim: int) -> Array:
    """[C] -> [1, ..., 1, C], to broadcast over a channels-last array of rank ndim."""
    return values.reshape((1,) * (ndim - 1) + (-1,))


def weight_norm_conv(
    in_features: int, out_features: int, kernel_size, axes, precision: Precision, **options
) -> WeightNormConv:
    return WeightNormConv(in_features, out_features, kernel_size, axes, precision, **options)


class BatchNorm(nnx.Module):
    """torch.nn.BatchNorm{1,2,3}d over channels-last inputs [B, ..., C].

    With use_running_average (model.eval()) it normalises with the running statistics. In
    training it normalises with the batch's mean and biased variance and updates the running
    statistics as torch does: running = (1 - momentum) * running + momentum * batch, with the
    unbiased variance, and counts the batch in num_batches_tracked. momentum is torch's (flax's
    is 1 - torch's); momentum=None is torch's cumulative average (1 / num_batches_tracked)."""

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        precision: Precision,
    ):
        if not track_running_stats:
            raise NotImplementedError("BatchNorm with track_running_stats=False is not implemented")
        self.eps, self.momentum = eps, momentum
        self.dtype = precision.dtype
        self.use_running_average = False
        param, axes = precision.param_dtype, _axes("embed")
        if affine:
            self.scale = nnx.Param(_placeholder(None, (num_features,), param), **axes)
            self.bias = nnx.Param(_placeholder(None, (num_features,), param), **axes)
        else:
            self.scale = self.bias = nnx.data(None)
        self.mean = nnx.BatchStat(_placeholder(None, (num_features,), param), **axes)
        self.var = nnx.BatchStat(_placeholder(None, (num_features,), param), **axes)
        # torch keeps an int64 counter; jax (without x64) holds it as int32, saved as int64
        counter = _placeholder(None, (), jnp.int32)
        self.num_batches_tracked = nnx.BatchStat(
            counter, **_axes(), counter=True, torch_dtype="int64"
        )

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        if self.use_running_average:
            mean, var = self.mean[...].astype(jnp.float32), self.var[...].astype(jnp.float32)
        else:
            reduce = tuple(range(x.ndim - 1))
            count = math.prod(x.shape[:-1])
            if count < 2:
                raise ValueError(
                    f"Expected more than 1 value per channel when training, got input {x.shape}"
                )
            mean = jnp.mean(x32, axis=reduce)
            centred = x32 - _per_channel(mean, x.ndim)
            var = jnp.mean(jnp.square(centred), axis=reduce)  # biased: what normalises
            self._update_statistics(mean, var * (count / (count - 1)))
        mean, var = _per_channel(mean, x.ndim), _per_channel(var, x.ndim)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            scale, bias = (
                _per_channel(p[...].astype(jnp.float32), x.ndim) for p in (self.scale, self.bias)
            )
            y = y * scale + bias
        return y.astype(self.dtype)

    def _update_statistics(self, mean: Array, unbiased_var: Array) -> None:
        tracked = self.num_batches_tracked[...] + 1
        self.num_batches_tracked[...] = tracked
        factor = 1.0 / tracked.astype(jnp.float32) if self.momentum is None else self.momentum
        for stat, batch in ((self.mean, mean), (self.var, unbiased_var)):
            running = stat[...].astype(jnp.float32)
            stat[...] = ((1 - factor) * running + factor * batch).astype(stat[...].dtype)


def batch_norm(num_features: int, precision: Precision, **options) -> BatchNorm:
    return BatchNorm(num_features, precision=precision, **options)


def group_norm(
    num_groups: int, num_channels: int, eps: float, precision: Precision, rngs: nnx.Rngs, *,
    affine: bool = True,
) -> nnx.GroupNorm:  # fmt: skip
    """torch.nn.GroupNorm(num_groups, num_channels) over channels-last inputs [B, *spatial, C]:
    channels split into consecutive groups, each normalised over its channels and every spatial
    position with the biased two-pass variance (statistics in float32), then scaled per channel."""
    if num_channels % num_groups:
        raise ValueError(
            f"num_channels={num_channels} is not a multiple of num_groups={num_groups}"
        )
    return nnx.GroupNorm(
        num_channels,
        num_groups=num_groups,
        epsilon=eps,
        dtype=precision.dtype,
        param_dtype=precision.param_dtype,
        use_bias=affine,
        use_scale=affine,
        scale_init=_placeholder,
        bias_init=_placeholder,
        use_fast_variance=False,
        scale_metadata=_axes("embed"),
        bias_metadata=_axes("embed"),
        rngs=rngs,
    )
