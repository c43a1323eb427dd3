"""Generation settings: transformers' GenerationConfig resolved with its precedence, checked
against what flaxauto implements, and the prompt made ready (bucketed) for a compiled program."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

MIN_PROMPT_BUCKET = 8

#: GenerationConfig attributes this module does not implement, with the values that leave them off.
_INACTIVE = {
    "num_beam_groups": (None, 1),
    "diversity_penalty": (None, 0.0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "encoder_repetition_penalty": (None, 1.0),
    "sequence_bias": (None,),
    "force_words_ids": (None,),
    "constraints": (None,),
    "min_p": (None,),
    "top_h": (None,),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "guidance_scale": (None, 1.0),
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
    "output_attentions": (None, False),
    "output_hidden_states": (None, False),
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
    no_repeat_ngram_size: int = 0  # 0: off
    bad_words: tuple[tuple[int, ...], ...] = ()  # sequences never to complete
    forced_bos_token_id: int | None = None
    forced_eos_token_ids: tuple[int, ...] = ()
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()
    output_scores: bool = False  # keep each step's processed scores (return_dict_in_generate)
    output_logits: bool = False  # keep each step's raw logits (return_dict_in_generate)
    beam_indices: bool = False  # beam search: keep the beam of each token (return_dict_in_generate)


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


def plan(config) -> Plan:
    eos = config.eos_token_id
    eos = () if eos is None else tuple(int(t) for t in np.atleast_1d(eos))
    pad = config.pad_token_id
    pad = eos[0] if pad is None and eos else pad  # transformers pads finished rows with eos
    sampling = bool(config.do_sample)
    bos = config.forced_bos_token_id
    if sampling and not config.temperature > 0:
        raise ValueError(f"temperature={config.temperature!r} must be > 0 when sampling")
    ngram = config.no_repeat_ngram_size or 0
    if not isinstance(ngram, int) or ngram < 0:
        raise ValueError(f"`ngram_size` has to be a strictly positive integer, but is {ngram}")
    bad_words = ()
    if config.bad_words_ids is not None:
        bad_words = bad_word_sequences(config.bad_words_ids, eos)
    forced_eos = config.forced_eos_token_id
    forced_eos = () if forced_eos is None else tuple(int(t) for t in np.atleast_1d(forced_eos))
    if any(t < 0 for t in forced_eos):
        raise ValueError(
            f"`eos_token_id` has to be a list of positive integers, but is {forced_eos}"
        )
    return Plan(
        do_sample=sampling,
        temperature=float(config.temperature) if sampling else 1.0,
        top_k=int(config.top_k or 0) if sampling else 0,
        top_p=float(config.top_p) if sampling and config.top_p is not None else 1.0,
        repetition_penalty=float(config.repetition_penalty or 1.0),
        eos_token_ids=eos,
        pad_token_id=int(pad) if pad is not None else 0,
        no_repeat_ngram_size=ngram,
        bad_words=bad_words,
        forced_bos_token_id=None if bos is None else int(bos),
        forced_eos_token_ids=forced_eos,
        suppress_tokens=_token_ids(config.suppress_tokens),
        begin_suppress_tokens=_token_ids(config.begin_suppress_tokens),
        output_scores=bool(config.return_dict_in_generate and config.output_scores),
        output_logits=bool(config.return_dict_in_generate and config.output_logits),
        beam_indices=bool(config.return_dict_in_generate and (config.num_beams or 1) > 1),
    )


def bad_word_sequences(bad_words_ids, eos_token_ids) -> tuple[tuple[int, ...], ...]:
    """transformers' checks of bad_words_ids, and its rule that a lone eos is never banned."""
    if not isinstance(bad_words_ids, list) or not bad_words_ids:
        raise ValueError(f"`bad_words_ids` has to be a non-empty list, but is {bad_words_ids}.")
    if any(not isinstance(words, list) or not words for words in bad_words_ids):
        raise ValueError(
            f"`bad_words_ids` has to be a list of non-empty lists, but is {bad_words_ids}."
        )
    if any(
        not isinstance(t, int) or isinstance(t, bool) or t < 0 for w in bad_words_ids for t in w
    ):
        raise ValueError(
            f"Each list in `bad_words_ids` has to be a list of positive integers, but is "
            f"{bad_words_ids}."
        )
    kept = [tuple(w) for w in bad_words_ids if not any(w == [e] for e in eos_token_ids)]
    return tuple(dict.fromkeys(kept))  # duplicates once, in order (transformers keeps a dict)


