"""Rotary position embeddings as transformers computes them (modeling_rope_utils.py).

transformers 5 keeps the rope settings in `config.rope_parameters` (rope_type, rope_theta,
factor, ...); a legacy `rope_scaling` in config.json is folded into it by the config class. The
types implemented here are "default", "linear", "dynamic" (NTK), "llama3", "yarn" and
"longrope"; anything else raises NotImplementedError naming the attribute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
}


@dataclass(frozen=True)
class Rope:
    """The rope settings a model needs at run time (hashable: part of the compiled program).

    Every type but "dynamic" has its frequencies fixed by the config, computed once here in
    float32 as transformers computes them; "dynamic" recomputes them from the sequence length."""

    rope_type: str
    inv_freq: tuple[float, ...]  # [dim / 2] float32 values
    attention_factor: float = 1.0  # cos and sin are scaled by it (yarn, longrope)
    # longrope: past `switch_length` positions, every position uses `long_inv_freq`
    long_inv_freq: tuple[float, ...] | None = None
    switch_length: int = 0
    # dynamic NTK: the base and length the frequencies are stretched from
    theta: float = 0.0
    factor: float = 1.0
    max_position_embeddings: int = 0


def rope_from_config(config, head_dim: int) -> Rope:
    """Read and check config.rope_parameters; refuse what is not implemented."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    layer_types = set(getattr(config, "layer_types", None) or ())
    if layer_types & set(params):
        raise NotImplementedError(
            f"rope_parameters per layer type ({sorted(layer_types & set(params))}) is not "
            f"implemented for {config.model_type}"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise NotImplementedError(
            f"rope_parameters['rope_type']={rope_type!r} is not implemented; supported: "
            f"{list(ROPE_TYPES)}"
        )
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if partial not in (None, 1, 1.0):
        raise NotImplementedError(f"partial_rotary_factor={partial!r} is not implemented")
    missing = [k for k in _REQUIRED[rope_type] if params.get(k) is None]
    if missing:
        raise ValueError(f"rope_parameters of type {rope_type!r} lack {missing}")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("rope_parameters lack rope_theta")
    inv_freq = 1.0 / _wavelength_powers(float(theta), head_dim)
    extra = {}
    if rope_type == "linear":
        inv_freq = inv_freq / np.float32(params["factor"])
    elif rope_type == "llama3":
        inv_freq = _llama3(params, inv_freq)
    elif rope_type == "yarn":
        inv_freq, extra["attention_factor"] = _yarn(params, float(theta), head_dim)
    elif rope_type == "longrope":
        inv_freq, extra = _longrope(params, float(theta), head_dim, config.max_position_embeddings)
    elif rope_type == "dynamic":
        extra = dict(theta=float(theta), factor=float(params["factor"]))
    return Rope(
        rope_type=rope_type,
        inv_freq=_values(inv_freq),
        max_position_embeddings=config.max_position_embeddings,
        **extra,
    )


def _values(inv_freq: np.ndarray) -> tuple[float, ...]:
    """float32 values as Python floats (exact both ways), so that Rope stays hashable."""
    return tuple(float(x) for x in np.asarray(inv_freq, np.float32))


def _wavelength_powers(theta, dim: int) -> np.ndarray:
    """theta ** (2i / dim), i = 0 .. dim/2 - 1, in float32 as transformers computes them: the
    base inverse frequencies are their reciprocals, which yarn and longrope scale first."""
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return theta**exponents


def _llama3(params: dict, inv_freq: np.ndarray) -> np.ndarray:
    """Llama 3.1: keep high frequencies, divide low ones by factor, interpolate in between."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_context = params["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(params: dict, theta: float, dim: int) -> tuple[np.ndarray, float]:
    """YaRN: interpolated (divided by factor) low frequencies, extrapolated (kept) high ones, a
    linear ramp between the dimensions that turn beta_slow and beta_fast times over the original
    context; cos and sin scaled by the attention factor."""
    factor, old_context = params["factor"], params["original_max_position_embeddings"]
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _mscale(factor, mscale) / _mscale(factor, mscale_all_dim)
        else:
            attention_factor = _mscale(factor)
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def dimension(rotations):  # the dimension that turns `rotations` times over old_context
        return dim * math.log(old_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension(beta_fast), dimension(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    kept = (1 - ramp).astype(np.float32)  # 1: extrapolate (keep), 0: interpolate
    powers = _wavelength_powers(theta, dim)
    kept_freq, divided_freq = 1.0 / powers, 1.0 / (factor * powers)
    inv_freq = divided_freq * (1 - kept) + kept_freq * kept
    return inv_freq.astype(np.float32), float(attention_factor)


def _longrope(params: dict, theta: float, dim: int, max_position_embeddings: int):
    """LongRoPE (Phi-3 style): per-frequency factors, `short_factor` up to the original context
    and `long_factor` once the sequence passes it; cos and sin scaled by the attention factor."""
    old_context = params["original_max_position_embeddings"]
    for name in ("short_factor", "long_factor"):
        if len(params[name]) != dim // 2:
            raise ValueError(f"rope_parameters[{name!r}] needs {dim // 2} values")
    factor = params.get("factor") or max_position_embeddings / old_context
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = (
            1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_context))
        )
    powers = _wavelength_powers(theta, dim)

    def frequencies(name):
        return 1.0 / (np.asarray(params[name], np.float32) * powers)

    return frequencies("short_factor"), dict(
        long_inv_freq=_values(frequencies("long_factor")),
        switch_length=int(old_context),
        attention_factor=float(attention_factor),
    )


def inverse_frequencies(rope: Rope, seq_len: Array | None = None) -> Array:
    """[dim / 2] float32. seq_len (a traced scalar: max position + 1 of the current forward)
    matters to "dynamic", which stretches the base once it passes max_position_embeddings, and
    to "longrope", which switches to its long factors past the original context."""
    if rope.rope_type == "dynamic":
        if seq_len is None:
            raise ValueError("dynamic rope needs the sequence length")
        # transformers recomputes inv_freq from max(position_ids) + 1 whenever it grows past the
        # trained length; at or below it the formula gives the base theta back.
        dim, max_pos = 2 * len(rope.inv_freq), rope.max_position_embeddings
        length = jnp.maximum(jnp.asarray(seq_len, jnp.float32), max_pos)
        stretch = (rope.factor * length / max_pos) - (rope.factor - 1)
        theta = rope.theta * stretch ** (dim / (dim - 2))
        exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
        return 1.0 / (theta**exponents)
    inv_freq = jnp.asarray(rope.inv_freq, jnp.float32)
    if rope.long_inv_freq is not None:
        long = jnp.asarray(rope.long_inv_freq, jnp.float32)
        inv_freq = jnp.where(seq_len > rope.switch_length, long, inv_freq)
    return inv_freq


def cos_sin(rope: Rope, position_ids: Array, dtype) -> tuple[Array, Array]:
    """position_ids [B or 1, T] -> cos, sin [B or 1, T, dim] in the compute dtype."""
    seq_len = jnp.max(position_ids) + 1 if rope.rope_type in ("dynamic", "longrope") else None
    inv_freq = inverse_frequencies(rope, seq_len)
    angles = position_ids.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, dim]: halves share frequencies
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if rope.attention_factor != 1.0:  # scaled in float32, before the cast, as transformers does
        cos, sin = cos * rope.attention_factor, sin * rope.attention_factor
    return cos.astype(dtype), sin.astype(dtype)


def _rotate_half(x: Array) -> Array:
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-second, first], axis=-1)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """x [B, T, H, D]; cos, sin [B or 1, T, D] (the same rotation for every head)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + _rotate_half(x) * sin
