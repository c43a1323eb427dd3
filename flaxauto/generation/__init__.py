"""Text generation, as transformers' `generate` computes it, in one compiled program.

The program drives the model only through the decoding protocol (flaxauto.decoding): `start`
runs the prompt (prefill), then every further step runs `step` inside `lax.while_loop`, with no
Python between tokens; beam search follows its beams with `reorder`. Shapes are bucketed to
powers of two (the prompt is left-padded to a bucket, the cache sized to one), so prompts of
other lengths and other `max_new_tokens` reuse compiled programs. Settings (GenerationConfig)
follow transformers' precedence: the `generation_config` argument, then the model's (the
checkpoint's generation_config.json, else its config), then transformers' defaults, then keyword
arguments.

Supported: greedy, sampling (temperature, top_k, top_p) and beam search (num_beams, length_penalty,
early_stopping, num_return_sequences; see flaxauto.generation.beam_search); the logits processors
repetition_penalty, no_repeat_ngram_size, bad_words_ids, min_length / min_new_tokens,
forced_bos_token_id, forced_eos_token_id, suppress_tokens, begin_suppress_tokens (see
flaxauto.generation.processors); eos_token_id (int or list), pad_token_id, max_new_tokens /
max_length, left-padded batches; return_dict_in_generate with output_scores and
output_logits (flaxauto.generation.outputs.GenerateOutput). Any other active setting raises
NotImplementedError naming it.

Encoder-decoders (AutoModelForSeq2SeqLM, AutoModelForSpeechSeq2Seq): the first argument and
attention_mask (and any other keyword the model's encoder takes, such as input_features) are the
encoder's; the encoder runs once, inside the program, and beam search copies its cross-attention
cache to the beams. The decoder prompt is the model's `decoder_prompt`: decoder_start_token_id
(else bos_token_id), or the caller's decoder_input_ids behind it; the result is that prompt and
its continuation, and max_length / min_length count decoder tokens, as in transformers.
"""

from __future__ import annotations

import jax
import numpy as np

from flaxauto.generation import beam_search, greedy
from flaxauto.generation.outputs import GenerateOutput, per_step
from flaxauto.generation.settings import plan as make_plan
from flaxauto.generation.settings import (
    prepare,
    prepare_encoder_decoder,
    resolve_generation_config,
)


def generate(model, input_ids, attention_mask=None, *, generation_config=None, key=None, **kwargs):
    """Prompt [B, P] -> token ids [B * num_return_sequences, P + new] (prompt included), as
    transformers' generate, as a numpy array (tokenizers decode it directly); with return_dict_in_generate=True a GenerateOutput (`.sequences`,
    `.scores` and, for beam search, `.sequences_scores` with output_scores=True, `.logits`
    with output_logits=True; beam search adds `.beam_indices`).

    `key` seeds sampling (a jax.random key; fresh entropy if None). Rows that finish early are
    filled with pad_token_id; the result stops when every row has finished or at max_length.
    """
    if not model.can_generate():
        raise TypeError(
            f"generate() needs a generative model (a causal LM, or an encoder-decoder's "
            f"AutoModelForSeq2SeqLM / AutoModelForSpeechSeq2Seq), not "
            f"{model.task}"
        )
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    if encoder_decoder:  # the encoder's inputs and the decoder's prompt leave the settings
        decoder_input_ids = kwargs.pop("decoder_input_ids", None)
        names = model.encoder_input_names()
        encoder_inputs = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
    config, default_max_length = resolve_generation_config(model, generation_config, **kwargs)
    plan = make_plan(config)
    if encoder_decoder:
        prompt, encoder_inputs = prepare_encoder_decoder(
            model, config, plan, default_max_length, input_ids, attention_mask,
            decoder_input_ids, encoder_inputs,
        )  # fmt: skip
    else:
        prompt = prepare(model, config, plan, default_max_length, input_ids, attention_mask)
        encoder_inputs = {}
    if config.num_beams > 1:
        sequences, sequences_scores, beam_indices, steps, kept = beam_search.generate(
            model, config, plan, prompt, encoder_inputs
        )
    else:
        if key is None:
            key = jax.random.key(np.random.SeedSequence().entropy % (2**32))
        tokens, steps, kept = greedy.decode(
            model, plan, prompt.cache_length, prompt.ids, prompt.mask,
            prompt.scalars, key, encoder_inputs,
        )  # fmt: skip
        steps = int(steps)
        sequences = tokens[:, prompt.padding : prompt.ids.shape[1] + steps]
        sequences_scores = beam_indices = None
    # numpy on the host: transformers 5's tokenizers decode numpy arrays but not jax arrays
    # (tokenizer.batch_decode(model.generate(...)) must work), and the ids are small
    sequences = np.asarray(sequences)
    if not config.return_dict_in_generate:
        return sequences
    return GenerateOutput(
        sequences=sequences,
        scores=per_step(kept, "scores", steps),
        logits=per_step(kept, "logits", steps),
        sequences_scores=sequences_scores if plan.output_scores else None,
        beam_indices=beam_indices,
    )
