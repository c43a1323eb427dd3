"""VideoMAE (transformers' VideoMAEModel): ViT's pre-norm layers over tubelets. A video
[B, T, C, H, W] is cut into tubelets of tubelet_size frames x P x P pixels (a Conv3d of kernel =
stride), plus fixed sinusoidal positions (not a checkpoint tensor); no [CLS] token. Query and
value biases are separate tensors on the hub (`q_bias`, `v_bias`), the key has none.

Video classification: the mean of every token through `fc_norm` (use_mean_pooling), else the
first token after the backbone's final LayerNorm.
"""

from __future__ import annotations

import functools
import re

import jax
import numpy as np
from flax import nnx

from flaxauto import layers, stacks
from flaxauto.heads import ImageClassificationHead
from flaxauto.models.vit import (
    CONFIG_ATTRIBUTES,
    VisionEncoderBackbone,
    ViTLayer,
    ViTSelfAttention,
    along_last,
    check_config,
    hub_name,
    pair,
    patch_grid,
    project_patches,
)
from flaxauto.outputs import BaseModelOutput
from flaxauto.registry import HeadSpec, register

Precision = layers.Precision


class VideoMAEPatchEmbeddings(nnx.Module):
    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        self.image_size = pair(config.image_size)
        self.patch_size = pair(config.patch_size)
        self.tubelet_size = int(config.tubelet_size)
        self.num_channels = config.num_channels
        kernel = (self.tubelet_size, *self.patch_size)
        self.projection = layers.conv(
            config.num_channels, config.hidden_size, kernel, (None, "embed"), precision, rngs,
            stride=kernel,
        )  # fmt: skip

    def __call__(self, pixel_values) -> jax.Array:  # [B, T, C, H, W] -> [B, N, E]
        batch, frames, channels, height, width = pixel_values.shape
        if channels != self.num_channels:
            raise ValueError(
                "Make sure that the channel dimension of the pixel values match with the one set "
                "in the configuration."
            )
        if (height, width) != self.image_size:
            raise ValueError(
                f"Input image size ({height}*{width}) doesn't match model "
                f"({self.image_size[0]}*{self.image_size[1]})."
            )
        t, (p, q) = self.tubelet_size, self.patch_size
        groups, rows, cols = frames // t, height // p, width // q
        video = pixel_values[:, : groups * t, :, : rows * p, : cols * q]
        tubelets = video.reshape(batch, groups, t, channels, rows, p, cols, q)
        # [B, groups, rows, cols, t, p, q, C]: the conv kernel's [t, p, q, C] order
        tubelets = tubelets.transpose(0, 1, 4, 6, 2, 5, 7, 3)
        return project_patches(self.projection, tubelets.reshape(batch, groups * rows * cols, -1))


@functools.cache
def _positions(num: int, features: int) -> np.ndarray:
    return np.asarray(layers.sinusoidal_table(num, features))[None]  # [1, N, E]


class VideoMAEEmbeddings(nnx.Module):
    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        self.patch_embeddings = VideoMAEPatchEmbeddings(config, precision, rngs)
        rows, cols = patch_grid(config)
        self.num_patches = (config.num_frames // int(config.tubelet_size)) * rows * cols
        self.hidden_size = config.hidden_size

    def __call__(self, pixel_values) -> jax.Array:
        patches = self.patch_embeddings(pixel_values)
        return patches + _positions(self.num_patches, self.hidden_size).astype(patches.dtype)


def query_value_bias(config) -> bool:
    """transformers 5.24 renamed the option `qkv_bias` (what earlier 5.x configs carry) to
    `qv_bias`; either spelling means the query and value biases."""
    return getattr(config, "qv_bias", getattr(config, "qkv_bias", True))


class VideoMAESelfAttention(ViTSelfAttention):
    """Projections without biases; the query and value biases are their own tensors."""

    def __init__(self, config, precision, rngs):
        super().__init__(
            config, precision, rngs, query_bias=False, key_bias=False, value_bias=False
        )
        if query_value_bias(config):
            shape, axes = (config.hidden_size,), ("heads",)
            self.q_bias = layers.parameter(shape, axes, precision)
            self.v_bias = layers.parameter(shape, axes, precision)
        else:
            self.q_bias = self.v_bias = nnx.data(None)

    def projections(self):
        if self.q_bias is None:
            return self.query, self.key, self.value
        query = lambda x: (q := self.query(x)) + along_last(self.q_bias[...], q)  # noqa: E731
        value = lambda x: (v := self.value(x)) + along_last(self.v_bias[...], v)  # noqa: E731
        return query, self.key, value


class VideoMAEModel(VisionEncoderBackbone):
    def __init__(
        self,
        config,
        precision: Precision,
        rngs: nnx.Rngs,
        *,
        scan_layers: bool = False,
        remat: bool = False,
    ):
        check_config(config)
        self.embeddings = VideoMAEEmbeddings(config, precision, rngs)

        def make_layer(_, rngs):
            return ViTLayer(config, precision, rngs, VideoMAESelfAttention(config, precision, rngs))

        self.encoder = stacks.Encoder(
            make_layer, config.num_hidden_layers, rngs, scan=scan_layers, remat=remat
        )
        self.layernorm = (
            nnx.data(None)
            if config.use_mean_pooling
            else layers.layer_norm(config.hidden_size, config.layer_norm_eps, precision, rngs)
        )
        self.pooler = nnx.data(None)

    def __call__(
        self,
        *,
        pixel_values,  # [B, T, C, H, W]
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutput:
        embeddings = self.embeddings(pixel_values)
        return self.run(embeddings, None, output_hidden_states, output_attentions)


def videomae_hub_name(key: str) -> str:
    """transformers' in-memory query.bias / value.bias -> the hub's q_bias / v_bias."""
    key = hub_name(key)
    key = re.sub(r"\.attention\.attention\.query\.bias$", ".attention.attention.q_bias", key)
    return re.sub(r"\.attention\.attention\.value\.bias$", ".attention.attention.v_bias", key)


def video_classification_head(config, precision, rngs):
    """VideoMAEForVideoClassification: mean of every token -> fc_norm (torch's LayerNorm
    default eps, not the config's) -> classifier; without use_mean_pooling the first token."""
    if config.use_mean_pooling:
        return ImageClassificationHead(config, precision, rngs, pooling="mean", norm_eps=1e-5)
    return ImageClassificationHead(config, precision, rngs, pooling="first")


register(
    model_types=("videomae",),
    backbone=VideoMAEModel,
    base_model_prefix="videomae",
    main_input_name="pixel_values",
    renames=videomae_hub_name,
    config_attributes=(
        *CONFIG_ATTRIBUTES,
        "num_frames",
        "tubelet_size",
        "qv_bias",
        "qkv_bias",
        "use_mean_pooling",
        # the pre-training decoder's (VideoMAEForPreTraining, not served)
        "decoder_num_attention_heads",
        "decoder_hidden_size",
        "decoder_num_hidden_layers",
        "decoder_intermediate_size",
        "norm_pix_loss",
    ),  # fmt: skip
    heads={
        "base": HeadSpec(None),
        "video-classification": HeadSpec(video_classification_head),
    },
)
