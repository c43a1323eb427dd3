"""Beam search, as transformers' `generate(num_beams=N, do_sample=False)` decides it, in one
compiled program that drives the model through the decoding protocol (flaxauto.decoding).

The model starts once per prompt row and its state is copied to the row's N beams (`reorder`);
then every step runs inside `lax.while_loop`: one token for each of the B * N running beams, the
best continuations kept, the state of each beam taken from the beam it continues (`reorder`). Each step keeps
the top K = max(2, 1 + number of eos tokens) * N continuations of each row, so that N of them
still run when up to N * (number of eos tokens) end, and up to N ended ones enter the row's N best
finished hypotheses, scored by sum of log-probabilities / generated length ** length_penalty.

The search stops as transformers' does: at max_length; under `early_stopping=True` once every
row holds N finished hypotheses; else once no row can improve, a row being done when its N
hypotheses are finished and its best running beam, scored at its current length (at max_length
under "never" with length_penalty > 0), cannot beat the worst of them. The bookkeeping (-1e9
added to the scores of excluded candidates, float32 divisions rounded as PyTorch rounds them)
follows transformers step by step, so that the same beams win.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from flaxauto.generation.outputs import new_record, record
from flaxauto.generation.processors import History, eos_mask, process_scores, prompt_tokens
from flaxauto.generation.settings import Plan, Prompt

Array = jax.Array

#: transformers' score for a hypothesis left out (finished, or not allowed to finish): large and
#: finite, so that several exclusions add up and still sort.
EXCLUDED = -1.0e9


@struct.dataclass
class BeamSettings:
    """Beam settings read at run time: other values reuse the compiled program."""

    penalties: Array  # [S + 1] float32: generated length g -> g ** length_penalty
    stop_when_full: Array  # [] bool: early_stopping=True
    score_at_max_length: Array  # [] bool: early_stopping="never" with length_penalty > 0
    fill_token_id: Array  # [] int32: what a hypothesis holds after its end


@struct.dataclass
class _Beams:
    running: Array  # [B, N, S] token buffer of the running beams (prompt bucket first)
    running_scores: Array  # [B, N] summed log-probabilities, best first
    finished: Array  # [B, N, S] the best finished hypotheses so far, best first
    finished_scores: Array  # [B, N] their length-penalised scores (EXCLUDED: an empty slot)
    finished_lengths: Array  # [B, N] int32: tokens each generated
    is_finished: Array  # [B, N] bool: the slot holds a finished hypothesis
    improvable: Array  # [B] bool: a running beam may still beat a finished one
    all_end: Array  # [] bool: every continuation kept at the last step ended
    decoding: object  # the model's DecodingState over B * N rows, row b * N + n: beam n of row b
    parents: Array  # [B * N] int32: the row of `decoding` each running beam continues
    seen: Array | None  # [B * N, V] bool: tokens the repetition penalty applies to
    step: Array  # [] int32: tokens generated so far
    record: dict | None  # [S - P, B * N, V] buffers: each step's scores and/or logits
    # plan.beam_indices: [B, N, S - P] int32, the row (b * N + n) each token of a running /
    # finished hypothesis was chosen from, -1 after its end
    running_beams: Array | None
    finished_beams: Array | None


def beam_settings(config, plan: Plan, cache_length: int) -> BeamSettings:
    early = config.early_stopping  # transformers validates it: True, False or "never"
    eos = plan.eos_token_ids
    # transformers fills with pad_token_id, or with the first eos where pad is 0 or unset (its
    # `pad or eos[0]` takes a pad id of 0 for unset); -1 without eos, never seen then: every
    # hypothesis runs to max_length
    fill = (config.pad_token_id or eos[0]) if eos else -1
    # the divisors rounded to float32 from a double, as transformers' Python scalars are: a
    # float32 power can differ in the last bit and flip a close ranking
    penalty = config.length_penalty
    penalties = np.ones(cache_length + 1, np.float32)
    penalties[1:] = [g**penalty for g in range(1, cache_length + 1)]
    return BeamSettings(
        penalties=jnp.asarray(penalties),
        stop_when_full=jnp.asarray(early is True),  # transformers' test: 1 acts as False
        score_at_max_length=jnp.asarray(early == "never" and penalty > 0),
        fill_token_id=jnp.asarray(fill, jnp.int32),
    )


def generate(model, config, plan: Plan, prompt: Prompt, encoder_inputs=None):
    """-> (token ids [B * num_return_sequences, prompt + generated], each row's best first;
    their scores [B * num_return_sequences]; under plan.beam_indices the row each of their tokens
    was chosen from [B * num_return_sequences, generated], else None; the number of steps run;
    under plan.output_scores / output_logits each step's processed log-probabilities / raw
    logits ([S - P, B * num_beams, V] under "scores" / "logits"), else None)."""
    settings = beam_settings(config, plan, prompt.cache_length)
    tokens, finished_scores, lengths, beams, steps, kept = _search(
        model, plan, int(config.num_beams), prompt.cache_length, prompt.ids,
        prompt.mask, prompt.scalars, settings, encoder_inputs or {},
    )  # fmt: skip
    returned = config.num_return_sequences or 1
    tokens = tokens[:, :returned].reshape(-1, tokens.shape[-1])  # [B * R, S]
    generated = int(jnp.max(lengths[:, :returned]))
    sequences = tokens[:, prompt.padding : prompt.ids.shape[1] + generated]
    if beams is not None:  # [B * R, generated]
        beams = beams[:, :returned].reshape(-1, beams.shape[-1])[:, :generated]
    return sequences, finished_scores[:, :returned].reshape(-1), beams, int(steps), kept


@functools.partial(jax.jit, static_argnames=("plan", "num_beams", "cache_length"))
def _search(model, plan, num_beams: int, cache_length: int, ids, mask, scalars,
            settings: BeamSettings, encoder_inputs):  # fmt: skip
    """ids, mask [B, P] (left-padded to the bucket P); scalars: prompt length as the caller sees
    it, max_length, min_length; encoder_inputs: an encoder-decoder's (empty for a causal LM):
    the encoder runs once per prompt row, before the state is copied to the beams. Returns the finished hypotheses [B, N, S] (best first), their
    scores and generated lengths [B, N], their beam indices (or None), the number of steps run and
    the record of each step (see `generate`)."""
    prompt_length, max_length = scalars[0], scalars[1]
    model.eval()  # the traced copy (the model is a pytree argument): the caller's keeps its mode
    batch, prompt_bucket = ids.shape
    n = num_beams
    decoding, logits = model.start(ids, mask, cache_length=cache_length, **encoder_inputs)
    every_beam = jnp.repeat(jnp.arange(batch), n)  # [B * N]: the row each beam belongs to
    tokens = jnp.full((batch, n, cache_length), settings.fill_token_id, jnp.int32)
    tokens = tokens.at[:, :, :prompt_bucket].set(
        jnp.broadcast_to(ids[:, None], (batch, n, prompt_bucket))
    )
    # only beam 0 is live at first: its copies would otherwise pick the same continuations
    first_only = jnp.where(jnp.arange(n) == 0, 0.0, EXCLUDED).astype(jnp.float32)
    steps = cache_length - prompt_bucket  # the most tokens the buffer takes
    beams = jnp.full((batch, n, steps), -1, jnp.int32) if plan.beam_indices else None
    seen = None
    if plan.repetition_penalty != 1:
        seen = prompt_tokens(ids, mask, logits.shape[-1])[every_beam]
    carry = _Beams(
        running=tokens,
        running_scores=jnp.broadcast_to(first_only[None, :], (batch, n)),
        finished=tokens,
        finished_scores=jnp.full((batch, n), EXCLUDED, jnp.float32),
        finished_lengths=jnp.zeros((batch, n), jnp.int32),
        is_finished=jnp.zeros((batch, n), bool),
        improvable=jnp.ones((batch,), bool),
        all_end=jnp.zeros((), bool),
        decoding=model.reorder(decoding, every_beam),
        parents=jnp.arange(batch * n, dtype=jnp.int32),
        seen=seen,
        step=jnp.zeros((), jnp.int32),
        record=new_record(
            plan.output_scores, plan.output_logits, steps, batch * n, logits.shape[-1]
        ),
        running_beams=beams,
        finished_beams=beams,
    )

    def select(carry: _Beams, logits) -> _Beams:
        return _select(plan, settings, carry, logits, prompt_bucket, scalars)

    def more(carry: _Beams):
        everyone_done = jnp.all(carry.is_finished) & settings.stop_when_full
        return (
            (prompt_length + carry.step < max_length)
            & jnp.any(carry.improvable)
            & ~everyone_done
            & ~carry.all_end
        )

    def step(carry: _Beams) -> _Beams:
        last = jax.lax.dynamic_index_in_dim(carry.running, prompt_bucket + carry.step - 1, 2, False)
        # each running beam's state is that of the beam it continues
        decoding = model.reorder(carry.decoding, carry.parents)
        decoding, logits = model.step(decoding, last.reshape(-1))
        return select(carry.replace(decoding=decoding), logits)

    carry = jax.lax.while_loop(more, step, select(carry, jnp.repeat(logits, n, axis=0)))
    return (
        carry.finished, carry.finished_scores, carry.finished_lengths, carry.finished_beams,
        carry.step, carry.record,
    )  # fmt: skip


def _gather(x: Array, index: Array) -> Array:
    """x [B, M, ...], index [B, J] -> [B, J, ...]: each row's entries at its own indices."""
    return jax.vmap(lambda row, i: row[i])(x, index)


