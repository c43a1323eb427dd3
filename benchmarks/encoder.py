"""Encoder forward: BERT-base, batch 8 x seq 128, flaxauto under jit vs transformers PyTorch.

Random weights are saved by transformers and loaded by flaxauto, so both run the same numbers.
flaxauto runs a jitted pure function over nnx.split state; PyTorch runs eagerly under
inference_mode with as many threads as JAX has cores. On a GPU (JAX's default backend a GPU and
torch.cuda available) both run there: PyTorch with sdpa attention, synchronized inside the timed
function, autocast to bf16 for the bf16 row; the rows name the devices and the fp32 matmul
arithmetic each framework ran (JAX's default may be TF32 there), and carry no target (the targets
are for the CPU). Achieved GFLOP/s (model FLOPs counted
analytically: matmuls only) is compared with the rate of BERT's own FFN matmuls run alone,
timed in the same loop: the time those FLOPs take at that rate is the matmul bound.

    python benchmarks/encoder.py [--quick]
"""

from __future__ import annotations

import os
import tempfile

import common
import jax
import jax.numpy as jnp
import numpy as np

BATCH, LENGTH = 8, 128


def model_flops(config, batch: int, length: int) -> int:
    """Multiply-add FLOPs of BERT's matmuls (projections, attention, FFN, pooler)."""
    tokens, e, f = batch * length, config.hidden_size, config.intermediate_size
    per_layer = 2 * tokens * (4 * e * e + 2 * e * f) + 4 * batch * length * length * e
    return config.num_hidden_layers * per_layer + 2 * batch * e * e


def reference_matmuls(config, rng):
    """The machine's fp32 matmul rate at this model's shapes: BERT's FFN matmuls alone
    ([1024, 768] x [768, 3072] x [3072, 768], each layer its own weights) in one jitted program,
    which runs about as long as the model, so both see the same machine. Returns (run, FLOPs)."""
    tokens, e, f = BATCH * LENGTH, config.hidden_size, config.intermediate_size

    def normal(*shape):  # scaled so that x stays ~ N(0, 1) along the chain
        return jnp.asarray(rng.standard_normal(shape, np.float32) / np.sqrt(shape[0]))

    x = normal(tokens, e) * np.sqrt(tokens)
    weights = [(normal(e, f), normal(f, e)) for _ in range(config.num_hidden_layers)]

    @jax.jit
    def chain(x, weights):
        for w_in, w_out in weights:
            x = (x @ w_in) @ w_out
        return x

    run = lambda: chain(x, weights).block_until_ready()  # noqa: E731
    return run, config.num_hidden_layers * 4 * tokens * e * f


