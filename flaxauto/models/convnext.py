"""ConvNeXt (transformers' ConvNextModel): a patchify stem, stages of depthwise 7x7 conv,
channels-last LayerNorm, pointwise MLP and layer scale with stochastic depth (drop path, active
only in model.train()), and ConvNextForImageClassification.

Attribute paths are transformers' (`embeddings.patch_embeddings`, `encoder.stages.1.
downsampling_layer.0`, `encoder.stages.0.layers.0.dwconv`, ...). transformers permutes to
channels-last around each layer's norm and MLP; here everything is channels-last already, so its
"channels_first" LayerNorms are plain LayerNorms over the last axis.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from flaxauto import convnets, layers
from flaxauto.heads import SequenceClassificationHead
from flaxauto.outputs import BaseModelOutput
from flaxauto.registry import ConfigAttr, HeadSpec, register

Precision = layers.Precision

#: every ConvNeXt LayerNorm but the final one has a fixed epsilon in transformers
BLOCK_EPS = 1e-6


def check_config(config) -> None:
    convnets.check_lengths(config, "hidden_sizes", "depths")
    if config.num_stages != len(config.depths):
        raise ValueError(
            f"num_stages={config.num_stages} but depths has {len(config.depths)} stages"
        )
    layers.activation(config.hidden_act)


class ConvNextEmbeddings(nnx.Module):
    """Patchify: a patch_size x patch_size conv with that stride, then LayerNorm."""

    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        width, patch = config.hidden_sizes[0], config.patch_size
        if not isinstance(patch, int):
            raise NotImplementedError(f"patch_size={patch!r}: only a square (int) patch size")
        self.patch_embeddings = convnets.conv(
            config.num_channels, width, patch, precision, rngs, stride=patch
        )
        self.layernorm = layers.layer_norm(width, BLOCK_EPS, precision, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H/p, W/p, E]
        return self.layernorm(self.patch_embeddings(x))


class ConvNextLayer(nnx.Module):
    """x + drop_path(gamma * pwconv2(act(pwconv1(norm(dwconv(x))))))."""

    def __init__(self, config, dim: int, drop_path: float, precision, rngs):
        self.dwconv = convnets.conv(dim, dim, 7, precision, rngs, padding=3, groups=dim)
        self.layernorm = layers.layer_norm(dim, BLOCK_EPS, precision, rngs)
        self.pwconv1 = layers.linear(dim, 4 * dim, ("embed", "mlp"), precision, rngs)
        self.act = layers.activation(config.hidden_act)
        self.pwconv2 = layers.linear(4 * dim, dim, ("mlp", "embed"), precision, rngs)
        scale = config.layer_scale_init_value
        self.layer_scale_parameter = (
            layers.parameter((dim,), ("embed",), precision, init=float(scale))
            if scale > 0
            else nnx.data(None)
        )
        # drop path is dropout of the whole residual branch, one draw per example
        self.drop_path = nnx.Dropout(drop_path, broadcast_dims=(1, 2, 3), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C]
        branch = self.pwconv2(self.act(self.pwconv1(self.layernorm(self.dwconv(x)))))
        if self.layer_scale_parameter is not None:
            branch = convnets.per_channel(self.layer_scale_parameter[...], branch) * branch
        return x + self.drop_path(branch)


class ConvNextStage(nnx.Module):
    """[LayerNorm, 2x2 stride-2 conv] where width or size changes (`downsampling_layer.0/1`),
    then the layers."""

    def __init__(self, config, in_ch, out_ch, precision, rngs, *, stride, drop_paths):
        if in_ch != out_ch or stride > 1:
            self.downsampling_layer = nnx.List([
                layers.layer_norm(in_ch, BLOCK_EPS, precision, rngs),
                convnets.conv(in_ch, out_ch, 2, precision, rngs, stride=stride),
            ])  # fmt: skip
        else:
            self.downsampling_layer = nnx.List([])
        self.layers = nnx.List([
            ConvNextLayer(config, out_ch, rate, precision, rngs) for rate in drop_paths
        ])  # fmt: skip

    def __call__(self, x: jax.Array) -> jax.Array:
        for module in (*self.downsampling_layer, *self.layers):
            x = module(x)
        return x


def drop_path_rates(config) -> list[list[float]]:
    """Rates rising linearly from 0 to drop_path_rate over all layers, split per stage (as
    transformers' torch.linspace, computed in float32)."""
    rates = np.linspace(0, config.drop_path_rate, sum(config.depths), dtype=np.float32)
    bounds = np.cumsum([0, *config.depths])
    return [rates[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class ConvNextEncoder(nnx.Module):
    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        widths = [config.hidden_sizes[0], *config.hidden_sizes]
        self.stages = nnx.List([
            ConvNextStage(config, widths[i], widths[i + 1], precision, rngs,
                          stride=2 if i > 0 else 1, drop_paths=rates)
            for i, rates in enumerate(drop_path_rates(config))
        ])  # fmt: skip


class ConvNextModel(nnx.Module):
    """Stem, stages, then LayerNorm of the spatial mean: pooler_output [B, C]."""

    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        check_config(config)
        self.num_channels = config.num_channels
        self.embeddings = ConvNextEmbeddings(config, precision, rngs)
        self.encoder = ConvNextEncoder(config, precision, rngs)
        self.layernorm = layers.layer_norm(
            config.hidden_sizes[-1], config.layer_norm_eps, precision, rngs
        )

    def __call__(
        self,
        *,
        pixel_values=None,  # [B, C, H, W]
        output_hidden_states: bool = False,
        output_attentions: bool = False,  # no attention here: accepted, nothing returned
    ) -> BaseModelOutput:
        del output_attentions
        x = self.embeddings(convnets.channels_last(pixel_values, self.num_channels))
        x, hidden = convnets.run_stages(
            self.encoder.stages, x, output_hidden_states=output_hidden_states
        )
        pooled = self.layernorm(convnets.spatial_mean(x))  # [B, C]
        return convnets.backbone_output(x, pooled, hidden)


CONFIG_ATTRIBUTES = (
    "num_channels", "patch_size", "num_stages", "hidden_sizes", "depths", "hidden_act",
    "initializer_range", "layer_norm_eps", "layer_scale_init_value", "drop_path_rate",
    "image_size", "stage_names", "out_features", "out_indices",
)  # fmt: skip

register(
    model_types=("convnext",),
    backbone=ConvNextModel,
    base_model_prefix="convnext",
    main_input_name="pixel_values",
    config_attributes=CONFIG_ATTRIBUTES,
    heads={
        "base": HeadSpec(None),
        "image-classification": HeadSpec(
            SequenceClassificationHead,
            names={"classifier.out": "classifier"},
            options={
                "pooling": "pooler",
                "dropout_rate": 0.0,
                "width": ConfigAttr("hidden_sizes", index=-1),
            },
        ),  # fmt: skip
    },
)
