"""transformers' logits processors and warpers, as pure functions of [rows, vocab] scores."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxauto.generation.settings import Plan

Array = jax.Array


def prompt_tokens(ids, mask, vocab: int) -> Array:
    """[B, V] bool: prompt tokens from the first real one on (transformers' repetition penalty
    skips left padding)."""
    first = jnp.argmax(mask != 0, axis=-1)  # [B]
    counted = jnp.arange(ids.shape[1])[None, :] >= first[:, None]
    columns = jnp.where(counted, jnp.clip(ids, 0, vocab), vocab)  # uncounted -> spare column
    rows = jnp.arange(ids.shape[0])[:, None]
    seen = jnp.zeros((ids.shape[0], vocab + 1), bool).at[rows, columns].set(True)
    return seen[:, :vocab]


def eos_mask(plan: Plan, vocab: int) -> Array:
    """[V] bool: the end-of-sequence tokens."""
    return jnp.isin(jnp.arange(vocab), jnp.asarray(plan.eos_token_ids, jnp.int32))


def process_scores(plan: Plan, scores, seen, length, min_length) -> Array:
    """Scores [R, V] (logits, or log-probabilities for beam search) through transformers' logits
    processors, in their order; `length`: tokens in each row so far, prompt included."""
    if plan.repetition_penalty != 1:
        penalised = jnp.where(
            scores < 0, scores * plan.repetition_penalty, scores / plan.repetition_penalty
        )
        scores = jnp.where(seen, penalised, scores)
    if plan.eos_token_ids:  # min_length / min_new_tokens: no eos before the minimum
        is_eos = eos_mask(plan, scores.shape[-1])
        scores = jnp.where((length < min_length) & is_eos[None, :], -jnp.inf, scores)
    return scores


def warp(plan: Plan, scores) -> Array:
    """Temperature, then top-k, then top-p (nucleus), as transformers' warpers."""
    if plan.temperature != 1.0:
        scores = scores / plan.temperature
    if plan.top_k:
        kth = jax.lax.top_k(scores, min(plan.top_k, scores.shape[-1]))[0][:, -1:]  # [B, 1]
        scores = jnp.where(scores < kth, -jnp.inf, scores)
    if plan.top_p < 1.0:
        order = jnp.argsort(scores, axis=-1)  # ascending
        ascending = jnp.take_along_axis(scores, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
        drop = cumulative <= 1 - plan.top_p
        drop = drop.at[:, -1].set(False)  # always keep the most likely token
        drop = jnp.take_along_axis(drop, jnp.argsort(order, axis=-1), axis=-1)
        scores = jnp.where(drop, -jnp.inf, scores)
    return scores
