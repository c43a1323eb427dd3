"""Greedy decoding: GPT-2 small shape, 16-token prompt, 64 new tokens, batch 1 and 8.

Random weights are saved by transformers and loaded by flaxauto, so both generate from the same
numbers (and the run checks they produce the same tokens). flaxauto's `generate` is one compiled
program; transformers' is PyTorch `generate(do_sample=False)` under inference_mode with as many
threads as JAX has cores. Both are forced to 64 new tokens (min_new_tokens), timed interleaved,
median of several runs after warm-up. The ratio is flaxauto tokens/s over transformers tokens/s
(higher is better here). Run it on an otherwise idle machine: PyTorch's OpenMP threads spin, and
with other processes on the cores its generate was measured here up to 30x slower (the load
average is printed with each row).

Decoding one token reads every weight once, so its floor is (bytes of weights read per step) /
(memory read bandwidth). The bandwidth is measured in the same run by a jitted sum over a 1 GiB
array (larger than the last-level cache), the fastest read found on this machine: XLA splits the
sum over all cores (measured on 2 cores, quiet: about 31 GB/s, against 27 for torch's threaded sum
and 8 for numpy's single-threaded one; a sum over an array the size of the weights reads no
faster). "of bound" is that floor divided by flaxauto's time per token (prefill included).

On a GPU (JAX's default backend a GPU and torch.cuda available) both run there: transformers on
cuda with sdpa attention, synchronized inside the timed function; the bandwidth sum reads 4 GiB
(1 GiB takes a quarter of a millisecond there); the rows name the devices and carry no targets
(they are the CPU's).

    python benchmarks/decode.py [--quick]
"""

from __future__ import annotations

import os
import tempfile
import time

import common
import jax
import jax.numpy as jnp
import numpy as np

PROMPT, NEW_TOKENS, BATCHES = 16, 64, (1, 8)
SPEEDUP_TARGET, BOUND_TARGET = 2.2, 0.80


def read_bandwidth(repeats: int, elements: int = 2**28) -> float:
    """Bytes/s a jitted reduction reads from a float32 array, 1 GiB unless told (best of
    `repeats`)."""
    data = jnp.ones((elements,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(data).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        total(data).block_until_ready()
        best = min(best, time.perf_counter() - start)
    del data
    return elements * 4 / best


def bytes_per_step(model) -> int:
    """Weight bytes one decoding step reads: everything but the position table, of which it
    reads one row (the tied LM head reads the token table [V, E] once more, as its output)."""
    from flax import nnx

    state = nnx.state(model, nnx.Param)
    total = sum(x.nbytes for x in jax.tree.leaves(state))
    wpe = model.backbone.wpe.embedding[...]
    return total - wpe.nbytes + wpe.nbytes // wpe.shape[0]


def main(argv=None) -> list[dict]:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    import torch
    import transformers

    import flaxauto

    threads = common.cores()
    torch.set_num_threads(threads)
    device = common.torch_device()
    repeats = 2 if args.quick else 5
    config = transformers.GPT2Config()  # gpt2 (small): 12 layers, 768 wide, 50257 tokens
    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(config).save_pretrained(directory)
        # loaded back, as a user's model is: generate on the freshly built one runs 25-40x slower
        # in transformers 5.24 (measured here), which would flatter the ratio
        reference = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
        if device == "cuda":  # the same weights, with PyTorch's fused attention, on the GPU
            reference = transformers.GPT2LMHeadModel.from_pretrained(
                directory, attn_implementation="sdpa"
            )
            reference = reference.to(device).eval()
        models = {
            "fp32": flaxauto.AutoModelForCausalLM.from_pretrained(directory),
            "bf16": flaxauto.AutoModelForCausalLM.from_pretrained(
                directory, param_dtype=jnp.bfloat16
            ),
        }
    import copy

    references = {"fp32": reference, "bf16": copy.deepcopy(reference).to(torch.bfloat16)}
    bandwidth = read_bandwidth(repeats + 3, 2**30 if device == "cuda" else 2**28)
    rows = []
    for batch in BATCHES if not args.quick else BATCHES[:1]:
        ids = np.random.default_rng(batch).integers(0, config.vocab_size, (batch, PROMPT))
        for dtype, model in models.items():
            rows.append(
                measure(dtype, batch, ids, model, references[dtype], bandwidth, repeats, threads)
            )
    if device == "cuda":  # the targets are the CPU's; say which devices ran
        label = common.devices_label()
        rows = [{**r, "target": None, "met": None, "device": label} for r in rows]
    return rows


def measure(dtype, batch, ids, model, reference, bandwidth, repeats, threads) -> dict:
    import torch

    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    device = common.torch_device()
    torch_ids = torch.as_tensor(ids, device=device)
    torch_mask = torch.ones_like(torch_ids)

    def ours():
        return np.asarray(model.generate(ids, **settings))

    def theirs():
        with torch.inference_mode():
            tokens = reference.generate(
                torch_ids, attention_mask=torch_mask, do_sample=False, **settings
            )
        common.synchronize(device)
        return tokens.cpu().numpy()

    same = np.mean(ours() == theirs())
    times = common.interleaved({"flaxauto": ours, "torch": theirs}, repeats, warmup=1)
    ours_rate = batch * NEW_TOKENS / times["flaxauto"]
    theirs_rate = batch * NEW_TOKENS / times["torch"]
    per_token = times["flaxauto"] / NEW_TOKENS
    of_bound = bytes_per_step(model) / bandwidth / per_token
    speedup = ours_rate / theirs_rate
    fp32_batch1 = dtype == "fp32" and batch == 1
    return common.row(
        "decode",
        f"GPT-2 small {dtype} weights, batch {batch}",
        f"{ours_rate:.1f} tok/s",
        f"transformers {theirs_rate:.1f} tok/s",
        speedup,
        f">= {SPEEDUP_TARGET}" if fp32_batch1 else None,
        speedup >= SPEEDUP_TARGET if fp32_batch1 else None,
        f"{of_bound:.0%} of the bandwidth bound ({bytes_per_step(model) / 2**20:.0f} MiB/step at "
        f"{bandwidth / 1e9:.1f} GB/s; target >= {BOUND_TARGET:.0%}); tokens identical "
        f"{same:.0%}; {threads} threads; load average {os.getloadavg()[0]:.1f}",
    )


if __name__ == "__main__":
    common.report(main(), "decode")
