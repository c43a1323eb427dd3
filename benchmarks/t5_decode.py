"""T5 greedy decoding: T5-small shape, 32-token encoder input, 32 new tokens, batch 1 and 8.

As benchmarks/decode.py does for GPT-2: random weights saved by transformers and loaded by
flaxauto, so both decode the same numbers (the row says how many tokens agree); flaxauto's
`generate` is one compiled program (the encoder run once, the cross-attention keys/values
computed once, then a while loop over the decoder alone); transformers' is PyTorch
`generate(do_sample=False)` under inference_mode with as many threads as JAX has cores. Both are
forced to 32 new tokens (min_new_tokens), timed interleaved, median after warm-up.

A decoding step reads the decoder's weights and the token table once (the tied lm_head's
output), plus the cross-attention cache; its floor is those bytes over the memory read bandwidth
(measured in the same run, see decode.read_bandwidth). "of bound" is that floor over flaxauto's
time per token, the encoder and prefill included.

    python benchmarks/t5_decode.py [--quick]
"""

from __future__ import annotations

import os
import tempfile

import common
import numpy as np
from decode import read_bandwidth

SOURCE, NEW_TOKENS, BATCHES = 32, 32, (1, 8)
SPEEDUP_TARGET = 2.5


def t5_small_config():
    import transformers

    # t5-small's shape: 6 + 6 layers, d_model 512, 8 heads of 64, relu feed-forward of 2048,
    # the 32128-token table tied to the lm_head (decoder output rescaled by d_model ** -0.5)
    return transformers.T5Config(
        vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
        feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip


def bytes_per_step(model, batch: int) -> int:
    """What one step reads: the decoder's weights, the shared table once (as the lm_head), and
    the cross-attention keys/values of the whole source."""
    import jax
    from flax import nnx

    decoder = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model.backbone.decoder, nnx.Param)))
    table = model.backbone.shared.embedding[...].nbytes
    config = model.config
    cross = 2 * config.num_decoder_layers * batch * SOURCE * config.num_heads * config.d_kv * 4
    return decoder + table + cross


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
        transformers.T5ForConditionalGeneration(t5_small_config()).save_pretrained(directory)
        # loaded back, as a user's model is (see decode.py on freshly built models)
        reference = transformers.T5ForConditionalGeneration.from_pretrained(directory).eval()
        model = flaxauto.AutoModelForSeq2SeqLM.from_pretrained(directory)
    bandwidth = read_bandwidth(repeats + 3)
    rows = []
    for batch in BATCHES if not args.quick else BATCHES[:1]:
        rng = np.random.default_rng(batch)
        ids = rng.integers(2, model.config.vocab_size, (batch, SOURCE))
        rows.append(measure(batch, ids, model, reference, bandwidth, repeats, threads))
    return rows


def measure(batch, ids, model, reference, bandwidth, repeats, threads) -> dict:
    import torch

    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=1)
    torch_ids = torch.as_tensor(ids)
    mask = np.ones_like(ids)
    torch_mask = torch.ones_like(torch_ids)

    def ours():
        return np.asarray(model.generate(ids, attention_mask=mask, do_sample=False, **settings))

    def theirs():
        with torch.inference_mode():
            tokens = reference.generate(
                torch_ids, attention_mask=torch_mask, do_sample=False, **settings
            )
        return tokens.numpy()

    same = np.mean(ours() == theirs())
    times = common.interleaved({"flaxauto": ours, "torch": theirs}, repeats, warmup=1)
    ours_rate = batch * NEW_TOKENS / times["flaxauto"]
    theirs_rate = batch * NEW_TOKENS / times["torch"]
    floor = bytes_per_step(model, batch) / bandwidth
    of_bound = floor / (times["flaxauto"] / NEW_TOKENS)
    speedup = ours_rate / theirs_rate
    batch1 = batch == 1
    return common.row(
        "t5_decode",
        f"T5-small greedy, fp32, batch {batch}, {SOURCE} source tokens",
        f"{ours_rate:.1f} tok/s",
        f"transformers {theirs_rate:.1f} tok/s",
        speedup,
        f">= {SPEEDUP_TARGET}" if batch1 else None,
        speedup >= SPEEDUP_TARGET if batch1 else None,
        f"{of_bound:.0%} of the bandwidth bound ({bytes_per_step(model, batch) / 2**20:.0f} "
        f"MiB/step at {bandwidth / 1e9:.1f} GB/s); tokens identical {same:.0%}; {threads} "
        f"threads; load average {os.getloadavg()[0]:.1f}",
    )


if __name__ == "__main__":
    common.report(main(), "t5_decode")
