"""Greedy decoding and sampling in one compiled program: prefill, then `lax.while_loop`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from flaxauto.generation.processors import eos_mask, process_scores, prompt_tokens, warp
from flaxauto.generation.settings import Plan

Array = jax.Array


@struct.dataclass
class _Carry:
    tokens: Array  # [B, S] prompt (bucket-padded) then generated tokens
    cache: object  # flaxauto.decoder.KVCache
    position: Array  # [B] position id of the last token fed
    unfinished: Array  # [B] bool
    seen: Array | None  # [B, V] bool: tokens the repetition penalty applies to
    key: Array
    step: Array  # [] int32: tokens generated so far


@functools.partial(jax.jit, static_argnames=("graphdef", "plan", "cache_length"))
def decode(graphdef, plan: Plan, cache_length: int, state, ids, mask, scalars, key):
    """ids, mask [B, P] (left-padded to the bucket P); scalars: prompt length as the caller sees
    it, max_length, min_length. Returns tokens [B, S] and the number of tokens generated."""
    prompt_length, max_length, min_length = scalars[0], scalars[1], scalars[2]
    model = nnx.merge(graphdef, state)
    model.eval()
    batch, prompt_bucket = ids.shape
    cache, position, logits = prefill(model, ids, mask, cache_length)
    tokens = jnp.full((batch, cache_length), plan.pad_token_id, jnp.int32)
    carry = _Carry(
        tokens=jax.lax.dynamic_update_slice(tokens, ids, (0, 0)),
        cache=cache,
        position=position,
        unfinished=jnp.ones((batch,), bool),
        seen=prompt_tokens(ids, mask, logits.shape[-1]) if plan.repetition_penalty != 1 else None,
        key=key,
        step=jnp.zeros((), jnp.int32),
    )

    def choose(carry: _Carry, logits) -> _Carry:
        return _choose(plan, carry, logits, prompt_bucket, prompt_length + carry.step, min_length)

    def more(carry: _Carry):
        return (prompt_length + carry.step < max_length) & jnp.any(carry.unfinished)

    def step(carry: _Carry) -> _Carry:
        last = jax.lax.dynamic_slice_in_dim(carry.tokens, prompt_bucket + carry.step - 1, 1, 1)
        position = carry.position + 1
        cache, logits = next_logits(model, last[:, 0], position, carry.cache)
        return choose(carry.replace(cache=cache, position=position), logits)

    carry = jax.lax.while_loop(more, step, choose(carry, logits))
    return carry.tokens, carry.step


def prefill(model, ids, mask, cache_length: int):
    """Run the prompt ids, mask [B, P] into a new cache. Returns the cache, the position id of
    the last prompt token [B] and the next-token logits [B, V]."""
    backbone = model.backbone
    # transformers' positions for a padded prompt: count real tokens; padding gets 0
    positions = jnp.where(mask == 0, 0, jnp.cumsum(mask, axis=-1) - 1)  # [B, P]
    cache = backbone.init_cache(ids.shape[0], cache_length)
    out = backbone(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache)
    logits = model.head.decode_logits(out.last_hidden_state[:, -1], backbone)  # last only
    return out.cache, positions[:, -1], logits


def next_logits(model, token, position, cache):
    """Feed one token per row (token, position [R]). Returns the cache and the logits [R, V]."""
    backbone = model.backbone
    out = backbone(
        input_ids=token[:, None],  # [R, 1]
        attention_mask=jnp.ones((token.shape[0], 1), jnp.int32),
        position_ids=position[:, None],
        cache=cache,
    )
    return out.cache, model.head.decode_logits(out.last_hidden_state[:, 0], backbone)


def _choose(plan: Plan, carry: _Carry, logits, prompt_bucket, length, min_length) -> _Carry:
    """Process the scores as transformers' logits processors do (in their order), pick the next
    token, append it, update what has finished."""
    scores = process_scores(plan, logits.astype(jnp.float32), carry.seen, length, min_length)
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
    tokens = jax.lax.dynamic_update_slice(
        carry.tokens, token[:, None], (0, prompt_bucket + carry.step)
    )
    return carry.replace(
        tokens=tokens, unfinished=unfinished, seen=seen, key=key, step=carry.step + 1
    )
