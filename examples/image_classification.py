"""Image classification with flaxauto, preprocessing by transformers' image processor.

    python examples/image_classification.py [CHECKPOINT] [IMAGE]

CHECKPOINT: a hub id or directory of an image classifier (ViT, DeiT, BEiT, ...); default
google/vit-base-patch16-224; "tiny-random" writes a tiny random ViT and its processor with
transformers first (offline; needs torch). IMAGE: a picture file; default a synthetic gradient and
checkerboard. The processor is transformers' numpy/PIL one (no torch, no torchvision): it
resizes, rescales and normalises into pixel_values [B, C, H, W], which flaxauto takes as they are.
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from transformers import AutoImageProcessor

import flaxauto


def synthetic_image(height: int = 240, width: int = 320) -> np.ndarray:
    """[H, W, 3] uint8: red and green gradients, a blue checkerboard."""
    rows, cols = np.mgrid[0:height, 0:width]
    checker = ((rows // 20 + cols // 20) % 2) * 255
    return np.stack([cols * 255 // width, rows * 255 // height, checker], -1).astype(np.uint8)


def load_image(path: str | None) -> np.ndarray:
    if path is None:
        return synthetic_image()
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def tiny_random_checkpoint() -> str:
    import tempfile

    import transformers

    directory = tempfile.mkdtemp()
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, num_labels=5,
    )  # fmt: skip
    transformers.ViTForImageClassification(config).save_pretrained(directory)
    transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def main(checkpoint: str = "google/vit-base-patch16-224", image_path: str | None = None):
    if checkpoint == "tiny-random":
        checkpoint = tiny_random_checkpoint()
    # backend="pil": the numpy/PIL processor (the torchvision one needs torch)
    processor = AutoImageProcessor.from_pretrained(checkpoint, backend="pil")
    model = flaxauto.AutoModelForImageClassification.from_pretrained(checkpoint)
    pixel_values = processor(images=[load_image(image_path)], return_tensors="np")["pixel_values"]
    logits = jax.jit(lambda m, x: m(pixel_values=x).logits)(model, pixel_values)  # [1, labels]
    probabilities = jax.nn.softmax(logits[0])
    for index in np.argsort(-np.asarray(probabilities))[:5]:
        print(f"{float(probabilities[index]):.3f}  {model.config.id2label[int(index)]}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
