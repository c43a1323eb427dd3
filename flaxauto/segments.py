"""Segmented tensors for tables: index maps and reductions over segments (TAPAS' cells, columns,
rows), written for jax.jit.

An IndexMap says which segment each entry of a tensor belongs to. Its first `batch_dims` axes are
batch axes: segments of different batch rows are distinct even when their ids are equal. The
reductions return one value per segment [B..., num_segments, V...] and the index of that result
(range_index_map), as transformers.models.tapas.modeling_tapas computes them: empty segments give
0, and values are reduced in float32 and cast back to their dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class IndexMap:
    """indices [B..., I...] in [0, num_segments); the first batch_dims axes are batch axes."""

    indices: jax.Array
    num_segments: int = struct.field(pytree_node=False)
    batch_dims: int = struct.field(pytree_node=False, default=0)

    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.indices.shape[: self.batch_dims])


@struct.dataclass
class ProductIndexMap(IndexMap):
    """Pairs (outer, inner) numbered outer * inner.num_segments + inner: rows x columns -> cells."""

    outer_segments: int = struct.field(pytree_node=False, default=1)
    inner_segments: int = struct.field(pytree_node=False, default=1)

    def project_outer(self, index: IndexMap) -> IndexMap:
        """The outer component of an index over the same (product) segment set."""
        return IndexMap(index.indices // self.inner_segments, self.outer_segments, index.batch_dims)

    def project_inner(self, index: IndexMap) -> IndexMap:
        """The inner component of an index over the same (product) segment set."""
        return IndexMap(index.indices % self.inner_segments, self.inner_segments, index.batch_dims)


def index_map(indices, num_segments: int, batch_dims: int = 0) -> IndexMap:
    return IndexMap(jnp.asarray(indices), int(num_segments), batch_dims)


def product_index(outer: IndexMap, inner: IndexMap) -> ProductIndexMap:
    if outer.batch_dims != inner.batch_dims:
        raise ValueError("outer and inner index maps must have the same batch_dims")
    return ProductIndexMap(
        indices=inner.indices + outer.indices * inner.num_segments,
        num_segments=outer.num_segments * inner.num_segments,
        batch_dims=inner.batch_dims,
        outer_segments=outer.num_segments,
        inner_segments=inner.num_segments,
    )


def range_index_map(batch_shape: tuple[int, ...], num_segments: int) -> IndexMap:
    """The index [B..., num_segments] whose entries are 0, 1, ..., num_segments - 1."""
    indices = jnp.broadcast_to(jnp.arange(num_segments), (*batch_shape, num_segments))
    return IndexMap(indices, int(num_segments), len(batch_shape))


def flatten(index: IndexMap) -> IndexMap:
    """One index over all batch rows [N]: row k's segments are shifted by k * num_segments."""
    batch_size = math.prod(index.batch_shape())
    offset = jnp.arange(batch_size).reshape(index.batch_shape()) * index.num_segments
    offset = offset.reshape(offset.shape + (1,) * (index.indices.ndim - index.batch_dims))
    return IndexMap((offset + index.indices).reshape(-1), index.num_segments * batch_size, 0)


def gather(values: jax.Array, index: IndexMap) -> jax.Array:
    """values [B..., S, V...] looked up per entry of index [B..., I...] -> [B..., I..., V...]."""
    batch_shape = index.batch_shape()
    flat_values = values.reshape(-1, *values.shape[len(batch_shape) :])  # [N, S, V...]
    flat_indices = index.indices.reshape(-1, *index.indices.shape[len(batch_shape) :])
    picked = jax.vmap(lambda v, i: v[i])(flat_values, flat_indices)  # [N, I..., V...]
    return picked.reshape(*batch_shape, *picked.shape[1:])


def _reduce(values, index: IndexMap, how: str):
    flat_index = flatten(index)
    vector_shape = values.shape[index.indices.ndim :]
    flat_values = values.reshape(-1, *vector_shape).astype(jnp.float32)  # [N, V...]
    ids, count = flat_index.indices, flat_index.num_segments
    if how == "sum":
        reduced = jax.ops.segment_sum(flat_values, ids, count)
    else:
        members = jax.ops.segment_sum(jnp.ones(ids.shape, jnp.float32), ids, count)
        members = members.reshape(-1, *(1,) * len(vector_shape))
        if how == "mean":
            reduced = jax.ops.segment_sum(flat_values, ids, count) / jnp.maximum(members, 1.0)
        else:
            segment_op = jax.ops.segment_max if how == "max" else jax.ops.segment_min
            # torch leaves an empty segment at its initial 0 (scatter_reduce, include_self=False)
            reduced = jnp.where(members > 0, segment_op(flat_values, ids, count), 0.0)
    shape = (*index.batch_shape(), index.num_segments, *vector_shape)
    output = reduced.reshape(shape).astype(values.dtype)
    return output, range_index_map(index.batch_shape(), index.num_segments)


def reduce_sum(values, index: IndexMap):
    """Sum per segment: values [B..., I..., V...] -> ([B..., S, V...], range index); 0 if empty."""
    return _reduce(values, index, "sum")


def reduce_mean(values, index: IndexMap):
    """Mean per segment (0 for an empty segment)."""
    return _reduce(values, index, "mean")


def reduce_max(values, index: IndexMap):
    """Maximum per segment (0 for an empty segment, as transformers' scatter_reduce leaves it)."""
    return _reduce(values, index, "max")


def reduce_min(values, index: IndexMap):
    """Minimum per segment (0 for an empty segment)."""
    return _reduce(values, index, "min")


__all__ = [
    "IndexMap",
    "ProductIndexMap",
    "flatten",
    "gather",
    "index_map",
    "product_index",
    "range_index_map",
    "reduce_max",
    "reduce_mean",
    "reduce_min",
    "reduce_sum",
]
