"""YOLOS (transformers' YolosModel, YolosForObjectDetection): a ViT whose sequence ends with
`num_detection_tokens` learned detection tokens, detected objects read off their final states.

What differs from ViT (whose patch embedding, layers and bicubic resizing this reuses): the
sequence is [CLS] + patches + detection tokens; the position table (and, with
use_mid_position_embeddings, one more table per layer but the last, added to each layer's output)
is always resized to the input's patch grid, as transformers' Interpolate{Initial,Mid}
PositionEmbeddings do, so any image size runs; the config's grid may be non-square (512 x 864).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from flaxauto import layers, stacks
from flaxauto.heads.detection import ObjectDetectionHead
from flaxauto.models import vit
from flaxauto.outputs import BaseModelOutput
from flaxauto.registry import HeadSpec, register

Precision = layers.Precision


def check_config(config) -> None:
    vit.check_config(config)
    if config.num_detection_tokens < 1:
        raise NotImplementedError(f"num_detection_tokens={config.num_detection_tokens}")


def resize_positions(table: jax.Array, old: tuple[int, int], new: tuple[int, int], detection: int):
    """Position tables [..., 1 + old patches + detection, E] -> [..., 1 + new patches +
    detection, E]: the patch part resized bicubically (torch's align_corners=False) from the
    `old` grid to `new`, the [CLS] and detection positions kept. Every leading index (a layer of
    the mid tables) is resized alike, as torch resizes each channel alike."""
    if old == new:  # torch's bicubic at the same size copies
        return table
    lead, width = table.shape[:-2], table.shape[-1]
    patches = table[..., 1:-detection, :].reshape(*lead, *old, width)
    # [..., h, w, E] -> [h, w, (... E)]: one resize for every table and channel
    grid = jnp.moveaxis(patches, (-3, -2), (0, 1)).reshape(*old, -1)
    resized = vit.resize_grid(grid.astype(jnp.float32), new, "bicubic").astype(table.dtype)
    resized = jnp.moveaxis(resized.reshape(*new, *lead, width), (0, 1), (-3, -2))
    resized = resized.reshape(*lead, new[0] * new[1], width)
    ends = (table[..., :1, :], resized, table[..., -detection:, :])
    return jnp.concatenate(ends, axis=-2)


class YolosEmbeddings(nnx.Module):
    """[CLS] + patches + detection tokens, plus positions resized to the input's grid."""

    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        hidden = config.hidden_size
        self.num_detection_tokens = config.num_detection_tokens
        self.cls_token = layers.parameter((1, 1, hidden), (None, None, "embed"), precision)
        self.detection_tokens = layers.parameter(
            (1, self.num_detection_tokens, hidden), (None, None, "embed"), precision
        )
        self.patch_embeddings = vit.PatchEmbeddings(config, precision, rngs)
        self.grid = vit.patch_grid(config)
        length = 1 + math.prod(self.grid) + self.num_detection_tokens
        self.position_embeddings = layers.parameter(
            (1, length, hidden), (None, None, "embed"), precision
        )
        self.dropout = layers.dropout(config.hidden_dropout_prob, rngs)

    def __call__(self, pixel_values) -> jax.Array:  # [B, C, H, W] -> [B, T, E]
        patches = self.patch_embeddings(pixel_values)  # [B, N, E]
        batch, _, width = patches.shape
        cls = jnp.broadcast_to(self.cls_token[...].astype(patches.dtype), (batch, 1, width))
        detection = self.detection_tokens[...].astype(patches.dtype)
        detection = jnp.broadcast_to(detection, (batch, *detection.shape[1:]))
        embeddings = jnp.concatenate([cls, patches, detection], axis=1)
        grid = self.patch_embeddings.grid(*pixel_values.shape[2:])
        positions = resize_positions(
            self.position_embeddings[...], self.grid, grid, self.num_detection_tokens
        )
        return self.dropout(embeddings + positions.astype(embeddings.dtype))


class YolosEncoder(stacks.Encoder):
    """The layers; with use_mid_position_embeddings, `mid_position_embeddings` [L-1, 1, T, E]
    (resized to the input's grid) added to the output of every layer but the last."""

    def __init__(self, config, precision, rngs, *, scan: bool, remat: bool):
        make_layer = lambda _, rngs: vit.ViTLayer(config, precision, rngs)  # noqa: E731
        super().__init__(make_layer, config.num_hidden_layers, rngs, scan=scan, remat=remat)
        self.grid = vit.patch_grid(config)
        self.num_detection_tokens = config.num_detection_tokens
        if config.use_mid_position_embeddings:
            length = 1 + math.prod(self.grid) + config.num_detection_tokens
            shape = (config.num_hidden_layers - 1, 1, length, config.hidden_size)
            axes = (None, None, None, "embed")
            self.mid_position_embeddings = layers.parameter(shape, axes, precision)
        else:
            self.mid_position_embeddings = nnx.data(None)

    def __call__(self, hidden_states, grid, output_hidden_states, output_attentions):
        if self.mid_position_embeddings is None:
            return super().__call__(hidden_states, None, output_hidden_states, output_attentions)
        mid = resize_positions(
            self.mid_position_embeddings[...], self.grid, grid, self.num_detection_tokens
        ).astype(hidden_states.dtype)
        # added before layers 1..L-1 rather than after layers 0..L-2: the same sums, and each
        # layer's recorded output stays the layer's own, as transformers records hidden_states
        before = jnp.concatenate([jnp.zeros_like(mid[:1]), mid], axis=0)  # [L, 1, T, E]

        def call(layer, hidden, item):
            return (*layer(hidden + item[0], None, output_attentions), None)

        last, all_hidden, all_probs, _ = stacks.run_layers(
            self.layer, hidden_states, call, (before,),
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            remat=self.remat,
        )  # fmt: skip
        return last, all_hidden, all_probs


class YolosPooler(nnx.Module):
    """tanh(dense(first token))."""

    def __init__(self, config, precision, rngs):
        hidden = config.hidden_size
        self.dense = layers.linear(hidden, hidden, ("embed", "mlp"), precision, rngs)

    def __call__(self, hidden_states):
        return jnp.tanh(self.dense(hidden_states[:, 0]))


class YolosModel(vit.VisionEncoderBackbone):
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
        self.embeddings = YolosEmbeddings(config, precision, rngs)
        self.encoder = YolosEncoder(config, precision, rngs, scan=scan_layers, remat=remat)
        self.layernorm = layers.layer_norm(
            config.hidden_size, config.layer_norm_eps, precision, rngs
        )
        self.pooler = YolosPooler(config, precision, rngs) if add_pooling_layer else nnx.data(None)

    def __call__(
        self,
        *,
        pixel_values,  # [B, C, H, W], any size: positions follow the patch grid
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutput:
        embeddings = self.embeddings(pixel_values)
        grid = self.embeddings.patch_embeddings.grid(*pixel_values.shape[2:])
        hidden, all_hidden, all_probs = self.encoder(
            embeddings, grid, output_hidden_states, output_attentions
        )
        hidden = self.layernorm(hidden)
        return BaseModelOutput(
            last_hidden_state=hidden,
            pooler_output=None if self.pooler is None else self.pooler(hidden),
            hidden_states=all_hidden,
            attentions=all_probs,
        )


HEAD_MODULES = ("class_labels_classifier.", "bbox_predictor.")


def hub_name(key: str) -> str:
    """transformers 5's in-memory names (its ViT-style renames, and the mid positions under
    `encoder.interpolation`) -> the hub's, which the modules carry. The heads' own `layers.N`
    are not ViT's layers."""
    if key.startswith(HEAD_MODULES):
        return key
    mid = (
        r"(^|\.)encoder\.interpolation\.mid_position_embeddings",
        r"\1encoder.mid_position_embeddings",
    )
    return vit.hub_name(key, (mid,))


#: the detection loss' settings (heads/detection.py reads them)
LOSS_ATTRIBUTES = (
    "auxiliary_loss", "class_cost", "bbox_cost", "giou_cost", "bbox_loss_coefficient",
    "giou_loss_coefficient", "eos_coefficient",
)  # fmt: skip

register(
    model_types=("yolos",),
    backbone=YolosModel,
    base_model_prefix="vit",
    main_input_name="pixel_values",
    optional_modules=("pooler",),
    renames=hub_name,
    config_attributes=(
        *vit.CONFIG_ATTRIBUTES,
        *LOSS_ATTRIBUTES,
        "qkv_bias",
        "num_detection_tokens",
        "use_mid_position_embeddings",
    ),  # fmt: skip
    heads={
        "base": HeadSpec(None),
        "object-detection": HeadSpec(ObjectDetectionHead, backbone_options=vit.NO_POOLER),
    },
)
