"""What generate returns under return_dict_in_generate=True, with transformers' field names."""

from __future__ import annotations

import jax
from flax import struct

Array = jax.Array


@struct.dataclass
class GenerateOutput:
    """transformers' GenerateDecoderOnlyOutput / GenerateBeamDecoderOnlyOutput fields that
    flaxauto fills (the others stay None)."""

    # [B * num_return_sequences, prompt + generated], the prompt included
    sequences: Array = None
    # output_scores: one array per step run, the scores the step's token was chosen from, after
    # the logits processors (and the sampling warpers): [B, V] for greedy decoding and sampling;
    # for beam search the processed log-probabilities of every running beam, [B * num_beams, V]
    scores: tuple[Array, ...] | None = None
    # beam search with output_scores: each returned hypothesis' score (its summed
    # log-probabilities over generated length ** length_penalty) [B * num_return_sequences]
    sequences_scores: Array | None = None

    def __getitem__(self, name: str):
        return getattr(self, name)
