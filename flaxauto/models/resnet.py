"""ResNet (transformers' ResNetModel): basic and bottleneck layers, BatchNorm with running
statistics (model.train() updates them as torch does, model.eval() reads them), and
ResNetForImageClassification.

Attribute paths are transformers' (`embedder.embedder.convolution`, `encoder.stages.0.layers.0.
layer.1.normalization.running_mean`, ...); every layer runs channels-last (flaxauto.convnets).
"""

from __future__ import annotations

import jax
from flax import nnx

from flaxauto import convnets, layers
from flaxauto.registry import HeadSpec, register

Precision = layers.Precision


def check_config(config) -> None:
    if config.layer_type not in ("basic", "bottleneck"):
        raise NotImplementedError(f"layer_type={config.layer_type!r} is not implemented")
    convnets.check_lengths(config, "hidden_sizes", "depths")
    layers.activation(config.hidden_act)


class ResNetEmbeddings(nnx.Module):
    """The stem: a 7x7 stride-2 conv layer, then a 3x3 stride-2 max pool."""

    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        self.embedder = convnets.ConvLayer(
            config.num_channels, config.embedding_size, precision, rngs,
            kernel_size=7, stride=2, activation=config.hidden_act,
        )  # fmt: skip

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H/4, W/4, E]
        return convnets.max_pool(self.embedder(x), kernel_size=3, stride=2, padding=1)


class ResNetBasicLayer(nnx.Module):
    """Two 3x3 conv layers and the residual, then the activation."""

    def __init__(self, config, in_channels, out_channels, precision, rngs, *, stride: int = 1):
        self.shortcut = convnets.shortcut(in_channels, out_channels, precision, rngs, stride=stride)
        self.layer = nnx.List([
            convnets.ConvLayer(in_channels, out_channels, precision, rngs, stride=stride),
            convnets.ConvLayer(out_channels, out_channels, precision, rngs, activation=None),
        ])  # fmt: skip
        self.activation = layers.activation(config.hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = x
        for conv_layer in self.layer:
            hidden = conv_layer(hidden)
        return self.activation(hidden + convnets.residual(self.shortcut, x))


class ResNetBottleNeckLayer(ResNetBasicLayer):
    """1x1 reduce (by 4), 3x3, 1x1 expand; the stride sits on the 3x3 conv, or on the first 1x1
    with downsample_in_bottleneck."""

    def __init__(self, config, in_channels, out_channels, precision, rngs, *, stride: int = 1):
        self.shortcut = convnets.shortcut(in_channels, out_channels, precision, rngs, stride=stride)
        reduced = out_channels // 4
        first_stride = stride if config.downsample_in_bottleneck else 1
        self.layer = nnx.List([
            convnets.ConvLayer(
                in_channels, reduced, precision, rngs, kernel_size=1, stride=first_stride
            ),
            convnets.ConvLayer(reduced, reduced, precision, rngs, stride=stride // first_stride),
            convnets.ConvLayer(reduced, out_channels, precision, rngs, kernel_size=1,
                               activation=None),
        ])  # fmt: skip
        self.activation = layers.activation(config.hidden_act)


class ResNetStage(nnx.Module):
    def __init__(self, config, in_channels, out_channels, precision, rngs, *, stride, depth):
        layer = ResNetBottleNeckLayer if config.layer_type == "bottleneck" else ResNetBasicLayer
        self.layers = nnx.List([
            layer(config, in_channels if i == 0 else out_channels, out_channels, precision, rngs,
                  stride=stride if i == 0 else 1)
            for i in range(depth)
        ])  # fmt: skip

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x


def stage_plan(config) -> list[tuple[int, int, int, int]]:
    """(in_channels, out_channels, stride, depth) per stage: the first keeps the stem's size
    unless downsample_in_first_stage; every later one halves it."""
    widths = [config.embedding_size, *config.hidden_sizes]
    first_stride = 2 if config.downsample_in_first_stage else 1
    return [
        (widths[i], widths[i + 1], first_stride if i == 0 else 2, depth)
        for i, depth in enumerate(config.depths)
    ]


class ResNetEncoder(nnx.Module):
    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        self.stages = nnx.List([
            ResNetStage(config, c_in, c_out, precision, rngs, stride=stride, depth=depth)
            for c_in, c_out, stride, depth in stage_plan(config)
        ])  # fmt: skip


class ResNetModel(convnets.PooledConvModel):
    embeddings_class = ResNetEmbeddings
    encoder_class = ResNetEncoder

    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        check_config(config)
        super().__init__(config, precision, rngs)


#: What ResNet reads from the config (flaxauto.config_checks refuses the rest). The backbone
#: output features (out_features / out_indices) serve ResNetBackbone, which flaxauto lacks.
CONFIG_ATTRIBUTES = (
    "num_channels", "embedding_size", "hidden_sizes", "depths", "layer_type", "hidden_act",
    "downsample_in_first_stage", "downsample_in_bottleneck", "stage_names", "out_features",
    "out_indices",
)  # fmt: skip

register(
    model_types=("resnet",),
    backbone=ResNetModel,
    base_model_prefix="resnet",
    main_input_name="pixel_values",
    config_attributes=CONFIG_ATTRIBUTES,
    heads={"base": HeadSpec(None), "image-classification": convnets.FLATTENED_POOLER_CLASSIFIER},
)
