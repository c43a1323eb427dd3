"""What the convolutional image backbones share (ResNet, RegNet, ConvNeXt): the channels-last
boundary, conv + batch-norm layers, pooling, and running stages while collecting their outputs.

Pixels arrive in transformers' layout [B, C, H, W] and are moved to channels-last [B, H, W, C]
once, at the backbone's entrance: XLA runs convolutions fastest with the channels innermost (and
TPUs and cuDNN want it too). Every layer works channels-last; the outputs go back to [B, C, H, W]
once at the exit, and per-stage hidden states only when they are asked for. Conv kernels are
[kh, kw, C_in / groups, C_out] from the converters' layout, never transposed per call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flaxauto import layers
from flaxauto.heads import SequenceClassificationHead
from flaxauto.outputs import BaseModelOutput
from flaxauto.registry import ConfigAttr, HeadSpec

Precision = layers.Precision

#: logical axes of a convolution's input and output channels: FSDP splits "embed", tensor
#: parallelism "mlp", as for a Linear
CHANNEL_AXES = ("embed", "mlp")
#: ResNet's and RegNet's conv kernel init: N(0, 2 / fan_out), fan_out = C_out * kh * kw
KAIMING = "kaiming_fan_out"


def channels_last(pixel_values: jax.Array, num_channels: int) -> jax.Array:
    """[B, C, H, W] -> [B, H, W, C], refusing another channel count as transformers does."""
    if pixel_values.ndim != 4:
        raise ValueError(f"pixel_values must be [batch, channels, height, width], got shape "
                         f"{pixel_values.shape}")  # fmt: skip
    if pixel_values.shape[1] != num_channels:
        raise ValueError(
            "Make sure that the channel dimension of the pixel values match with the one set in "
            f"the configuration (num_channels={num_channels}, got {pixel_values.shape[1]})."
        )
    return jnp.transpose(pixel_values, (0, 2, 3, 1))


def channels_first(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, C, H, W], transformers' layout for every returned feature map."""
    return jnp.transpose(x, (0, 3, 1, 2))


def conv(
    in_channels, out_channels, kernel_size, precision, rngs, *, init: str | None = None, **options
) -> nnx.Conv:
    """A 2-d convolution (torch's padding, stride, groups) over channels-last inputs. init: how
    from_config draws the kernel (converters.layout.initial_value), e.g. "kaiming_fan_out" for
    ResNet's and RegNet's kaiming_normal_(mode="fan_out", nonlinearity="relu")."""
    module = layers.conv(
        in_channels, out_channels, (kernel_size, kernel_size), CHANNEL_AXES, precision, rngs,
        **options,
    )  # fmt: skip
    if init is not None:
        module.kernel.set_metadata("init", init)
    return module


class ConvLayer(nnx.Module):
    """Convolution without bias, BatchNorm, activation: transformers' ResNetConvLayer and
    RegNetConvLayer (padding kernel_size // 2, so odd kernels keep the size at stride 1)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        precision: Precision,
        rngs: nnx.Rngs,
        *,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        activation: str | None = "relu",
    ):
        self.convolution = conv(
            in_channels, out_channels, kernel_size, precision, rngs, init=KAIMING,
            stride=stride, padding=kernel_size // 2, groups=groups, use_bias=False,
        )  # fmt: skip
        self.normalization = layers.batch_norm(out_channels, precision)
        self.activation = None if activation is None else layers.activation(activation)

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H', W', O]
        x = self.normalization(self.convolution(x))
        return x if self.activation is None else self.activation(x)


class ShortCut(nnx.Module):
    """The residual's 1x1 projection (and stride) where a layer changes width or size."""

    def __init__(self, in_channels, out_channels, precision, rngs, *, stride: int = 2):
        self.convolution = conv(
            in_channels, out_channels, 1, precision, rngs, init=KAIMING, stride=stride,
            use_bias=False,
        )  # fmt: skip
        self.normalization = layers.batch_norm(out_channels, precision)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.normalization(self.convolution(x))


