"""DETR-ResNet-50 forward: batch 2 x 3 x 800 x 800 fp32, flaxauto under jit vs transformers
PyTorch on the same weights.

facebook/detr-resnet-50's shape (ResNet-50, d_model 256, 6 + 6 layers, 8 heads, 100 queries,
91 classes) with random weights. transformers builds a timm backbone only with timm installed,
so both sides take transformers' own ResNet-50 (use_timm_backbone=False, the same modules and
numbers); transformers saves the model and flaxauto loads it. The second image is padded (its
pixel_mask covers 800 x 600), as DETR's image processor pads a batch. flaxauto runs a jitted pure
function over nnx.split state; PyTorch runs eagerly under inference_mode with as many threads as
JAX has cores.

    python benchmarks/detection.py [--quick]
"""

from __future__ import annotations

import os
import tempfile

import common
import jax
import jax.numpy as jnp
import numpy as np

BATCH, SIZE = 2, 800


def detr_resnet50_config():
    import transformers

    backbone = transformers.ResNetConfig(out_features=["stage4"])  # ResNet-50's shape
    return transformers.DetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone=None,
        backbone_config=backbone, num_labels=91,
    )  # fmt: skip


def main(argv=None) -> list[dict]:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    import torch
    import transformers
    from flax import nnx

    import flaxauto

    threads = common.cores()
    torch.set_num_threads(threads)
    repeats = 2 if args.quick else 5
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((BATCH, 3, SIZE, SIZE)).astype(np.float32)
    mask = np.ones((BATCH, SIZE, SIZE), np.int64)
    mask[1, :, SIZE * 3 // 4 :] = 0
    pixels *= mask[:, None].astype(np.float32)
    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        reference = transformers.DetrForObjectDetection(detr_resnet50_config()).eval()
        reference.save_pretrained(directory)
        model = flaxauto.AutoModelForObjectDetection.from_pretrained(directory)

    graphdef, state = nnx.split(model)
    forward = jax.jit(
        lambda s, x, m: (lambda o: (o.logits, o.pred_boxes))(
            nnx.merge(graphdef, s)(pixel_values=x, pixel_mask=m)
        )
    )
    flax_inputs = (jnp.asarray(pixels), jnp.asarray(mask))
    flax_run = lambda: jax.block_until_ready(forward(state, *flax_inputs))  # noqa: E731
    torch_inputs = {"pixel_values": torch.tensor(pixels), "pixel_mask": torch.tensor(mask)}

    def torch_run():
        with torch.inference_mode():
            output = reference(**torch_inputs)
        return output.logits, output.pred_boxes

    (logits, boxes), (expected_logits, expected_boxes) = flax_run(), torch_run()
    error = max(
        float(np.max(np.abs(np.asarray(logits) - expected_logits.numpy()))),
        float(np.max(np.abs(np.asarray(boxes) - expected_boxes.numpy()))),
    )
    times = common.interleaved({"flax": flax_run, "torch": torch_run}, repeats, warmup=1)
    ratio = times["flax"] / times["torch"]
    load = f"{threads} threads each; load average {os.getloadavg()[0]:.1f}"
    return [
        common.row(
            "detection", f"DETR-ResNet-50 {BATCH}x3x{SIZE}x{SIZE} fp32 forward (pixel_mask)",
            common.ms(times["flax"]), f"torch eager {common.ms(times['torch'])}", ratio,
            note=f"max abs diff of logits and boxes {error:.1e}; {repeats} runs; {load}",
        ),
    ]  # fmt: skip


if __name__ == "__main__":
    common.report(main(), "detection")
