"""Encoder-decoders: BART-base shape beam search (4 beams) and encoder forward, beside
transformers PyTorch on the same weights.

Random weights are saved by transformers and loaded by flaxauto, so both decode from the same
numbers (the run reports how many tokens agree). Beam search: batch 1, a 64-token source,
exactly 32 new tokens (min_new_tokens = max_new_tokens), 4 beams; tokens/s counts the tokens of
the returned sequence (the best beam), as a user sees them. flaxauto's generate is one compiled
program (encoder, prefill and the while_loop over steps); transformers' is PyTorch
`generate(num_beams=4)` under inference_mode with as many threads as JAX has cores. The encoder
row times the encoder alone (batch 8 x 128 tokens): flaxauto's `backbone.encode` jitted over
the split state, transformers' `model.get_encoder()`. The Marian row is the same beam search at
opus-mt-en-de's shape (6 + 6 layers of 512, swish, sinusoids) with opus-mt's bad_words_ids
[[pad]]. Medians of interleaved runs after warm-up.

    python benchmarks/seq2seq.py [--quick] [--only bart|marian]
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


def opus_mt_config():
    import transformers

    return transformers.MarianConfig(
        vocab_size=58101, decoder_vocab_size=58101, d_model=512, encoder_layers=6,
        decoder_layers=6, encoder_attention_heads=8, decoder_attention_heads=8,
        encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_position_embeddings=512,
        activation_function="swish", scale_embedding=True, pad_token_id=58100,
        decoder_start_token_id=58100, eos_token_id=0, forced_eos_token_id=0,
    )  # fmt: skip


def _pair(transformers_class, config):
    """(flaxauto model, transformers model) on the same random weights."""
    import torch

    import flaxauto

    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        transformers_class(config).save_pretrained(directory)
        reference = transformers_class.from_pretrained(directory).eval()
        model = flaxauto.AutoModelForSeq2SeqLM.from_pretrained(directory)
    return model, reference


def main(argv=None) -> list[dict]:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("bart", "marian"))
    args = parser.parse_args(argv)
    import torch
    import transformers

    threads = common.cores()
    torch.set_num_threads(threads)
    repeats = 2 if args.quick else 5
    rng = np.random.default_rng(0)
    note = f"{threads} threads; load average {os.getloadavg()[0]:.1f}"
    rows = []
    if args.only in (None, "bart"):
        model, reference = _pair(transformers.BartForConditionalGeneration, bart_base_config())
        rows.append(beam_search(model, reference, rng, repeats, note, "BART-base"))
        rows.append(encoder(model, reference, rng, repeats, note))
    if args.only in (None, "marian"):
        model, reference = _pair(transformers.MarianMTModel, opus_mt_config())
        pad = model.config.pad_token_id
        rows.append(beam_search(model, reference, rng, repeats, note, "opus-mt (Marian)",
                                bad_words_ids=[[pad]]))  # fmt: skip
    return rows


def beam_search(model, reference, rng, repeats: int, note: str, shape: str, **extra) -> dict:
    import torch

    ids = rng.integers(3, model.config.vocab_size - 1, (1, SOURCE))
    settings = dict(
        num_beams=BEAMS, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
        no_repeat_ngram_size=0, early_stopping=True, **extra,
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
        f"{shape} shape beam search ({BEAMS} beams), batch 1, {SOURCE}-token source",
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
