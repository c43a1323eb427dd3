"""Text generation for causal LMs, as transformers' `generate` computes it, in one compiled program.

The program prefills the prompt into a preallocated KV cache, then runs every further step inside
`lax.while_loop`: no Python between tokens. Shapes are bucketed to powers of two (the prompt is
left-padded to a bucket, the cache sized to one), so prompts of other lengths and other
`max_new_tokens` reuse compiled programs. Settings (GenerationConfig) follow transformers'
precedence: the `generation_config` argument, then the model's (the checkpoint's
generation_config.json, else its config), then transformers' defaults, then keyword arguments.

Supported: greedy, sampling (temperature, top_k, top_p) and beam search (num_beams, length_penalty,
early_stopping, num_return_sequences; see flaxauto.beam_search), repetition_penalty, eos_token_id
(int or list), pad_token_id, max_new_tokens / max_length, min_new_tokens / min_length, left-padded
batches. Any other active setting raises NotImplementedError naming it.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

Array = jax.Array

MIN_PROMPT_BUCKET = 8

#: GenerationConfig attributes this module does not implement, with the values that leave them off.
_INACTIVE = {
    "num_beam_groups": (None, 1),
    "diversity_penalty": (None, 0.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "encoder_repetition_penalty": (None, 1.0),
    "bad_words_ids": (None,),
    "sequence_bias": (None,),
    "force_words_ids": (None,),
    "constraints": (None,),
    "min_p": (None,),
    "top_h": (None,),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "guidance_scale": (None, 1.0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "renormalize_logits": (None, False),
    "remove_invalid_values": (None, False),
    "exponential_decay_length_penalty": (None,),
    "stop_strings": (None,),
    "max_time": (None,),
    "penalty_alpha": (None,),
    "dola_layers": (None,),
    "token_healing": (None, False),
    "watermarking_config": (None,),
    "prompt_lookup_num_tokens": (None,),
    "assistant_early_exit": (None,),
    "use_mtp": (None, False),
    "low_memory": (None, False),
    "output_scores": (None, False),
    "output_logits": (None, False),
    "output_attentions": (None, False),
    "output_hidden_states": (None, False),
    "return_dict_in_generate": (None, False),
}


@dataclass(frozen=True)
class Plan:
    """The settings compiled into a program (changing one compiles a new program)."""

    do_sample: bool
    temperature: float
    top_k: int  # 0: off
    top_p: float  # 1.0: off
    repetition_penalty: float  # 1.0: off
    eos_token_ids: tuple[int, ...]  # empty: run to max_length
    pad_token_id: int  # what finished rows emit


@struct.dataclass
class _Carry:
    tokens: Array  # [B, S] prompt (bucket-padded) then generated tokens
    cache: object  # flaxauto.kv_cache.KVCache
    position: Array  # [B] position id of the last token fed
    unfinished: Array  # [B] bool
    seen: Array | None  # [B, V] bool: tokens the repetition penalty applies to
    key: Array
    step: Array  # [] int32: tokens generated so far


# --- settings ----------------------------------------------------------------------------------


def resolve_generation_config(model, generation_config=None, **kwargs):
    """transformers' precedence: argument > the model's generation config > transformers'
    defaults > keyword arguments (highest). Returns (config, whether max_length was left unset)."""
    from transformers.generation.configuration_utils import GenerationConfig

    base = model.generation_config
    default_max_length = (
        kwargs.get("max_length") is None
        and (generation_config is None or generation_config.max_length is None)
        and base.max_length is None
    )
    config = copy.deepcopy(generation_config) if generation_config else GenerationConfig()
    config.update(**base.to_dict(), defaults_only=True, allow_custom_entries=True)
    config.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
    unused = config.update(**kwargs)
    if unused:
        raise TypeError(f"generate() got arguments it does not take: {sorted(unused)}")
    for name, inactive in _INACTIVE.items():
        if getattr(config, name, None) not in inactive:
            raise NotImplementedError(
                f"generation setting {name}={getattr(config, name)!r} is not implemented"
            )
    _check_strategy(config)
    return config, default_max_length


def _check_strategy(config) -> None:
    """The decoding strategies implemented: greedy, sampling, beam search (not beam sampling)."""
    beams = config.num_beams or 1
    returned = config.num_return_sequences or 1
    if beams > 1 and config.do_sample:
        raise NotImplementedError(
            f"generation setting do_sample=True with num_beams={beams} (beam sampling) is not "
            "implemented"
        )
    if beams == 1 and returned != 1:
        raise NotImplementedError(
            f"generation setting num_return_sequences={returned!r} without beam search is not "
            "implemented"
        )
    if returned > beams:
        raise ValueError(f"num_return_sequences ({returned}) must be <= num_beams ({beams})")


def _plan(config) -> Plan:
    eos = config.eos_token_id
    eos = () if eos is None else tuple(int(t) for t in np.atleast_1d(eos))
    pad = config.pad_token_id
    pad = eos[0] if pad is None and eos else pad  # transformers pads finished rows with eos
    sampling = bool(config.do_sample)
    if sampling and not config.temperature > 0:
        raise ValueError(f"temperature={config.temperature!r} must be > 0 when sampling")
    return Plan(
        do_sample=sampling,
        temperature=float(config.temperature) if sampling else 1.0,
        top_k=int(config.top_k or 0) if sampling else 0,
        top_p=float(config.top_p) if sampling and config.top_p is not None else 1.0,
        repetition_penalty=float(config.repetition_penalty or 1.0),
        eos_token_ids=eos,
        pad_token_id=int(pad) if pad is not None else 0,
    )


def _lengths(model, config, default_max_length: bool, prompt: int) -> tuple[int, int]:
    """(max_length, min_length) in tokens, prompt included, as transformers derives them."""
    if config.max_new_tokens is not None:
        max_length = prompt + config.max_new_tokens
    elif default_max_length:  # transformers: 20 new tokens, capped by the position table
        max_length = prompt + config.max_length
        limit = getattr(model.config, "max_position_embeddings", None)
        max_length = min(max_length, limit) if limit else max_length
    else:
        max_length = config.max_length
    if prompt >= max_length:
        raise ValueError(
            f"Input length of input_ids is {prompt}, but max_length is set to {max_length}; "
            "increase max_length or set max_new_tokens."
        )
    min_length = config.min_length or 0
    if config.min_new_tokens is not None:
        min_length = prompt + config.min_new_tokens
    return max_length, min_length


def _default_mask(ids: np.ndarray, plan: Plan, pad_token_id) -> np.ndarray:
    """transformers' rule: mask out pad tokens if the prompt has some and pad is not an eos."""
    if pad_token_id is None or plan.pad_token_id in plan.eos_token_ids:
        return np.ones_like(ids)
    if not (ids == pad_token_id).any():
        return np.ones_like(ids)
    return (ids != pad_token_id).astype(ids.dtype)