def _token_ids(tokens) -> tuple[int, ...]:
    return () if tokens is None else tuple(int(t) for t in tokens)


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
    if config.min_new_tokens is not None:  # transformers applies both minimums: the larger wins
        min_length = max(min_length, prompt + config.min_new_tokens)
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


def prepare(model, config, plan: Plan, default_max_length: bool, input_ids, attention_mask):
    """A causal LM's prompt: input_ids and their mask (by default: pad tokens masked)."""
    ids = np.asarray(input_ids, dtype=np.int32)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
    if attention_mask is None:
        mask = _default_mask(ids, plan, config.pad_token_id)
    else:
        mask = np.asarray(attention_mask, dtype=np.int32)
    return _bucketed(model, config, plan, default_max_length, ids, mask, MIN_PROMPT_BUCKET)


def prepare_encoder_decoder(
    model, config, plan: Plan, default_max_length: bool, inputs, attention_mask,
    decoder_input_ids, encoder_inputs: dict,
):  # fmt: skip
    """An encoder-decoder's prompt -> (the decoder prompt, the encoder's inputs).

    inputs: the encoder's main input (input_ids, input_features, ...) or None when it comes
    by name in encoder_inputs; attention_mask the encoder's (by default, for input_ids: pad
    tokens masked, as transformers). The decoder prompt is the model's (decoder_start_token_id,
    or decoder_input_ids); max_length and min_length count decoder tokens, as transformers."""
    main = model.family.main_input_name
    encoder_inputs = dict(encoder_inputs)
    if inputs is not None:
        if main in encoder_inputs:
            raise TypeError(f"got {main} both by position and by name")
        encoder_inputs[main] = inputs
    if main not in encoder_inputs and "inputs_embeds" not in encoder_inputs:
        raise ValueError(f"generate() needs the encoder's {main}")
    if attention_mask is not None:
        encoder_inputs["attention_mask"] = attention_mask
    elif main == "input_ids" and main in encoder_inputs:
        ids = np.asarray(encoder_inputs[main])
        if "attention_mask" in model.encoder_input_names():
            encoder_inputs["attention_mask"] = _default_mask(ids, plan, config.pad_token_id)
    encoder_inputs = _bucketed_source(model, config, encoder_inputs)
    encoder_inputs = {k: jnp.asarray(v) for k, v in encoder_inputs.items() if v is not None}
    batch = encoder_inputs[next(iter(encoder_inputs))].shape[0]
    ids = np.asarray(model.decoder_prompt(config, batch, decoder_input_ids), np.int32)
    # transformers attends every token of the decoder prompt (no decoder attention mask)
    mask = np.ones_like(ids)
    prompt = _bucketed(model, config, plan, default_max_length, ids, mask, 1)
    return prompt, encoder_inputs


def _bucketed_source(model, config, encoder_inputs: dict) -> dict:
    """The encoder's token ids and mask right-padded to a bucket length (the padding masked, so
    never attended), so that sources of nearby lengths share the compiled program as prompts
    do (a new source length would otherwise compile generate anew: seconds per length).
    Encoders without a mask, or given inputs_embeds, keep their inputs as they are."""
    ids = encoder_inputs.get("input_ids")
    if ids is None or "attention_mask" not in model.encoder_input_names():
        return encoder_inputs
    ids = np.asarray(ids)
    length = ids.shape[1]
    padded = bucket(length)
    most = getattr(config, "max_position_embeddings", None)  # a learned position table's end
    if most is not None and length <= most < padded:
        padded = most
    mask = encoder_inputs.get("attention_mask")
    mask = np.ones_like(ids) if mask is None else np.asarray(mask)
    extra = ((0, 0), (0, padded - length))
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    return encoder_inputs | {
        "input_ids": np.pad(ids, extra, constant_values=pad),
        "attention_mask": np.pad(mask, extra),
    }


def _bucketed(model, config, plan, default_max_length, ids, mask, minimum_bucket: int):
    prompt = ids.shape[1]
    max_length, min_length = _lengths(model, config, default_max_length, prompt)
    prompt_bucket = bucket(prompt, minimum_bucket)
    extra = ((0, 0), (prompt_bucket - prompt, 0))  # more left padding: masked, never attended
    return Prompt(
        ids=np.pad(ids, extra, constant_values=plan.pad_token_id),
        mask=np.pad(mask.astype(np.int32), extra),
        length=prompt,
        max_length=max_length,
        min_length=min_length,
        cache_length=bucket(prompt_bucket + max_length - prompt),
    )