def main(argv=None) -> list[dict]:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    import torch
    import transformers
    from flax import nnx

    import flaxauto

    threads = common.cores()
    torch.set_num_threads(threads)
    device = common.torch_device()
    repeats = 3 if args.quick else 10
    config = transformers.BertConfig()  # bert-base-uncased's shape
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (BATCH, LENGTH))
    mask = np.ones((BATCH, LENGTH), np.int32)
    mask[1, 100:] = 0  # some padding, as real batches have
    rows, case = [], f"BERT-base {BATCH}x{LENGTH}"

    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        reference = transformers.BertModel(config).eval()
        reference.save_pretrained(directory)
        if device == "cuda":  # the same weights, with PyTorch's fused attention, on the GPU
            reference = transformers.BertModel.from_pretrained(
                directory, attn_implementation="sdpa"
            )
            reference = reference.to(device).eval()
        models = {
            "fp32": flaxauto.AutoModel.from_pretrained(directory),
            "bf16": flaxauto.AutoModel.from_pretrained(directory, dtype=jnp.bfloat16),
        }
    torch_ids, torch_mask = torch.tensor(ids, device=device), torch.tensor(mask, device=device)
    inputs = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}

    def flax_forward(model):
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(**x).last_hidden_state)
        return lambda: forward(state, inputs).block_until_ready()

    def torch_forward(model, autocast: bool):
        def run():
            with torch.inference_mode(), torch.autocast(device, torch.bfloat16, enabled=autocast):
                output = model(input_ids=torch_ids, attention_mask=torch_mask).last_hidden_state
            common.synchronize(device)
            return output

        return run

    forwards = {dtype: flax_forward(model) for dtype, model in models.items()}
    expected = torch_forward(reference, False)().cpu().numpy()
    error = float(np.max(np.abs(np.asarray(forwards["fp32"]()) - expected)))

    matmuls, matmul_flops = reference_matmuls(config, rng)
    times = common.interleaved(
        {
            "flax fp32": forwards["fp32"],
            "torch fp32": torch_forward(reference, False),
            "matmul": matmuls,
            "flax bf16": forwards["bf16"],
            "torch bf16": torch_forward(reference, True),
        },
        repeats,
    )
    flops = model_flops(config, BATCH, LENGTH)
    matmul_rate = matmul_flops / times["matmul"]
    bound = flops / matmul_rate
    flax_rate = flops / times["flax fp32"]
    ratio = times["flax fp32"] / times["torch fp32"]
    if device == "cuda":
        return gpu_rows(case, times, error, flops, matmul_rate, bound)
    rows.append(
        common.row(
            "encoder", f"{case} fp32 forward", common.ms(times["flax fp32"]),
            f"torch eager {common.ms(times['torch fp32'])}", ratio, "<= 0.45", ratio <= 0.45,
            f"max abs diff {error:.1e}; {threads} threads each; load average "
            f"{os.getloadavg()[0]:.1f} (PyTorch's OpenMP threads slow down most under load)",
        )
    )  # fmt: skip
    rows.append(
        common.row(
            "encoder", f"{case} fp32 vs matmul bound",
            f"{flax_rate / 1e9:.0f} GFLOP/s ({flops / 1e9:.0f} GFLOP)",
            f"matmul {matmul_rate / 1e9:.0f} GFLOP/s: bound {common.ms(bound)}",
            times["flax fp32"] / bound, "<= 1.15", times["flax fp32"] / bound <= 1.15,
            f"torch at {times['torch fp32'] / bound:.2f}x the bound",
        )
    )  # fmt: skip
    rows.append(
        common.row(
            "encoder", f"{case} bf16 compute", common.ms(times["flax bf16"]),
            f"torch autocast bf16 {common.ms(times['torch bf16'])}",
            times["flax bf16"] / times["torch bf16"],
            note=f"flaxauto dtype=bfloat16; vs its own fp32: "
            f"{times['flax bf16'] / times['flax fp32']:.2f}x",
        )
    )  # fmt: skip
    return rows


def gpu_rows(case, times, error, flops, matmul_rate, bound) -> list[dict]:
    """The same comparisons on a GPU: no targets (they are the CPU's), the devices named."""
    import torch

    device = common.devices_label()
    matmuls = (
        f"fp32 matmuls: jax {common.arithmetic(common.jax_fp32_matmul_error(None))}, torch "
        f"{torch.get_float32_matmul_precision()!r}; flaxauto's default attention, torch sdpa"
    )
    rows = [
        common.row(
            "encoder", f"{case} fp32 forward", common.ms(times["flax fp32"]),
            f"torch cuda {common.ms(times['torch fp32'])}",
            times["flax fp32"] / times["torch fp32"], note=f"max abs diff {error:.1e}; {matmuls}",
        ),
        common.row(
            "encoder", f"{case} fp32 vs matmul bound",
            f"{flops / times['flax fp32'] / 1e12:.1f} TFLOP/s ({flops / 1e9:.0f} GFLOP)",
            f"matmul {matmul_rate / 1e12:.1f} TFLOP/s: bound {common.ms(bound)}",
            times["flax fp32"] / bound, note=f"torch at {times['torch fp32'] / bound:.2f}x the bound",
        ),
        common.row(
            "encoder", f"{case} bf16 compute", common.ms(times["flax bf16"]),
            f"torch cuda autocast bf16 {common.ms(times['torch bf16'])}",
            times["flax bf16"] / times["torch bf16"],
            note=f"flaxauto dtype=bfloat16; vs its own fp32: "
            f"{times['flax bf16'] / times['flax fp32']:.2f}x",
        ),
    ]  # fmt: skip
    return [{**r, "device": device} for r in rows]


if __name__ == "__main__":
    common.report(main(), "encoder")
