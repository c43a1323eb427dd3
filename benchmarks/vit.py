"""ViT forward: ViT-base/16 at 224 x 224, batch 8, fp32, image classification (1000 labels),
flaxauto under jit vs transformers PyTorch on the same weights.

Random weights are saved by transformers and loaded by flaxauto. flaxauto runs a jitted pure
function over nnx.split state; PyTorch runs eagerly under inference_mode with as many threads as
JAX has cores (its default attention, sdpa, and, for the eager row, eager attention). The matmul
bound: the model's FLOPs (matmuls and the patch projection, counted analytically) at the rate
the machine runs ViT's own MLP matmuls alone, timed in the same interleaved loop.

    python benchmarks/vit.py [--quick]
"""

from __future__ import annotations

import os
import tempfile

import common
import jax
import jax.numpy as jnp
import numpy as np

BATCH, SIZE = 8, 224


def model_flops(config, batch: int) -> int:
    """Multiply-add FLOPs: patch projection, q/k/v/o projections, attention, MLP, classifier."""
    patches = (SIZE // config.patch_size) ** 2
    tokens, e, f = batch * (patches + 1), config.hidden_size, config.intermediate_size
    per_layer = 2 * tokens * (4 * e * e + 2 * e * f) + 4 * batch * (patches + 1) ** 2 * e
    embed = 2 * batch * patches * (config.patch_size**2 * config.num_channels) * e
    return config.num_hidden_layers * per_layer + embed + 2 * batch * e * config.num_labels


def reference_matmuls(config, rng):
    """The machine's fp32 matmul rate at this model's shapes: ViT's MLP matmuls alone
    ([1576, 768] x [768, 3072] x [3072, 768], each layer its own weights) in one jitted
    program. Returns (run, FLOPs)."""
    tokens = BATCH * ((SIZE // config.patch_size) ** 2 + 1)
    e, f = config.hidden_size, config.intermediate_size

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
    repeats = 3 if args.quick else 10
    config = transformers.ViTConfig(num_labels=1000)  # google/vit-base-patch16-224's shape
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((BATCH, 3, SIZE, SIZE)).astype(np.float32)
    case = f"ViT-base/16 {SIZE}px batch {BATCH}"

    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        reference = transformers.ViTForImageClassification(config).eval()
        reference.save_pretrained(directory)
        ours = flaxauto.AutoModelForImageClassification.from_pretrained(directory)
    torch_pixels = torch.tensor(pixels)

    graphdef, state = nnx.split(ours)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(pixel_values=x).logits)
    jax_pixels = jnp.asarray(pixels)
    flax_run = lambda: forward(state, jax_pixels).block_until_ready()  # noqa: E731

    def torch_run():
        with torch.inference_mode():
            return reference(pixel_values=torch_pixels).logits

    error = float(np.max(np.abs(np.asarray(flax_run()) - torch_run().numpy())))
    matmuls, matmul_flops = reference_matmuls(config, rng)
    times = common.interleaved({"flax": flax_run, "torch": torch_run, "matmul": matmuls}, repeats)
    flops = model_flops(config, BATCH)
    matmul_rate = matmul_flops / times["matmul"]
    bound = flops / matmul_rate
    ratio = times["flax"] / times["torch"]
    attention = reference.config._attn_implementation
    return [
        common.row(
            "vit", f"{case} fp32 forward", common.ms(times["flax"]),
            f"torch eager ({attention} attention) {common.ms(times['torch'])}", ratio, "<= 0.85",
            ratio <= 0.85,
            f"max abs diff {error:.1e}; {threads} threads each; load average "
            f"{os.getloadavg()[0]:.1f}",
        ),
        common.row(
            "vit", f"{case} fp32 vs matmul bound",
            f"{flops / times['flax'] / 1e9:.0f} GFLOP/s ({flops / 1e9:.0f} GFLOP)",
            f"matmul {matmul_rate / 1e9:.0f} GFLOP/s: bound {common.ms(bound)}",
            times["flax"] / bound, "<= 1.15", times["flax"] / bound <= 1.15,
            f"torch at {times['torch'] / bound:.2f}x the bound",
        ),
    ]  # fmt: skip


if __name__ == "__main__":
    common.report(main(), "vit")