def _select(plan, settings: BeamSettings, carry: _Beams, logits, prompt_bucket, scalars):
    """One beam search step from the next-token logits [B * N, V] of the running beams."""
    prompt_length, max_length, min_length = scalars[0], scalars[1], scalars[2]
    batch, n, _ = carry.running.shape
    length = prompt_length + carry.step  # tokens in each running beam, prompt included
    generated = carry.step + 1  # tokens each continuation will have generated

    # transformers' processors see log-probabilities in beam search
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B * N, V]
    history = History(
        tokens=carry.running.reshape(batch * n, -1),
        first=prompt_bucket - prompt_length,
        end=prompt_bucket + carry.step,
        seen=carry.seen,
        prompt_length=prompt_length,
        max_length=max_length,
        min_length=min_length,
    )
    log_probs = process_scores(plan, log_probs, history)
    # transformers keeps the processed log-probabilities, and the raw logits
    recorded = record(carry.record, carry.step, scores=log_probs, logits=logits)
    vocab = log_probs.shape[-1]
    totals = log_probs.reshape(batch, n, vocab) + carry.running_scores[:, :, None]
    kept = n * max(2, 1 + len(plan.eos_token_ids))  # K, see the module docstring
    scores, flat = jax.lax.top_k(totals.reshape(batch, n * vocab), kept)  # [B, K]
    parent, token = flat // vocab, flat % vocab  # [B, K]
    candidates = _gather(carry.running, parent)  # [B, K, S]
    candidates = jax.lax.dynamic_update_slice(
        candidates, token[:, :, None], (0, 0, prompt_bucket + carry.step)
    )
    from_row = parent + jnp.arange(batch)[:, None] * n  # [B, K]: the B * N row continued
    candidate_beams = None
    if carry.running_beams is not None:
        candidate_beams = jax.lax.dynamic_update_slice(
            _gather(carry.running_beams, parent), from_row[:, :, None], (0, 0, carry.step)
        )
    ends = eos_mask(plan, vocab)[token] | (length + 1 >= max_length)  # [B, K]

    # the N best continuations that did not end run on
    alive = scores + ends.astype(jnp.float32) * EXCLUDED
    running_scores, keep = jax.lax.top_k(alive, n)  # [B, N]
    running = _gather(candidates, keep)
    rows = _gather(from_row, keep).reshape(-1)  # [B * N]
    seen = carry.seen
    if seen is not None:
        new_token = _gather(token, keep).reshape(-1)
        seen = seen[rows].at[jnp.arange(rows.shape[0]), new_token].set(True)

    penalty = settings.penalties[generated]
    finished = _merge_finished(settings, carry, candidates, candidate_beams, scores, ends, penalty)
    carry = carry.replace(
        running_beams=None if candidate_beams is None else _gather(candidate_beams, keep),
        running=running,
        running_scores=running_scores,
        all_end=jnp.all(ends),
        parents=rows,
        seen=seen,
        step=carry.step + 1,
        record=recorded,
        **finished,
    )
    return carry.replace(improvable=_improvable(settings, carry, scalars))


