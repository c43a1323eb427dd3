"""The decoding protocol: how generation drives a generative model without knowing its family.

A model that generates (`model.can_generate()`: its head is a `DecodingHead`) offers three pure
functions of arrays and one state pytree, so that greedy decoding, sampling and beam search run
them inside one compiled program:

    state, logits = model.start(prompt_ids, prompt_mask, cache_length=S, **encoder_inputs)
        prompt_ids, prompt_mask [B, P]: the tokens to continue (left-padded, mask 0 on padding);
        S: the slots the cache holds (P plus every token that may follow). logits [B, V]: the
        scores of the token after the prompt.
    state, logits = model.step(state, tokens)
        tokens [R]: one new token per row. logits [R, V]: the scores of the token after it.
    state = model.reorder(state, rows)
        rows [R'] int: row i of the new state is row rows[i] of the old. Beam search expands the
        start state to its beams with it (rows = each prompt row repeated N times) and makes each
        beam's state follow the beam it continues.

`state` is a `DecodingState`: the cache, the position id of the last token fed to each row, and
any other per-row arrays the model needs between steps. Generation never looks inside it.

Causal LMs (heads/language_modeling.py): `start` prefills the prompt into a new KV cache and
returns the logits of its last position; `step` feeds one token per row at the next position.

Encoder-decoders (T5, BART, Whisper; their families arrive with a later issue) implement the
same three functions: `start` runs the encoder once on `encoder_inputs` (transformers' names:
input_ids / attention_mask, input_features, ...), fills the cross-attention part of the cache
from its output, and runs the decoder over the decoder prompt (`prompt_ids`: the decoder start
token, or the caller's decoder_input_ids); `step` runs the decoder alone; the encoder's attention
mask rides in `DecodingState.rows` and the cross part in the cache, so `reorder` moves both with
the beams. No code in generation/ changes for them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array


@struct.dataclass
class DecodingState:
    """What a generative model carries from one decoding step to the next."""

    cache: Any  # a cache with `reorder(rows)`: flaxauto.decoder.KVCache, or self + cross parts
    position: Array  # [R] int32: the position id of the last token fed to each row
    rows: Any = None  # other per-row arrays, batch axis first (an encoder's attention mask [R, S])

    def reorder(self, rows: Array) -> DecodingState:
        """Row i of the result is row rows[i] (rows [R'] int32)."""
        return self.replace(
            cache=self.cache.reorder(rows),
            position=jnp.take(self.position, rows, axis=0),
            rows=jax.tree.map(lambda x: jnp.take(x, rows, axis=0), self.rows),
        )


class DecodingHead:
    """A head that makes its model generative: it runs the decoding protocol over the backbone.

    `start` and `step` receive the backbone as their first argument (a head owns no backbone);
    both return (DecodingState, next-token logits). `start` gets the empty cache the model made
    (placed on the model's mesh, when it was loaded onto one)."""

    def start(self, backbone, prompt_ids, prompt_mask, *, cache, **encoder_inputs):
        raise NotImplementedError

    def step(self, backbone, state: DecodingState, tokens):
        raise NotImplementedError
