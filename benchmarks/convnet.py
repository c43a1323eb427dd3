"""ResNet-50 forward: batch 8 x 3 x 224 x 224 fp32, flaxauto under jit vs transformers PyTorch.

Random weights (ResNetConfig's defaults are ResNet-50's shape, 1000 classes) are saved by
transformers and loaded by flaxauto, so both run the same numbers. flaxauto runs a jitted pure
function over nnx.split state (channels-last inside); PyTorch runs eagerly under inference_mode
with as many threads as JAX has cores, in its default [B, C, H, W] layout and again with
channels_last memory format. The convolution bound: the model's FLOPs (every conv and the
classifier, counted from PyTorch's own output shapes) at the rate this machine runs ResNet-50's
bottleneck convolutions alone (1x1 reduce, 3x3, 1x1 expand at each stage's resolution and depth,
one jitted program, timed in the same loop).

    python benchmarks/convnet.py [--quick]
"""

from __future__ import annotations

import os
import tempfile

import common
import jax
import jax.numpy as jnp
import numpy as np

BATCH, SIZE = 8, 224


def count_flops(model, pixels) -> int:
    """2 x multiply-adds of every Conv2d and Linear, from the shapes PyTorch produces."""
    import torch

    total = 0

    def conv_hook(module, inputs, output):
        nonlocal total
        per_output = module.in_channels // module.groups * int(np.prod(module.kernel_size))
        total += 2 * output.numel() * per_output

    def linear_hook(module, inputs, output):
        nonlocal total
        total += 2 * output.numel() * module.in_features

    hooks = [
        m.register_forward_hook(conv_hook if isinstance(m, torch.nn.Conv2d) else linear_hook)
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    ]
    with torch.inference_mode():
        model(pixel_values=pixels)
    for hook in hooks:
        hook.remove()
    return total


def reference_convolutions(config, rng):
    """The machine's fp32 convolution rate at ResNet-50's shapes: each stage's bottleneck convs
    (no norm, activation or residual) chained depth times at its resolution, channels-last, in
    one jitted program. Returns (run, FLOPs)."""
    resolution = SIZE // 4
    plan, flops = [], 0
    for stage, (width, depth) in enumerate(zip(config.hidden_sizes, config.depths, strict=True)):
        size, reduced = resolution // 2**stage, width // 4
        kernels = []
        for _ in range(depth):
            shapes = [(1, 1, width, reduced), (3, 3, reduced, reduced), (1, 1, reduced, width)]
            kernels.append([jnp.asarray(_he(rng, s)) for s in shapes])
            flops += sum(2 * BATCH * size * size * int(np.prod(s)) for s in shapes)
        x = jnp.asarray(rng.standard_normal((BATCH, size, size, width), np.float32))
        plan.append((x, kernels))

    def conv(x, kernel):
        return jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    @jax.jit
    def chain(plan):
        out = []
        for x, kernels in plan:
            for block in kernels:
                for kernel in block:
                    x = conv(x, kernel)
            out.append(x)
        return out

    run = lambda: jax.block_until_ready(chain(plan))  # noqa: E731
    return run, flops


def _he(rng, shape):  # keeps activations ~ N(0, 1) along the chain
    fan_in = int(np.prod(shape[:-1]))
    return (rng.standard_normal(shape, np.float32) / np.sqrt(fan_in)).astype(np.float32)


def main(argv=None) -> list[dict]:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    import torch
    import transformers
    from flax import nnx

    import flaxauto

    threads = common.cores()
    torch.set_num_threads(threads)
    repeats = 3 if args.quick else 7
    config = transformers.ResNetConfig(num_labels=1000)  # microsoft/resnet-50's shape
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((BATCH, 3, SIZE, SIZE)).astype(np.float32)
    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        reference = transformers.ResNetForImageClassification(config).eval()
        reference.save_pretrained(directory)
        model = flaxauto.AutoModelForImageClassification.from_pretrained(directory)
    torch_pixels = torch.tensor(pixels)
    channels_last = torch_pixels.contiguous(memory_format=torch.channels_last)
    reference_cl = transformers.ResNetForImageClassification(config).eval()
    reference_cl.load_state_dict(reference.state_dict())
    reference_cl = reference_cl.to(memory_format=torch.channels_last)

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(pixel_values=x).logits)
    flax_pixels = jnp.asarray(pixels)
    flax_run = lambda: forward(state, flax_pixels).block_until_ready()  # noqa: E731

    def torch_run(module, x):
        def run():
            with torch.inference_mode():
                return module(pixel_values=x).logits

        return run

    expected = torch_run(reference, torch_pixels)().numpy()
    error = float(np.max(np.abs(np.asarray(flax_run()) - expected)))
    flops = count_flops(reference, torch_pixels)
    convolutions, conv_flops = reference_convolutions(config, rng)
    times = common.interleaved(
        {
            "flax": flax_run,
            "torch": torch_run(reference, torch_pixels),
            "torch channels_last": torch_run(reference_cl, channels_last),
            "conv": convolutions,
        },
        repeats,
    )
    rate = conv_flops / times["conv"]
    bound = flops / rate
    ratio = times["flax"] / times["torch"]
    case = f"ResNet-50 {BATCH}x3x{SIZE}x{SIZE} fp32"
    load = f"{threads} threads each; load average {os.getloadavg()[0]:.1f}"
    return [
        common.row(
            "convnet", f"{case} forward", common.ms(times["flax"]),
            f"torch eager {common.ms(times['torch'])}", ratio, "<= 1.0", ratio <= 1.0,
            f"max abs diff {error:.1e} (logits up to {np.max(np.abs(expected)):.0f}); "
            f"torch channels_last "
            f"{common.ms(times['torch channels_last'])} "
            f"({times['flax'] / times['torch channels_last']:.2f}x); {load}",
        ),
        common.row(
            "convnet", f"{case} vs convolution bound",
            f"{flops / times['flax'] / 1e9:.0f} GFLOP/s ({flops / 1e9:.1f} GFLOP)",
            f"convs alone {rate / 1e9:.0f} GFLOP/s: bound {common.ms(bound)}",
            times["flax"] / bound,
            note=f"torch at {times['torch'] / bound:.2f}x the bound",
        ),
    ]  # fmt: skip


if __name__ == "__main__":
    common.report(main(), "convnet")