def _merge_finished(
    settings: BeamSettings, carry: _Beams, candidates, candidate_beams, scores, ends, penalty
) -> dict:
    """Keep the N best of the finished hypotheses and the continuations that just ended (among
    the N best only; none where the row is full under early_stopping=True or cannot improve)."""
    batch, n = carry.finished_scores.shape
    k = scores.shape[1]
    just_ended = ends & (jnp.arange(k) < n)[None, :]  # [B, K]
    final = scores / penalty
    # each exclusion added separately, in transformers' order: the float sums must agree
    full = jnp.all(carry.is_finished, axis=1, keepdims=True) & settings.stop_when_full
    final = final + full.astype(jnp.float32) * EXCLUDED
    final = final + (~carry.improvable)[:, None].astype(jnp.float32) * EXCLUDED
    final = final + (~just_ended).astype(jnp.float32) * EXCLUDED
    merged = jnp.concatenate([carry.finished_scores, final], axis=1)  # [B, N + K]
    finished_scores, best = jax.lax.top_k(merged, n)  # [B, N]
    lengths = jnp.broadcast_to(carry.step + 1, (batch, k)).astype(jnp.int32)
    finished_beams = None
    if candidate_beams is not None:
        merged_beams = jnp.concatenate([carry.finished_beams, candidate_beams], axis=1)
        finished_beams = _gather(merged_beams, best)
    return dict(
        finished_beams=finished_beams,
        finished=_gather(jnp.concatenate([carry.finished, candidates], axis=1), best),
        finished_scores=finished_scores,
        finished_lengths=_gather(jnp.concatenate([carry.finished_lengths, lengths], 1), best),
        is_finished=_gather(jnp.concatenate([carry.is_finished, just_ended], axis=1), best),
    )


def _improvable(settings: BeamSettings, carry: _Beams, scalars) -> Array:
    """[B]: whether the best running beam, scored at the length it could best end with, beats
    the worst finished hypothesis (once a row cannot improve, it never can again)."""
    prompt_length, max_length = scalars[0], scalars[1]
    # transformers' heuristic scores at the current length, unless longer is better and
    # early_stopping="never" asks for the bound
    hypothetical = jnp.where(settings.score_at_max_length, max_length - prompt_length, carry.step)
    best_running = carry.running_scores[:, :1] / settings.penalties[hypothetical]  # [B, 1]
    worst = jnp.min(carry.finished_scores, axis=1, keepdims=True)
    worst = jnp.where(carry.is_finished, worst, EXCLUDED)  # [B, N]
    return carry.improvable & jnp.any(best_running > worst, axis=1)
