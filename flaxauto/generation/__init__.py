"""Text generation for causal LMs, as transformers' `generate` computes it, in one compiled program.

The program prefills the prompt into a preallocated KV cache, then runs every further step inside
`lax.while_loop`: no Python between tokens. Shapes are bucketed to powers of two (the prompt is
left-padded to a bucket, the cache sized to one), so prompts of other lengths and other
`max_new_tokens` reuse compiled programs. Settings (GenerationConfig) follow transformers'
precedence: the `generation_config` argument, then the model's (the checkpoint's
generation_config.json, else its config), then transformers' defaults, then keyword arguments.

Supported: greedy, sampling (temperature, top_k, top_p) and beam search (num_beams, length_penalty,
early_stopping, num_return_sequences; see flaxauto.generation.beam_search), repetition_penalty, eos_token_id
(int or list), pad_token_id, max_new_tokens / max_length, min_new_tokens / min_length, left-padded
batches. Any other active setting raises NotImplementedError naming it.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from flaxauto.generation import beam_search, greedy
from flaxauto.generation.settings import plan as make_plan
from flaxauto.generation.settings import prepare, resolve_generation_config


def generate(model, input_ids, attention_mask=None, *, generation_config=None, key=None, **kwargs):
    """Prompt [B, P] -> token ids [B * num_return_sequences, P + new] (prompt included), as
    transformers' generate.

    `key` seeds sampling (a jax.random key; fresh entropy if None). Rows that finish early are
    filled with pad_token_id; the result stops when every row has finished or at max_length.
    """
    if model.task != "causal-lm" or not hasattr(model.head, "decode_logits"):
        raise TypeError(f"generate() needs a causal LM (AutoModelForCausalLM), not {model.task}")
    config, default_max_length = resolve_generation_config(model, generation_config, **kwargs)
    plan = make_plan(config)
    prompt = prepare(model, config, plan, default_max_length, input_ids, attention_mask)
    graphdef, state = nnx.split(model)
    if config.num_beams > 1:
        return beam_search.generate(graphdef, state, config, plan, prompt)
    if key is None:
        key = jax.random.key(np.random.SeedSequence().entropy % (2**32))
    tokens, steps = greedy.decode(
        graphdef, plan, prompt.cache_length, state, prompt.ids, prompt.mask,
        prompt.scalars, key,
    )  # fmt: skip
    return tokens[:, prompt.padding : prompt.ids.shape[1] + int(steps)]
