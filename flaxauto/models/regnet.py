"""RegNet (transformers' RegNetModel): X layers (a bottleneck without reduction, its 3x3 conv
grouped into groups_width channels per group) and Y layers (X with squeeze-and-excitation), and
RegNetForImageClassification.

Attribute paths are transformers' (`embedder.embedder.convolution`, `encoder.stages.0.layers.0.
layer.2.attention.0`, ...); every layer runs channels-last (flaxauto.convnets).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flaxauto import convnets, layers
from flaxauto.registry import HeadSpec, register

Precision = layers.Precision


def check_config(config) -> None:
    if config.layer_type not in ("x", "y"):
        raise NotImplementedError(f"layer_type={config.layer_type!r} is not implemented")
    convnets.check_lengths(config, "hidden_sizes", "depths")
    layers.activation(config.hidden_act)


class RegNetEmbeddings(nnx.Module):
    """The stem: one 3x3 stride-2 conv layer."""

    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        self.embedder = convnets.ConvLayer(
            config.num_channels, config.embedding_size, precision, rngs,
            kernel_size=3, stride=2, activation=config.hidden_act,
        )  # fmt: skip

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.embedder(x)


class RegNetSELayer(nnx.Module):
    """Squeeze-and-excitation: the spatial mean through 1x1 conv, ReLU, 1x1 conv, sigmoid gives
    one gate per channel. `attention.0` and `attention.2` are torch's Sequential indices (1 and 3
    hold the activations, no parameters)."""

    def __init__(self, in_channels: int, reduced: int, precision: Precision, rngs: nnx.Rngs):
        self.attention = nnx.Dict({
            "0": convnets.conv(in_channels, reduced, 1, precision, rngs, init=convnets.KAIMING),
            "2": convnets.conv(reduced, in_channels, 1, precision, rngs, init=convnets.KAIMING),
        })  # fmt: skip

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C]
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        squeezed = jax.nn.relu(self.attention["0"](pooled))  # [B, 1, 1, R]
        return x * jax.nn.sigmoid(self.attention["2"](squeezed))


class RegNetLayer(nnx.Module):
    """1x1, grouped 3x3 (the stride), [squeeze-excitation], 1x1, plus the residual."""

    def __init__(self, config, in_channels, out_channels, precision, rngs, *, stride: int = 1):
        groups = max(1, out_channels // config.groups_width)
        self.shortcut = convnets.shortcut(in_channels, out_channels, precision, rngs, stride=stride)
        act = config.hidden_act
        blocks = [
            convnets.ConvLayer(in_channels, out_channels, precision, rngs, kernel_size=1,
                               activation=act),
            convnets.ConvLayer(out_channels, out_channels, precision, rngs, stride=stride,
                               groups=groups, activation=act),
        ]  # fmt: skip
        if config.layer_type == "y":
            reduced = int(round(in_channels / 4))
            blocks.append(RegNetSELayer(out_channels, reduced, precision, rngs))
        blocks.append(
            convnets.ConvLayer(
                out_channels, out_channels, precision, rngs, kernel_size=1, activation=None
            )
        )
        self.layer = nnx.List(blocks)
        self.activation = layers.activation(act)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = x
        for block in self.layer:
            hidden = block(hidden)
        return self.activation(hidden + convnets.residual(self.shortcut, x))


class RegNetStage(nnx.Module):
    def __init__(self, config, in_channels, out_channels, precision, rngs, *, stride, depth):
        self.layers = nnx.List([
            RegNetLayer(config, in_channels if i == 0 else out_channels, out_channels, precision,
                        rngs, stride=stride if i == 0 else 1)
            for i in range(depth)
        ])  # fmt: skip

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x


class RegNetEncoder(nnx.Module):
    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        widths = [config.embedding_size, *config.hidden_sizes]
        first_stride = 2 if config.downsample_in_first_stage else 1
        self.stages = nnx.List([
            RegNetStage(config, widths[i], widths[i + 1], precision, rngs,
                        stride=first_stride if i == 0 else 2, depth=depth)
            for i, depth in enumerate(config.depths)
        ])  # fmt: skip


class RegNetModel(convnets.PooledConvModel):
    embeddings_class = RegNetEmbeddings
    encoder_class = RegNetEncoder

    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        check_config(config)
        super().__init__(config, precision, rngs)


CONFIG_ATTRIBUTES = (
    "num_channels", "embedding_size", "hidden_sizes", "depths", "groups_width", "layer_type",
    "hidden_act", "downsample_in_first_stage",
)  # fmt: skip

register(
    model_types=("regnet",),
    backbone=RegNetModel,
    base_model_prefix="regnet",
    main_input_name="pixel_values",
    config_attributes=CONFIG_ATTRIBUTES,
    heads={"base": HeadSpec(None), "image-classification": convnets.FLATTENED_POOLER_CLASSIFIER},
)
