"""Rotary position embeddings as transformers computes them (modeling_rope_utils.py).

transformers 5 keeps the rope settings in `config.rope_parameters` (rope_type, rope_theta,
factor, ...); a legacy `rope_scaling` in config.json is folded into it by the config class. The
types implemented here are "default", "linear", "dynamic" (NTK) and "llama3"; anything else
raises NotImplementedError naming the attribute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass(frozen=True)
class Rope:
    """The rope settings a model needs at run time (hashable: part of the compiled program)."""

    rope_type: str
    theta: float
    dim: int  # rotated features per head: the whole head_dim
    max_position_embeddings: int
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 1.0
    original_max_position_embeddings: int = 0


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
    extra = {k: params[k] for k in _REQUIRED[rope_type]}
    return Rope(
        rope_type=rope_type,
        theta=float(theta),
        dim=head_dim,
        max_position_embeddings=config.max_position_embeddings,
        **extra,
    )


def _base_frequencies(theta, dim: int):
    # float32 as transformers computes them: theta ** (2i / dim), i = 0 .. dim/2 - 1
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return 1.0 / (theta**exponents)


def _llama3(rope: Rope, inv_freq: np.ndarray) -> np.ndarray:
    """Llama 3.1: keep high frequencies, divide low ones by factor, interpolate in between."""
    old_context = rope.original_max_position_embeddings
    low_wavelen = old_context / rope.low_freq_factor
    high_wavelen = old_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def inverse_frequencies(rope: Rope, seq_len: Array | None = None) -> Array:
    """[dim / 2] float32. For "dynamic", seq_len (a traced scalar: max position + 1 of the
    current forward) stretches the base once it passes max_position_embeddings."""
    if rope.rope_type == "dynamic":
        if seq_len is None:
            raise ValueError("dynamic rope needs the sequence length")
        # transformers recomputes inv_freq from max(position_ids) + 1 whenever it grows past the
        # trained length; at or below it the formula gives the base theta back.
        max_pos = rope.max_position_embeddings
        length = jnp.maximum(jnp.asarray(seq_len, jnp.float32), max_pos)
        stretch = (rope.factor * length / max_pos) - (rope.factor - 1)
        theta = rope.theta * stretch ** (rope.dim / (rope.dim - 2))
        exponents = jnp.arange(0, rope.dim, 2, dtype=jnp.float32) / rope.dim
        return 1.0 / (theta**exponents)
    inv_freq = _base_frequencies(rope.theta, rope.dim)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / np.float32(rope.factor)
    elif rope.rope_type == "llama3":
        inv_freq = _llama3(rope, inv_freq)
    return jnp.asarray(inv_freq, jnp.float32)


def cos_sin(rope: Rope, position_ids: Array, dtype) -> tuple[Array, Array]:
    """position_ids [B or 1, T] -> cos, sin [B or 1, T, dim] in the compute dtype."""
    seq_len = jnp.max(position_ids) + 1 if rope.rope_type == "dynamic" else None
    inv_freq = inverse_frequencies(rope, seq_len)
    angles = position_ids.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, dim]: halves share frequencies
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def _rotate_half(x: Array) -> Array:
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-second, first], axis=-1)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """x [B, T, H, D]; cos, sin [B or 1, T, D] (the same rotation for every head)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + _rotate_half(x) * sin
