"""BEiT (transformers' BeitModel): ViT's pre-norm layers with a relative position bias per head
(one table per layer, or one shared by all), layer scale (lambda_1 / lambda_2), stochastic depth,
no key bias, optional absolute positions, and mean pooling (LayerNorm of the mean of the patch
tokens) or the [CLS] token.

At another image size, absolute positions are interpolated (bicubic) and each relative table's
(2h-1) x (2w-1) part is resized (bilinear) to the new window, as transformers does, with or
without interpolate_pos_encoding.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxauto import layers, stacks
from flaxauto.heads import ImageClassificationHead
from flaxauto.models.vit import (
    CONFIG_ATTRIBUTES,
    PatchEmbeddings,
    VisionEncoderBackbone,
    ViTLayer,
    ViTSelfAttention,
    along_last,
    check_config,
    hub_name,
    interpolate_positions,
    patch_grid,
    resize_grid,
    torch_name,
)
from flaxauto.outputs import BaseModelOutput
from flaxauto.registry import HeadSpec, register

Precision = layers.Precision


class BeitEmbeddings(nnx.Module):
    """[CLS] + patches, plus absolute positions where the config has them."""

    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        hidden = config.hidden_size
        axes = (None, None, "embed")
        self.cls_token = layers.parameter((1, 1, hidden), axes, precision)
        self.patch_embeddings = PatchEmbeddings(config, precision, rngs)
        if config.use_absolute_position_embeddings:
            rows, cols = patch_grid(config)
            shape = (1, rows * cols + 1, hidden)
            self.position_embeddings = layers.parameter(shape, axes, precision)
        else:
            self.position_embeddings = nnx.data(None)
        self.dropout = layers.dropout(config.hidden_dropout_prob, rngs)

    def __call__(self, pixel_values) -> jax.Array:
        patches = self.patch_embeddings(pixel_values)  # [B, N, E]
        cls = self.cls_token[...].astype(patches.dtype)
        cls = jnp.broadcast_to(cls, (patches.shape[0], 1, patches.shape[-1]))
        embeddings = jnp.concatenate([cls, patches], axis=1)  # [B, T, E]
        if self.position_embeddings is not None:
            grid = self.patch_embeddings.grid(*pixel_values.shape[2:])
            positions = interpolate_positions(self.position_embeddings[...], grid, 1)
            embeddings = embeddings + positions.astype(embeddings.dtype)
        return self.dropout(embeddings)


@functools.cache
def relative_position_index(window: tuple[int, int]) -> np.ndarray:
    """[T, T] (T = h*w + 1): the table row for each (query, key) token pair; the last three rows
    are [CLS] -> patch, patch -> [CLS] and [CLS] -> [CLS]."""
    height, width = window
    distances = (2 * height - 1) * (2 * width - 1) + 3
    coords = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing="ij")).reshape(
        2, -1
    )
    relative = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)  # [N, N, 2]
    relative = relative + np.array([height - 1, width - 1])
    relative[:, :, 0] *= 2 * width - 1
    index = np.zeros((height * width + 1,) * 2, dtype=np.int64)
    index[1:, 1:] = relative.sum(-1)
    index[0, :] = distances - 3
    index[:, 0] = distances - 2
    index[0, 0] = distances - 1
    return index


class BeitRelativePositionBias(nnx.Module):
    """A learned bias per head and relative offset: table [(2h-1)(2w-1) + 3, H] -> [1, H, T, T]."""

    def __init__(self, config, precision: Precision):
        self.window = patch_grid(config)
        height, width = self.window
        rows = (2 * height - 1) * (2 * width - 1) + 3
        self.relative_position_bias_table = layers.parameter(
            (rows, config.num_attention_heads), (None, "heads"), precision
        )

    def __call__(self, window: tuple[int, int]) -> jax.Array:
        table = self.relative_position_bias_table[...].astype(jnp.float32)
        if window != self.window:
            table = self._resized(table, window)
        tokens = window[0] * window[1] + 1
        bias = table[relative_position_index(window).reshape(-1)].reshape(tokens, tokens, -1)
        return bias.transpose(2, 0, 1)[None]  # [1, H, T, T]

    def _resized(self, table, window):
        """transformers resizes the (2h-1) x (2w-1) offsets bilinearly; it reads the table as
        [2w-1, 2h-1] (the same grid for the square windows of every released checkpoint)."""
        old_h, old_w = (2 * n - 1 for n in self.window)
        new_h, new_w = (2 * n - 1 for n in window)
        grid = table[:-3].reshape(old_w, old_h, -1)
        resized = resize_grid(grid, (new_h, new_w), "bilinear").reshape(new_h * new_w, -1)
        return jnp.concatenate([resized, table[-3:]], axis=0)


class BeitSelfAttention(ViTSelfAttention):
    """No key bias; a relative position bias of its own when the config asks for one per layer
    (kept here, where the hub names it: attention.attention.relative_position_bias)."""

    def __init__(self, config, precision, rngs):
        super().__init__(config, precision, rngs, key_bias=False)
        if config.use_relative_position_bias:
            self.relative_position_bias = BeitRelativePositionBias(config, precision)
        else:
            self.relative_position_bias = nnx.data(None)


class BeitLayer(ViTLayer):
    """ViT's layer with each residual branch scaled per channel (lambda_1, lambda_2) and dropped
    per example in training (stochastic depth, drop_path_rate growing with depth)."""

    def __init__(self, config, precision, rngs, drop_path_rate: float):
        super().__init__(config, precision, rngs, BeitSelfAttention(config, precision, rngs))
        if config.layer_scale_init_value > 0:
            shape, axes = (config.hidden_size,), ("embed",)
            self.lambda_1 = layers.parameter(shape, axes, precision, init="ones")
            self.lambda_2 = layers.parameter(shape, axes, precision, init="ones")
        else:
            self.lambda_1 = self.lambda_2 = nnx.data(None)
        # torch's DropPath: keep a whole example with probability 1 - rate, scaled by 1 / keep
        self.drop_path = nnx.Dropout(drop_path_rate, broadcast_dims=(1, 2), rngs=rngs)

    def attention_bias(self, bias):
        padding, shared, window = bias
        own = self.attention.attention.relative_position_bias
        head_bias = shared if own is None else own(window) + (0.0 if shared is None else shared)
        return padding, head_bias

    def branch(self, index: int, update):
        scale = self.lambda_1 if index == 1 else self.lambda_2
        if scale is not None:
            update = along_last(scale[...], update) * update
        return self.drop_path(update)


class BeitEncoder(stacks.Encoder):
    """encoder.layer.* and, with use_shared_relative_position_bias, the one table every layer
    adds (encoder.relative_position_bias, as the hub names it)."""

    def __init__(self, config, precision, rngs, make_layer, *, scan: bool, remat: bool):
        super().__init__(make_layer, config.num_hidden_layers, rngs, scan=scan, remat=remat)
        if config.use_shared_relative_position_bias:
            self.relative_position_bias = BeitRelativePositionBias(config, precision)
        else:
            self.relative_position_bias = nnx.data(None)


class BeitPooler(nnx.Module):
    """LayerNorm of the mean of the patch tokens (use_mean_pooling), else the [CLS] token."""

    def __init__(self, config, precision, rngs):
        if config.use_mean_pooling:
            eps = config.layer_norm_eps
            self.layernorm = layers.layer_norm(config.hidden_size, eps, precision, rngs)
        else:
            self.layernorm = nnx.data(None)

    def __call__(self, hidden_states):
        if self.layernorm is None:
            return hidden_states[:, 0]
        return self.layernorm(jnp.mean(hidden_states[:, 1:], axis=1))


class BeitModel(VisionEncoderBackbone):
    def __init__(
        self,
        config,
        precision: Precision,
        rngs: nnx.Rngs,
        *,
        add_pooling_layer: bool = True,
        scan_layers: bool = False,
        remat: bool = False,
    ):
        check_config(config)
        if scan_layers and config.drop_path_rate > 0:
            # the rate grows with depth, and scanned layers are one layer: eval is unaffected
            # (drop path is off), training would drop at layer 0's rate everywhere
            self.scan_drop_path_refused = config.drop_path_rate
        self.embeddings = BeitEmbeddings(config, precision, rngs)
        depth = config.num_hidden_layers
        rates = [config.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        make_layer = lambda i, rngs: BeitLayer(config, precision, rngs, rates[i])  # noqa: E731
        self.encoder = BeitEncoder(
            config, precision, rngs, make_layer, scan=scan_layers, remat=remat
        )
        self.layernorm = (
            nnx.data(None)
            if config.use_mean_pooling
            else layers.layer_norm(config.hidden_size, config.layer_norm_eps, precision, rngs)
        )
        self.pooler = BeitPooler(config, precision, rngs) if add_pooling_layer else nnx.data(None)

    def __call__(
        self,
        *,
        pixel_values,  # [B, C, H, W]
        attention_mask=None,  # [B, T] over the tokens ([CLS] + patches), 1 = attend
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutput:
        # interpolate_pos_encoding changes nothing here: BEiT resizes its tables whenever the
        # image size differs (transformers' flag resizes the bias to the size it already has)
        self._refuse_scanned_drop_path()
        embeddings = self.embeddings(pixel_values)
        window = self.embeddings.patch_embeddings.grid(*pixel_values.shape[2:])
        shared = self.encoder.relative_position_bias
        bias = (
            layers.padding_bias(attention_mask),
            None if shared is None else shared(window),
            window,
        )
        return self.run(embeddings, bias, output_hidden_states, output_attentions)

    def _refuse_scanned_drop_path(self):
        rate = getattr(self, "scan_drop_path_refused", None)
        if rate is None:
            return
        if any(
            isinstance(m, nnx.Dropout) and not m.deterministic for _, m in nnx.iter_modules(self)
        ):
            raise NotImplementedError(
                f"training with drop_path_rate={rate} and scan_layers=True is not implemented "
                "(each layer has its own rate); load without scan_layers to train"
            )


#: BeitConfig attributes that only the segmentation, backbone and masked-image-modeling
#: classes read (none of the forwards served here)
OTHER_TASKS = (
    "vocab_size", "pool_scales", "use_auxiliary_head", "auxiliary_loss_weight",
    "auxiliary_channels", "auxiliary_num_convs", "auxiliary_concat_input",
    "semantic_loss_ignore_index", "out_features", "out_indices", "stage_names", "add_fpn",
    "reshape_hidden_states",
)  # fmt: skip


def beit_hub_name(key: str) -> str:
    """transformers 5's in-memory names -> the hub's (see vit.hub_name), BEiT's tables too."""
    key = re.sub(r"(^|\.)shared_position_bias\.", r"\1encoder.relative_position_bias.", key)
    key = hub_name(key)
    return re.sub(
        r"(encoder\.layer\.\d+)\.relative_position_bias\.",
        r"\1.attention.attention.relative_position_bias.",
        key,
    )


def beit_torch_name(name: str) -> str:
    """beit_hub_name's inverse: the hub's names -> transformers 5's in-memory ones."""
    tables = (
        (r"(^|\.)encoder\.relative_position_bias\.", r"\1shared_position_bias."),
        (r"\.attention\.attention\.relative_position_bias\.", ".relative_position_bias."),
    )
    return torch_name(name, tables)


register(
    model_types=("beit",),
    backbone=BeitModel,
    base_model_prefix="beit",
    main_input_name="pixel_values",
    optional_modules=("pooler",),
    renames=beit_hub_name,
    torch_names=beit_torch_name,
    ignored=("relative_position_index",),
    config_attributes=(
        *CONFIG_ATTRIBUTES,
        *OTHER_TASKS,
        "use_absolute_position_embeddings",
        "use_relative_position_bias",
        "use_shared_relative_position_bias",
        "layer_scale_init_value",
        "drop_path_rate",
        "use_mean_pooling",
    ),  # fmt: skip
    heads={
        "base": HeadSpec(None),
        "image-classification": HeadSpec(ImageClassificationHead, options={"pooling": "pooler"}),
    },
)