def shortcut(in_channels, out_channels, precision, rngs, *, stride: int):
    """The residual path: a projection where width or size changes, else the identity (None)."""
    if in_channels == out_channels and stride == 1:
        return nnx.data(None)
    return ShortCut(in_channels, out_channels, precision, rngs, stride=stride)


def residual(shortcut_module, x: jax.Array) -> jax.Array:
    return x if shortcut_module is None else shortcut_module(x)


def max_pool(x: jax.Array, kernel_size: int, stride: int, padding: int) -> jax.Array:
    """torch's MaxPool2d over [B, H, W, C]: padding counts as -inf, never as a maximum."""
    window, strides = (1, kernel_size, kernel_size, 1), (1, stride, stride, 1)
    pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, pads)


def spatial_mean(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, C]: global average pooling (AdaptiveAvgPool2d((1, 1)) flattened),
    accumulated in float32."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)


def run_stages(stages, x: jax.Array, *, output_hidden_states: bool):
    """x [B, H, W, C] through every stage; the hidden states as transformers returns them: the
    input of each stage and the last output, each [B, C, H, W] (None unless asked)."""
    collected = []
    for stage in stages:
        collected.append(x)
        x = stage(x)
    collected.append(x)
    hidden = tuple(map(channels_first, collected)) if output_hidden_states else None
    return x, hidden


def backbone_output(x: jax.Array, pooled: jax.Array, hidden_states) -> BaseModelOutput:
    """last_hidden_state [B, C, H, W], pooler_output as the family shapes it."""
    return BaseModelOutput(
        last_hidden_state=channels_first(x), pooler_output=pooled, hidden_states=hidden_states
    )


class PooledConvModel(nnx.Module):
    """Stem, stages, global average pool: pooler_output [B, C, 1, 1] as transformers keeps it
    (ResNet, RegNet). A family sets its `embeddings_class` and `encoder_class` (whose `stages`
    run in order) and checks its config before building."""

    embeddings_class: type
    encoder_class: type

    def __init__(self, config, precision: layers.Precision, rngs: nnx.Rngs):
        self.num_channels = config.num_channels
        self.embedder = self.embeddings_class(config, precision, rngs)
        self.encoder = self.encoder_class(config, precision, rngs)

    def __call__(
        self,
        *,
        pixel_values=None,  # [B, C, H, W]
        output_hidden_states: bool = False,
        output_attentions: bool = False,  # no attention here: accepted, nothing returned
    ) -> BaseModelOutput:
        del output_attentions
        x = self.embedder(channels_last(pixel_values, self.num_channels))
        x, hidden = run_stages(self.encoder.stages, x, output_hidden_states=output_hidden_states)
        pooled = spatial_mean(x)[:, :, None, None]  # [B, C, 1, 1]
        return backbone_output(x, pooled, hidden)


def check_lengths(config, *names: str) -> None:
    """Per-stage lists (hidden_sizes, depths) must agree on the number of stages."""
    lengths = {name: len(getattr(config, name)) for name in names}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"per-stage config lists differ in length: {lengths}")


#: ResNet, RegNet: classifier = Sequential(Flatten, Linear), the Linear at `classifier.1`,
#: reading the flattened pooler output [B, hidden_sizes[-1]]; no dropout.
FLATTENED_POOLER_CLASSIFIER = HeadSpec(
    SequenceClassificationHead,
    names={"classifier.out": "classifier.1"},
    options={"pooling": "pooler", "dropout_rate": 0.0,
             "width": ConfigAttr("hidden_sizes", index=-1)},
)  # fmt: skip


def per_channel(values: jax.Array, x: jax.Array) -> jax.Array:
    """[C] -> [1, 1, 1, C] in x's dtype, to scale a channels-last map [B, H, W, C]."""
    return values.astype(x.dtype).reshape(1, 1, 1, -1)
