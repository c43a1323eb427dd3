"""T5 greedy decoding: T5-small shape, 32-token encoder input, 32 new tokens, batch 1 and 8.

As benchmarks/decode.py does for GPT-2: random weights saved by transformers and loaded by
flaxauto, so both decode the same numbers (the row says how many tokens agree); flaxauto's
`generate` is one compiled program (the encoder run once, the cross-attention keys/values
computed once, then a while loop over the decoder alone); transformers' is PyTorch
`generate(do_sample=False)` under inference_mode with as many threads as JAX has cores. Both are
forced to 32 new tokens (min_new_tokens), timed interleaved, median after warm-up.

Two ceilings are measured in the same run and printed as the ratio to transformers that
reaching them would give:
- the machine's: the encoder (run once, compute-bound) at the faster of JAX's and PyTorch's
  matmul rate at its shape, plus per new token one step's reads (the decoder's kernels but the
  cross-attention key/value projections, which run once; the token table once, as the tied
  lm_head; the cross-attention cache) at the memory read bandwidth (decode.read_bandwidth);
- XLA:CPU's: the encoder's matmuls at XLA's own rate, plus per new token the step's matmuls
  alone, in T5's order and dependencies, as one compiled loop (`xla_step_seconds`): what any JAX
  program doing the step's matmuls takes, before attention, norms and token choice.
The row prints flaxauto's fraction of XLA:CPU's ceiling.

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


def step_kernels(model) -> list[dict]:
    """Per decoder block, the kernels a decoding step multiplies by: self attention's q, k, v, o,
    cross attention's q, o (its k, v project the encoder output once per call), the feed-forward's
    wi and wo."""
    blocks = []
    for block in model.backbone.decoder.block:
        own, cross, feed_forward = (layer for layer in block.layer)
        attention, encoder_attention = own.SelfAttention, cross.EncDecAttention
        kernels = {name: getattr(attention, name).kernel[...] for name in "qkvo"}
        kernels.update(
            cross_q=encoder_attention.q.kernel[...], cross_o=encoder_attention.o.kernel[...]
        )
        kernels.update(wi=feed_forward.DenseReluDense.wi.kernel[...])
        kernels.update(wo=feed_forward.DenseReluDense.wo.kernel[...])
        blocks.append(kernels)
    return blocks


def bytes_per_step(model, batch: int) -> int:
    """What one step reads: its kernels (step_kernels), the shared table once (as the lm_head)
    and the cross-attention keys/values of the whole source (norm scales: a few KiB, left out)."""
    kernels = sum(w.nbytes for block in step_kernels(model) for w in block.values())
    table = model.backbone.shared.embedding[...].nbytes
    config = model.config
    cross = 2 * config.num_decoder_layers * batch * SOURCE * config.num_heads * config.d_kv * 4
    return kernels + table + cross


def xla_step_seconds(model, batch: int, repeats: int) -> float:
    """Seconds per step of a compiled loop doing only a step's matmuls, as T5's step orders them
    (q, k, v side by side, then o; cross q then o; wi then wo; per block, then the token table),
    each result feeding the next through a cheap elementwise op: XLA:CPU's floor for the step."""
    import jax
    import jax.numpy as jnp

    def step(blocks, table, x):
        for w in blocks:
            q, k, v = x @ w["q"], x @ w["k"], x @ w["v"]
            x = x + jnp.tanh(q * k + v) @ w["o"]
            x = x + (x @ w["cross_q"]) @ w["cross_o"]
            x = x + jax.nn.relu(x @ w["wi"]) @ w["wo"]
        logits = jax.lax.dot_general(x, table, (((1,), (1,)), ((), ())))
        return x + 1e-3 * table[jnp.argmax(logits[0])]

    @jax.jit
    def loop(blocks, table, x, steps):
        return jax.lax.fori_loop(0, steps, lambda _, x: step(blocks, table, x), x)

    blocks, table = step_kernels(model), model.backbone.shared.embedding[...]
    x = jnp.ones((batch, model.config.d_model), jnp.float32)
    times = common.interleaved(
        {n: lambda n=n: loop(blocks, table, x, n).block_until_ready() for n in (1, NEW_TOKENS)},
        max(repeats, 5) * 2,
    )
    return (times[NEW_TOKENS] - times[1]) / (NEW_TOKENS - 1)


def encoder_flops(model, batch: int) -> int:
    """The encoder's matmul FLOPs on a [batch, SOURCE] input: every 2-D kernel once per token
    (the scores and the weighted sum over 32 positions are under 2% of it and left out)."""
    import jax
    from flax import nnx

    params = jax.tree_util.tree_leaves_with_path(nnx.state(model.backbone.encoder, nnx.Param))
    weights = sum(x.size for path, x in params if "kernel" in jax.tree_util.keystr(path))
    return 2 * batch * SOURCE * weights


def matmul_rates(rows: int, d_model: int, d_ff: int, repeats: int) -> dict[str, float]:
    """FLOP/s of the encoder's largest matmul ([rows, d_model] x [d_model, d_ff]) in JAX
    (XLA:CPU) and in PyTorch, medians of interleaved runs."""
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, d_model), np.float32)
    w = rng.standard_normal((d_model, d_ff), np.float32)
    jx, jw, tx, tw = jnp.asarray(x), jnp.asarray(w), torch.as_tensor(x), torch.as_tensor(w)
    product = jax.jit(jnp.matmul)
    times = common.interleaved(
        {"jax": lambda: product(jx, jw).block_until_ready(), "torch": lambda: tx @ tw},
        max(repeats, 5) * 4,
    )
    return {name: 2 * rows * d_model * d_ff / seconds for name, seconds in times.items()}


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
        config = model.config
        rates = matmul_rates(batch * SOURCE, config.d_model, config.d_ff, repeats)
        rates.update(bandwidth=bandwidth, xla_step=xla_step_seconds(model, batch, repeats))
        rows.append(measure(batch, ids, model, reference, rates, repeats, threads))
    return rows


def measure(batch, ids, model, reference, rates, repeats, threads) -> dict:
    """rates: matmul FLOP/s at the encoder's shape ("jax", "torch"), the memory read
    "bandwidth" (bytes/s) and XLA:CPU's floor for a step ("xla_step", seconds)."""
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
    flops, step_bytes = encoder_flops(model, batch), bytes_per_step(model, batch)
    best_rate = max(rates["jax"], rates["torch"])
    machine = flops / best_rate + NEW_TOKENS * step_bytes / rates["bandwidth"]  # s per call
    xla = flops / rates["jax"] + NEW_TOKENS * rates["xla_step"]
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
        f"{xla / times['flaxauto']:.0%} of XLA:CPU's ceiling, {times['torch'] / xla:.2f}x "
        f"transformers (encoder {flops / 1e9:.2f} GFLOP at {rates['jax'] / 1e9:.0f} GFLOP/s + "
        f"{NEW_TOKENS} steps of {rates['xla_step'] * 1e3:.2f} ms); the machine's ceiling "
        f"{times['torch'] / machine:.2f}x (encoder at {best_rate / 1e9:.0f} GFLOP/s + steps of "
        f"{step_bytes / 2**20:.0f} MiB at {rates['bandwidth'] / 1e9:.1f} GB/s); tokens "
        f"identical {same:.0%}; {threads} threads; load average {os.getloadavg()[0]:.1f}",
    )


if __name__ == "__main__":
    common.report(main(), "t5_decode")
