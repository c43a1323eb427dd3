"""Encoder-decoders: BART-base shape beam search (4 beams) and encoder forward, beside
transformers PyTorch on the same weights.

Random weights are saved by transformers and loaded by flaxauto, so both decode from the same
numbers (the run reports how many tokens agree). Beam search: batch 1, a 64-token source,
exactly 32 new tokens (min_new_tokens = max_new_tokens), 4 beams; tokens/s counts the tokens of
the returned sequence (the best beam), as a user sees them. flaxauto's generate is one compiled
program (encoder, prefill and the while_loop over steps); transformers' is PyTorch
`generate(num_beams=4)` under inference_mode with as many threads as JAX has cores. The encoder
row times the encoder alone (batch 8 x 128 tokens): flaxauto's `backbone.encode` jitted over
the split state, transformers' `model.get_encoder()`. Medians of interleaved runs after warm-up.

    python benchmarks/seq2seq.py [--quick]
"""

from __future__ import annotations

import os
import tempfile

import common
import numpy as np

SOURCE, NEW_TOKENS, BEAMS = 64, 32, 4
ENCODER_BATCH, ENCODER_LENGTH = 8, 128


def bart_base_config():
    import transformers

    return transformers.BartConfig(
        vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6,
        encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
        decoder_ffn_dim=3072, max_position_embeddings=1024,
    )  # fmt: skip


def main(argv=None) -> list[dict]:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    import torch
    import transformers

    import flaxauto

    threads = common.cores()
    torch.set_num_threads(threads)
    repeats = 2 if args.quick else 5
    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        transformers.BartForConditionalGeneration(bart_base_config()).save_pretrained(directory)
        reference = transformers.BartForConditionalGeneration.from_pretrained(directory).eval()
        model = flaxauto.AutoModelForSeq2SeqLM.from_pretrained(directory)
    rng = np.random.default_rng(0)
    note = f"{threads} threads; load average {os.getloadavg()[0]:.1f}"
    return [beam_search(model, reference, rng, repeats, note), encoder(model, reference, rng,
                                                                      repeats, note)]  # fmt: skip


def beam_search(model, reference, rng, repeats: int, note: str) -> dict:
    import torch

    ids = rng.integers(3, model.config.vocab_size, (1, SOURCE))
    settings = dict(
        num_beams=BEAMS, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
        no_repeat_ngram_size=0, early_stopping=True,
    )  # fmt: skip

    def ours():
        return np.asarray(model.generate(ids, **settings))

    def theirs():
        with torch.inference_mode():
            return reference.generate(torch.as_tensor(ids), **settings).numpy()

    a, b = ours(), theirs()
    same = np.mean(a == b) if a.shape == b.shape else 0.0
    times = common.interleaved({"flaxauto": ours, "torch": theirs}, repeats, warmup=1)
    ours_rate, theirs_rate = NEW_TOKENS / times["flaxauto"], NEW_TOKENS / times["torch"]
    return common.row(
        "seq2seq",
        f"BART-base shape beam search ({BEAMS} beams), batch 1, {SOURCE}-token source",
        f"{ours_rate:.1f} tok/s",
        f"transformers {theirs_rate:.1f} tok/s",
        ours_rate / theirs_rate,
        note=f"{NEW_TOKENS} new tokens; tokens identical {same:.0%}; {note}",
    )


def encoder(model, reference, rng, repeats: int, note: str) -> dict:
    import jax
    import torch
    from flax import nnx

    shape = (ENCODER_BATCH, ENCODER_LENGTH)
    ids = rng.integers(3, model.config.vocab_size, shape)
    mask = np.ones(shape, np.int64)
    graphdef, state = nnx.split(model)
    forward = jax.jit(
        lambda state, ids, mask: (
            nnx.merge(graphdef, state)
            .backbone.encode(input_ids=ids, attention_mask=mask)
            .last_hidden_state
        )
    )
    torch_encoder = reference.get_encoder()

    def ours():
        return np.asarray(forward(state, ids, mask))

    def theirs():
        with torch.inference_mode():
            return torch_encoder(
                input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)
            ).last_hidden_state.numpy()

    diff = float(np.max(np.abs(ours() - theirs())))
    times = common.interleaved({"flaxauto": ours, "torch": theirs}, repeats, warmup=1)
    return common.row(
        "seq2seq",
        f"BART-base shape encoder forward, {ENCODER_BATCH}x{ENCODER_LENGTH} fp32",
        common.ms(times["flaxauto"]),
        f"torch eager {common.ms(times['torch'])}",
        times["flaxauto"] / times["torch"],
        note=f"ratio of times (lower is better); max abs diff {diff:.1e}; {note}",
    )


if __name__ == "__main__":
    common.report(main(), "seq2seq")
