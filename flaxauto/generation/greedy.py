"""Greedy decoding and sampling in one compiled program: the model's `start`, then its `step`
inside `lax.while_loop` (the decoding protocol, flaxauto.decoding)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from flaxauto.generation.outputs import new_record, record
from flaxauto.generation.processors import (
    History,
    eos_mask,
    process_scores,
    prompt_tokens,
    warp,
)
from flaxauto.generation.settings import Plan

Array = jax.Array


@struct.dataclass
class _Carry:
    tokens: Array  # [B, S] prompt (bucket-padded) then generated tokens
    decoding: object  # the model's flaxauto.decoding.DecodingState
    unfinished: Array  # [B] bool
    seen: Array | None  # [B, V] bool: tokens the repetition penalty applies to
    key: Array
    step: Array  # [] int32: tokens generated so far
    record: dict | None  # [S - P, B, V] buffers: each step's scores and/or logits


@functools.partial(jax.jit, static_argnames=("plan", "cache_length"))
def decode(model, plan: Plan, cache_length: int, ids, mask, scalars, key, encoder_inputs):
    """model: the flaxauto model, passed as a pytree (its arrays are the program's arguments);
    ids, mask [B, P] (left-padded to the bucket P); scalars: prompt length as the caller sees
    it, max_length, min_length; encoder_inputs: an encoder-decoder's encoder inputs (a dict of
    arrays, empty for a causal LM), which the model's start runs once. Returns tokens [B, S], the number of tokens generated and the
    record: under plan.output_scores / output_logits each step's processed scores / raw logits
    ([S - P, B, V] under "scores" / "logits"), else None."""
    prompt_length, max_length = scalars[0], scalars[1]
    model.eval()  # the traced copy: the caller's model keeps its mode
    batch, prompt_bucket = ids.shape
    decoding, logits = model.start(ids, mask, cache_length=cache_length, **encoder_inputs)
    tokens = jnp.full((batch, cache_length), plan.pad_token_id, jnp.int32)
    steps = cache_length - prompt_bucket  # the most tokens the buffer takes
    carry = _Carry(
        tokens=jax.lax.dynamic_update_slice(tokens, ids, (0, 0)),
        decoding=decoding,
        unfinished=jnp.ones((batch,), bool),
        seen=prompt_tokens(ids, mask, logits.shape[-1]) if plan.repetition_penalty != 1 else None,
        key=key,
        step=jnp.zeros((), jnp.int32),
        record=new_record(plan.output_scores, plan.output_logits, steps, batch, logits.shape[-1]),
    )

    def choose(carry: _Carry, logits) -> _Carry:
        return _choose(plan, carry, logits, prompt_bucket, scalars)

    def more(carry: _Carry):
        return (prompt_length + carry.step < max_length) & jnp.any(carry.unfinished)

    def step(carry: _Carry) -> _Carry:
        last = jax.lax.dynamic_index_in_dim(carry.tokens, prompt_bucket + carry.step - 1, 1, False)
        decoding, logits = model.step(carry.decoding, last)
        return choose(carry.replace(decoding=decoding), logits)

    carry = jax.lax.while_loop(more, step, choose(carry, logits))
    return carry.tokens, carry.step, carry.record


def _choose(plan: Plan, carry: _Carry, logits, prompt_bucket: int, scalars) -> _Carry:
    """Process the scores as transformers' logits processors do (in their order), pick the next
    token, append it, update what has finished."""
    prompt_length, max_length, min_length = scalars[0], scalars[1], scalars[2]
    end = prompt_bucket + carry.step
    history = History(
        tokens=carry.tokens,
        first=prompt_bucket - prompt_length,
        end=end,
        seen=carry.seen,
        prompt_length=prompt_length,
        max_length=max_length,
        min_length=min_length,
    )
    scores = process_scores(plan, logits.astype(jnp.float32), history)
    is_eos = eos_mask(plan, scores.shape[-1])  # [V]
    key, sample_key = jax.random.split(carry.key)
    if plan.do_sample:
        scores = warp(plan, scores)
        token = jax.random.categorical(sample_key, scores, axis=-1)
    else:
        token = jnp.argmax(scores, axis=-1)
    token = token.astype(jnp.int32)
    unfinished = carry.unfinished
    if plan.eos_token_ids:
        token = jnp.where(unfinished, token, plan.pad_token_id)
        unfinished = unfinished & ~is_eos[token]
    seen = carry.seen
    if seen is not None:
        seen = seen.at[jnp.arange(token.shape[0]), token].set(True)
    return carry.replace(
        tokens=jax.lax.dynamic_update_slice(carry.tokens, token[:, None], (0, end)),
        unfinished=unfinished,
        seen=seen,
        key=key,
        step=carry.step + 1,
        # transformers keeps the scores the token was chosen from, and the raw logits
        record=record(carry.record, carry.step, scores=scores, logits=logits),
    )
