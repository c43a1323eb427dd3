"""transformers' logits processors and warpers, as pure functions of [rows, vocab] scores.

Each processor is one jit-compatible function, checked against transformers' LogitsProcessor
class of the same name; `process_scores` applies the active ones in the order transformers 5's
`_get_logits_processor` builds them. They read the rows' tokens from a fixed-size buffer (see
`History`), so a compiled decoding loop can call them at every step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from flaxauto.generation.settings import Plan

Array = jax.Array


@struct.dataclass
class History:
    """What the processors read besides the scores: each row's tokens so far, in a buffer of
    fixed width whose first columns may be bucket padding transformers never sees."""

    tokens: Array  # [R, S] int32: bucket padding, the caller's prompt, generated tokens, filler
    first: Array  # [] int32: the column of the caller's first prompt token
    end: Array  # [] int32: columns filled so far (the next token goes to column `end`)
    seen: Array | None  # [R, V] bool: tokens the repetition penalty applies to
    prompt_length: Array  # [] int32: the caller's prompt length
    max_length: Array  # [] int32: prompt included
    min_length: Array  # [] int32: no eos while a row is shorter (prompt included)

    @property
    def length(self) -> Array:
        """Tokens in each row as transformers counts them (its `input_ids.shape[-1]`)."""
        return self.end - self.first


def prompt_tokens(ids, mask, vocab: int) -> Array:
    """[B, V] bool: prompt tokens from the first real one on (transformers' repetition penalty
    skips left padding)."""
    first = jnp.argmax(mask != 0, axis=-1)  # [B]
    counted = jnp.arange(ids.shape[1])[None, :] >= first[:, None]
    columns = jnp.where(counted, jnp.clip(ids, 0, vocab), vocab)  # uncounted -> spare column
    rows = jnp.arange(ids.shape[0])[:, None]
    seen = jnp.zeros((ids.shape[0], vocab + 1), bool).at[rows, columns].set(True)
    return seen[:, :vocab]


def token_mask(token_ids, vocab: int) -> Array:
    """[V] bool: True at each of token_ids (ids outside the vocabulary are ignored)."""
    return jnp.isin(jnp.arange(vocab), jnp.asarray(token_ids, jnp.int32))


def eos_mask(plan: Plan, vocab: int) -> Array:
    """[V] bool: the end-of-sequence tokens."""
    return token_mask(plan.eos_token_ids, vocab)


def _check_in_vocab(name: str, token_ids, vocab: int) -> None:
    outside = sorted({int(t) for t in token_ids if t >= vocab})
    if outside:
        raise ValueError(f"{name}: the vocabulary has {vocab} tokens, but {outside} were given")


def repetition_penalty(scores, seen, penalty: float) -> Array:
    """RepetitionPenaltyLogitsProcessor: seen tokens' scores divided by the penalty (multiplied
    where negative)."""
    penalised = jnp.where(scores < 0, scores * penalty, scores / penalty)
    return jnp.where(seen, penalised, scores)


def no_repeat_ngram(scores, tokens, first, end, size: int) -> Array:
    """NoRepeatNGramLogitsProcessor: ban every token that would complete an n-gram (n = size)
    already in the row (prompt included). tokens [R, S]; the row is columns [first, end)."""
    rows, width = tokens.shape
    vocab = scores.shape[-1]
    if size > width:  # no row is that long: nothing to ban, as in transformers
        return scores
    padded = jnp.pad(tokens, ((0, 0), (0, size - 1)))
    shifted = [padded[:, j : j + width] for j in range(size)]  # shifted[j][:, s] = token s + j
    starts = jnp.arange(width, dtype=jnp.int32)[None, :]  # [1, S]
    matches = (starts >= first) & (starts + size <= end)  # complete windows of the row
    # the row's last size - 1 tokens; a window starting with them bans its own last token
    suffix = jax.lax.dynamic_slice_in_dim(tokens, end - (size - 1), size - 1, axis=1)
    for j in range(size - 1):
        matches = matches & (shifted[j] == suffix[:, j : j + 1])
    # windows that do not match go to a spare column past the vocabulary
    columns = jnp.where(matches, jnp.clip(shifted[-1], 0, vocab), vocab)  # [R, S]
    banned = jnp.zeros((rows, vocab + 1), bool).at[jnp.arange(rows)[:, None], columns].set(True)
    return jnp.where(banned[:, :vocab], -jnp.inf, scores)


def bad_words(scores, tokens, first, end, sequences: tuple[tuple[int, ...], ...]) -> Array:
    """NoBadWordsLogitsProcessor: ban a sequence's last token where the row ends with the rest
    of it (a one-token sequence: always). `sequences` as settings.bad_word_sequences filters them."""
    vocab = scores.shape[-1]
    _check_in_vocab("bad_words_ids", [t for s in sequences for t in s], vocab)
    banned = jnp.broadcast_to(
        token_mask([s[0] for s in sequences if len(s) == 1], vocab), scores.shape
    )
    for sequence in (s for s in sequences if len(s) > 1):
        prefix = len(sequence) - 1
        if prefix > tokens.shape[1]:  # longer than any row can be
            continue
        recent = jax.lax.dynamic_slice_in_dim(tokens, end - prefix, prefix, axis=1)  # [R, L]
        ends_with = jnp.all(recent == jnp.asarray(sequence[:-1], jnp.int32)[None, :], axis=1)
        ends_with = ends_with & (prefix <= end - first)  # transformers skips longer prefixes
        banned = banned.at[:, sequence[-1]].set(banned[:, sequence[-1]] | ends_with)
    return jnp.where(banned, -jnp.inf, scores)


def min_length(scores, length, minimum, eos_token_ids) -> Array:
    """MinLengthLogitsProcessor (and MinNewTokens, as a minimum counted from the prompt): no
    eos while the row is shorter than `minimum`."""
    is_eos = token_mask(eos_token_ids, scores.shape[-1])
    return jnp.where((length < minimum) & is_eos[None, :], -jnp.inf, scores)


def _only(tokens, scores) -> Array:
    """Scores that allow only `tokens`: 0 there, -inf elsewhere."""
    allowed = token_mask(tokens, scores.shape[-1])
    return jnp.broadcast_to(jnp.where(allowed, 0.0, -jnp.inf).astype(scores.dtype), scores.shape)


def forced_bos(scores, length, token_id: int) -> Array:
    """ForcedBOSTokenLogitsProcessor: the first token of a one-token row is `token_id`."""
    _check_in_vocab("forced_bos_token_id", [token_id], scores.shape[-1])
    return jnp.where(length == 1, _only([token_id], scores), scores)


def forced_eos(scores, length, max_length, token_ids) -> Array:
    """ForcedEOSTokenLogitsProcessor: the last token before max_length is one of `token_ids`."""
    _check_in_vocab("forced_eos_token_id", token_ids, scores.shape[-1])
    return jnp.where(length == max_length - 1, _only(token_ids, scores), scores)


def suppress(scores, token_ids) -> Array:
    """SuppressTokensLogitsProcessor: never `token_ids`."""
    return jnp.where(token_mask(token_ids, scores.shape[-1])[None, :], -jnp.inf, scores)


def suppress_at_begin(scores, length, begin_index, token_ids) -> Array:
    """SuppressTokensAtBeginLogitsProcessor: not `token_ids` where the row is begin_index long."""
    at_begin = (length == begin_index) & token_mask(token_ids, scores.shape[-1])[None, :]
    return jnp.where(at_begin, -jnp.inf, scores)


def process_scores(plan: Plan, scores, history: History) -> Array:
    """Scores [R, V] (logits, or log-probabilities for beam search) through transformers'
    logits processors, in their order."""
    length = history.length
    if plan.repetition_penalty != 1:
        scores = repetition_penalty(scores, history.seen, plan.repetition_penalty)
    if plan.no_repeat_ngram_size:
        scores = no_repeat_ngram(
            scores, history.tokens, history.first, history.end, plan.no_repeat_ngram_size
        )
    if plan.bad_words:
        scores = bad_words(scores, history.tokens, history.first, history.end, plan.bad_words)
    if plan.eos_token_ids:  # min_length / min_new_tokens
        scores = min_length(scores, length, history.min_length, plan.eos_token_ids)
    if plan.forced_bos_token_id is not None:
        scores = forced_bos(scores, length, plan.forced_bos_token_id)
    if plan.forced_eos_token_ids:
        scores = forced_eos(scores, length, history.max_length, plan.forced_eos_token_ids)
    if plan.suppress_tokens:
        scores = suppress(scores, plan.suppress_tokens)
    if plan.begin_suppress_tokens:
        # the first generated position, or the one after a forced bos for a one-token prompt
        prompt = history.prompt_length
        late = (plan.forced_bos_token_id is not None) & (prompt <= 1)
        scores = suppress_at_begin(scores, length, prompt + late, plan.begin_suppress_tokens)
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