def bucket(length: int, minimum: int = MIN_PROMPT_BUCKET) -> int:
    """The next power of two >= length (and >= minimum)."""
    return max(minimum, 1 << max(0, int(length) - 1).bit_length())


# --- the public entry point ----------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """A prompt ready for a compiled program: left-padded further to a bucket length, so that
    nearby prompt lengths share the program."""

    ids: np.ndarray  # [B, P] int32, P the bucket
    mask: np.ndarray  # [B, P] int32
    length: int  # the prompt length the caller gave
    max_length: int  # prompt included
    min_length: int
    cache_length: int  # the KV cache's (and token buffer's) bucketed length

    @property
    def padding(self) -> int:
        """Columns of bucket padding in front of the caller's prompt."""
        return self.ids.shape[1] - self.length

    @property
    def scalars(self) -> Array:
        """What the program reads at run time: [prompt length, max_length, min_length]."""
        return jnp.asarray([self.length, self.max_length, self.min_length], jnp.int32)


def generate(model, input_ids, attention_mask=None, *, generation_config=None, key=None, **kwargs):
    """Prompt [B, P] -> token ids [B * num_return_sequences, P + new] (prompt included), as
    transformers' generate.

    `key` seeds sampling (a jax.random key; fresh entropy if None). Rows that finish early are
    filled with pad_token_id; the result stops when every row has finished or at max_length.
    """
    if model.task != "causal-lm" or not hasattr(model.head, "decode_logits"):
        raise TypeError(f"generate() needs a causal LM (AutoModelForCausalLM), not {model.task}")
    config, default_max_length = resolve_generation_config(model, generation_config, **kwargs)
    plan = _plan(config)
    prompt = _prepare(model, config, plan, default_max_length, input_ids, attention_mask)
    graphdef, state = nnx.split(model)
    if config.num_beams > 1:
        from flaxauto import beam_search  # it builds on this module

        return beam_search.generate(graphdef, state, config, plan, prompt)
    if key is None:
        key = jax.random.key(np.random.SeedSequence().entropy % (2**32))
    tokens, steps = _decode(
        graphdef, plan, prompt.cache_length, state, prompt.ids, prompt.mask,
        prompt.scalars, key,
    )  # fmt: skip
    return tokens[:, prompt.padding : prompt.ids.shape[1] + int(steps)]


def _prepare(model, config, plan: Plan, default_max_length: bool, input_ids, attention_mask):
    ids = np.asarray(input_ids, dtype=np.int32)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
    if attention_mask is None:
        mask = _default_mask(ids, plan, config.pad_token_id)
    else:
        mask = np.asarray(attention_mask, dtype=np.int32)
    prompt = ids.shape[1]
    max_length, min_length = _lengths(model, config, default_max_length, prompt)
    prompt_bucket = bucket(prompt)
    extra = ((0, 0), (prompt_bucket - prompt, 0))  # more left padding: masked, never attended
    return Prompt(
        ids=np.pad(ids, extra, constant_values=plan.pad_token_id),
        mask=np.pad(mask.astype(np.int32), extra),
        length=prompt,
        max_length=max_length,
        min_length=min_length,
        cache_length=bucket(prompt_bucket + max_length - prompt),
    )


# --- the compiled program ------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "plan", "cache_length"))
def _decode(graphdef, plan: Plan, cache_length: int, state, ids, mask, scalars, key):
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
    out = backbone(ids, attention_mask=mask, position_ids=positions, cache=cache)
    logits = model.head.decode_logits(out.last_hidden_state[:, -1], backbone)  # last only
    return out.cache, positions[:, -1], logits


def next_logits(model, token, position, cache):
    """Feed one token per row (token, position [R]). Returns the cache and the logits [R, V]."""
    backbone = model.backbone
    out = backbone(
        token[:, None],  # [R, 1]
        attention_mask=jnp.ones((token.shape[0], 1), jnp.int32),
        position_ids=position[:, None],
        cache=cache,
    )
    return out.cache, model.head.decode_logits(out.last_hidden_state[:, 0], backbone)


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


def _choose(plan: Plan, carry: _Carry, logits, prompt_bucket, length, min_length) -> _Carry:
    """Process the scores as transformers' logits processors do (in their order), pick the next
    token, append it, update what has finished."""
    scores = process_scores(plan, logits.astype(jnp.float32), carry.seen, length, min_length)
    is_eos = eos_mask(plan, scores.shape[-1])  # [V]
    key, sample_key = jax.random.split(carry.key)
    if plan.do_sample:
        scores = _warp(plan, scores)
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


def _warp(plan: Plan, scores) -> Array:
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
