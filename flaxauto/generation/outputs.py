"""What generate returns under return_dict_in_generate=True, with transformers' field names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from flaxauto.outputs import _Output

Array = jax.Array


@struct.dataclass
class GenerateOutput(_Output):
    """transformers' GenerateDecoderOnlyOutput / GenerateBeamDecoderOnlyOutput fields that
    flaxauto fills (the others stay None); `out[0]` / `out.sequences` are the ids (numpy)."""

    _tuple_order = ("sequences", "sequences_scores", "scores", "logits", "beam_indices")

    # [B * num_return_sequences, prompt + generated], the prompt included
    sequences: Array = None
    # output_scores: one array per step run, the scores the step's token was chosen from, after
    # the logits processors (and the sampling warpers): [B, V] for greedy decoding and sampling;
    # for beam search the processed log-probabilities of every running beam, [B * num_beams, V]
    scores: tuple[Array, ...] | None = None
    # output_logits: one array per step run, the model's logits before any processing, [B, V]
    # (beam search: [B * num_beams, V])
    logits: tuple[Array, ...] | None = None
    # beam search with output_scores: each returned hypothesis' score (its summed
    # log-probabilities over generated length ** length_penalty) [B * num_return_sequences]
    sequences_scores: Array | None = None
    # beam search: the row of the [B * num_beams, V] scores each generated token was chosen
    # from [B * num_return_sequences, generated], -1 after a hypothesis' end (for
    # transformers' compute_transition_scores)
    beam_indices: Array | None = None


def new_record(output_scores: bool, output_logits: bool, steps: int, rows: int, vocab: int):
    """Preallocated buffers [steps, rows, V] for what a compiled loop keeps of each step: a
    dict with "scores" and/or "logits", or None (nothing kept, nothing allocated)."""
    names = [n for n, on in (("scores", output_scores), ("logits", output_logits)) if on]
    return {name: jnp.zeros((steps, rows, vocab), jnp.float32) for name in names} or None


def record(buffers, step, **values):
    """The buffers with `values` [rows, V] (by name) written at `step`."""
    if buffers is None:
        return None
    return {
        name: jax.lax.dynamic_update_index_in_dim(
            buffer, values[name].astype(buffer.dtype), step, 0
        )
        for name, buffer in buffers.items()
    }


def per_step(buffers, name: str, steps: int):
    """A buffer as transformers returns it: a tuple with one [rows, V] array per step run."""
    if buffers is None or name not in buffers:
        return None
    return tuple(buffers[name][i] for i in range(steps))
