"""ViT (transformers' ViTModel), and what the transformer-based vision families share: the patch
embedding, the pre-norm encoder layer, torch's interpolation of position tables, and the
transformers-5 checkpoint names.

Module paths are the names of checkpoints on the hub, which transformers 5 still writes
(`encoder.layer.0.attention.attention.query`, `intermediate.dense`, `output.dense`); its model
holds the same tensors under new names (`layers.0.attention.q_proj`, `mlp.fc1`), which a
`torch.save(model.state_dict())` file carries: `hub_name` maps those back on load.

Pixels come in transformers' layout [B, C, H, W] and are turned into patches [B, N, P*P*C]
once, channels last; the patch projection is one matmul with the conv kernel [P, P, C, E]
reshaped, which is the convolution of stride P exactly.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxauto import layers, stacks
from flaxauto.heads import ImageClassificationHead
from flaxauto.outputs import BaseModelOutput
from flaxauto.registry import HeadSpec, register

Precision = layers.Precision


def pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def patch_grid(config) -> tuple[int, int]:
    """(rows, columns) of patches at the config's image size."""
    image, patch = pair(config.image_size), pair(config.patch_size)
    return image[0] // patch[0], image[1] // patch[1]


def along_last(vector: jax.Array, like: jax.Array) -> jax.Array:
    """[C] -> [1, ..., 1, C] in like's rank and dtype (explicit: the tests forbid implicit rank
    promotion)."""
    return vector.reshape((1,) * (like.ndim - 1) + (-1,)).astype(like.dtype)


def check_config(config) -> None:
    """Refuse what this implementation does not compute, naming the attribute."""
    layers.check_heads_divide(config)
    layers.activation(config.hidden_act)
    head_dim = getattr(config, "head_dim", None)  # transformers 5 reads it, hub configs lack it
    if head_dim not in (None, config.hidden_size // config.num_attention_heads):
        raise NotImplementedError(f"head_dim={head_dim} (other than hidden_size / heads)")


# --- transformers 5 names -> hub names ----------------------------------------------------------

_HUB_NAMES = (  # (transformers 5 in-memory spelling, the hub's), applied in order
    (r"(^|\.)layers\.(\d+)\.", r"\1encoder.layer.\2."),
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
)


#: (the hub's spelling, transformers 5's in-memory one): _HUB_NAMES backwards, inner names first
_TORCH_NAMES = (
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
    (r"(^|\.)encoder\.layer\.(\d+)\.", r"\1layers.\2."),
)


def torch_name(name: str, extra: tuple[tuple[str, str], ...] = ()) -> str:
    """A hub name (a tensor's, or a module's) -> transformers 5's in-memory spelling, which
    PEFT's target_modules and adapter files use; hub_name's inverse."""
    name += "."  # a module name ends where its tensors' names go on
    for pattern, replacement in (*extra, *_TORCH_NAMES):
        name = re.sub(pattern, replacement, name)
    return name[:-1]


def hub_name(key: str, extra: tuple[tuple[str, str], ...] = ()) -> str:
    """A checkpoint key in transformers 5's in-memory spelling -> the hub spelling flaxauto's
    modules carry (keys already in hub spelling pass unchanged)."""
    for pattern, replacement in (*_HUB_NAMES, *extra):
        key = re.sub(pattern, replacement, key)
    return key


# --- torch's interpolation (align_corners=False), as matrices ---------------------------------


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    """torch's cubic convolution kernel (A = -0.75; jax.image uses Keys' -0.5)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@functools.cache
def resize_matrix(old: int, new: int, mode: str) -> np.ndarray:
    """[new, old] weights: torch.nn.functional.interpolate(size=new, mode, align_corners=False)
    along one axis is `matrix @ values` (bicubic and bilinear are separable)."""
    scale = old / new
    source = (np.arange(new) + 0.5) * scale - 0.5
    matrix = np.zeros((new, old))
    rows = np.arange(new)
    if mode == "bicubic":
        base = np.floor(source)
        t = source - base
        for offset in (-1, 0, 1, 2):
            index = np.clip(base + offset, 0, old - 1).astype(int)
            np.add.at(matrix, (rows, index), _cubic(t - offset))
    elif mode == "bilinear":
        source = np.maximum(source, 0.0)  # torch clamps the linear source index at 0
        low = np.minimum(np.floor(source).astype(int), old - 1)
        high = np.minimum(low + 1, old - 1)
        frac = source - low
        np.add.at(matrix, (rows, low), 1 - frac)
        np.add.at(matrix, (rows, high), frac)
    else:
        raise NotImplementedError(f"interpolation mode {mode!r}")
    return matrix.astype(np.float32)


def resize_grid(grid: jax.Array, size: tuple[int, int], mode: str) -> jax.Array:
    """[h, w, C] -> [size[0], size[1], C] as torch interpolates an image [1, C, h, w]."""
    rows = resize_matrix(grid.shape[0], size[0], mode)
    cols = resize_matrix(grid.shape[1], size[1], mode)
    return jnp.einsum("ih,jw,hwc->ijc", rows, cols, grid, precision=jax.lax.Precision.HIGHEST)


# --- embeddings ---------------------------------------------------------------------------------


class PatchEmbeddings(nnx.Module):
    """transformers' {ViT,DeiT,Beit}PatchEmbeddings: a conv of kernel and stride P ->
    [B, N, E] patches in row-major order."""

    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        self.patch_size = pair(config.patch_size)
        self.num_channels = config.num_channels
        self.projection = layers.conv(
            config.num_channels, config.hidden_size, self.patch_size, (None, "embed"),
            precision, rngs, stride=self.patch_size,
        )  # fmt: skip

    def grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size[0], width // self.patch_size[1]

    def __call__(self, pixel_values: jax.Array) -> jax.Array:  # [B, C, H, W] -> [B, N, E]
        batch, channels, height, width = pixel_values.shape
        if channels != self.num_channels:
            raise ValueError(
                "Make sure that the channel dimension of the pixel values match with the one set "
                f"in the configuration. Expected {self.num_channels} but got {channels}."
            )
        (p, q), (rows, cols) = self.patch_size, self.grid(height, width)
        pixels = pixel_values[:, :, : rows * p, : cols * q]  # a stride-P conv drops the rest
        patches = pixels.reshape(batch, channels, rows, p, cols, q)
        patches = patches.transpose(0, 2, 4, 3, 5, 1).reshape(batch, rows * cols, p * q * channels)
        return project_patches(self.projection, patches)


def project_patches(projection: nnx.Conv, patches: jax.Array) -> jax.Array:
    """patches [B, N, *kernel, C] flattened -> [B, N, E]: the conv of kernel = stride as a matmul
    with its kernel [*kernel, C, E] flattened the same way."""
    kernel = projection.kernel[...]
    dtype = projection.dtype or patches.dtype
    flat = kernel.reshape(-1, kernel.shape[-1]).astype(dtype)
    out = jnp.einsum("bnk,ke->bne", patches.astype(dtype), flat)
    return out + along_last(projection.bias[...], out)


def interpolate_positions(table: jax.Array, grid: tuple[int, int], prefix_tokens: int):
    """transformers' interpolate_pos_encoding: the patch part of a position table
    [1, prefix + n*n, E] resized bicubically to `grid` (the prefix tokens' positions kept).
    Unchanged when the grid is square with the table's patch count, as transformers skips it."""
    num_positions = table.shape[1] - prefix_tokens
    if grid[0] * grid[1] == num_positions and grid[0] == grid[1]:
        return table
    side = math.isqrt(num_positions)
    patches = table[0, prefix_tokens:].reshape(side, side, -1)
    resized = resize_grid(patches.astype(jnp.float32), grid, "bicubic").astype(table.dtype)
    return jnp.concatenate([table[:, :prefix_tokens], resized.reshape(1, -1, table.shape[-1])], 1)


class ViTEmbeddings(nnx.Module):
    """[CLS] (and DeiT's distillation token) + patches, plus learned positions."""

    #: tokens before the patches: [CLS]; DeiT adds its distillation token
    token_names: tuple[str, ...] = ("cls_token",)

    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        hidden = config.hidden_size
        for name in self.token_names:
            setattr(self, name, layers.parameter((1, 1, hidden), (None, None, "embed"), precision))
        self.patch_embeddings = PatchEmbeddings(config, precision, rngs)
        self.image_size = pair(config.image_size)
        rows, cols = patch_grid(config)
        positions = (1, rows * cols + len(self.token_names), hidden)
        self.position_embeddings = layers.parameter(positions, (None, None, "embed"), precision)
        self.dropout = layers.dropout(config.hidden_dropout_prob, rngs)

    def __call__(self, pixel_values, interpolate_pos_encoding: bool) -> jax.Array:
        height, width = pixel_values.shape[2:]
        patches = self.patch_embeddings(pixel_values)  # [B, N, E]
        batch = patches.shape[0]
        tokens = [
            jnp.broadcast_to(
                getattr(self, n)[...].astype(patches.dtype), (batch, 1, patches.shape[-1])
            )
            for n in self.token_names
        ]
        embeddings = jnp.concatenate([*tokens, patches], axis=1)  # [B, T, E]
        if interpolate_pos_encoding:
            grid = self.patch_embeddings.grid(height, width)
            positions = interpolate_positions(
                self.position_embeddings[...], grid, len(self.token_names)
            )
        else:
            if (height, width) != self.image_size:
                raise ValueError(
                    f"Input image size ({height}*{width}) doesn't match model "
                    f"({self.image_size[0]}*{self.image_size[1]})."
                )
            positions = self.position_embeddings[...]
        return self.dropout(embeddings + positions.astype(embeddings.dtype))


# --- the pre-norm encoder layer -----------------------------------------------------------------


class ViTSelfAttention(nnx.Module):
    """query / key / value; BEiT's key has no bias, VideoMAE keeps its biases apart."""

    def __init__(self, config, precision, rngs, *, query_bias=True, key_bias=True, value_bias=True):
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        project = functools.partial(layers.linear, hidden, hidden, ("embed", "heads"), precision)
        self.query = project(rngs, use_bias=query_bias)
        self.key = project(rngs, use_bias=key_bias)
        self.value = project(rngs, use_bias=value_bias)
        self.dropout = layers.dropout(config.attention_probs_dropout_prob, rngs)
        self.implementation = precision.attention

    def projections(self):
        return self.query, self.key, self.value

    def __call__(self, hidden_states, bias=None, head_bias=None, output_attentions=False):
        return layers.attend(
            self.projections(), hidden_states, num_heads=self.num_heads, bias=bias,
            head_bias=head_bias, dropout=self.dropout, implementation=self.implementation,
            output_attentions=output_attentions,
        )  # fmt: skip


class DenseDropout(nnx.Module):
    """dense -> dropout (ViTSelfOutput, ViTOutput: the residual is the layer's)."""

    def __init__(self, config, in_features: int, in_axis: str, precision, rngs):
        self.dense = layers.linear(
            in_features, config.hidden_size, (in_axis, "embed"), precision, rngs
        )
        self.dropout = layers.dropout(config.hidden_dropout_prob, rngs)

    def __call__(self, hidden_states):
        return self.dropout(self.dense(hidden_states))


class ViTAttention(nnx.Module):
    def __init__(self, config, precision, rngs, self_attention: ViTSelfAttention):
        self.attention = self_attention
        self.output = DenseDropout(config, config.hidden_size, "heads", precision, rngs)

    def __call__(self, hidden_states, bias=None, head_bias=None, output_attentions=False):
        context, probs = self.attention(hidden_states, bias, head_bias, output_attentions)
        return self.output(context), probs


class ViTIntermediate(nnx.Module):
    def __init__(self, config, precision, rngs):
        self.dense = layers.linear(
            config.hidden_size, config.intermediate_size, ("embed", "mlp"), precision, rngs
        )
        self.activation = layers.activation(config.hidden_act)

    def __call__(self, hidden_states):
        return self.activation(self.dense(hidden_states))


class ViTLayer(nnx.Module):
    """Pre-norm: x + attention(LN(x)), then + MLP(LN(.)). `scale_residuals` is the hook for
    BEiT's layer scale and drop path (identity here)."""

    def __init__(self, config, precision, rngs, self_attention: ViTSelfAttention | None = None):
        if self_attention is None:
            self_attention = ViTSelfAttention(
                config, precision, rngs, query_bias=config.qkv_bias, key_bias=config.qkv_bias,
                value_bias=config.qkv_bias,
            )  # fmt: skip
        self.attention = ViTAttention(config, precision, rngs, self_attention)
        self.intermediate = ViTIntermediate(config, precision, rngs)
        self.output = DenseDropout(config, config.intermediate_size, "mlp", precision, rngs)
        eps = config.layer_norm_eps
        self.layernorm_before = layers.layer_norm(config.hidden_size, eps, precision, rngs)
        self.layernorm_after = layers.layer_norm(config.hidden_size, eps, precision, rngs)

    def attention_bias(self, bias):
        """(padding bias, per-head bias) for this layer's attention."""
        return bias, None

    def branch(self, index: int, update):
        return update

    def __call__(self, hidden_states, bias=None, output_attentions=False):
        bias, head_bias = self.attention_bias(bias)
        attended, probs = self.attention(
            self.layernorm_before(hidden_states), bias, head_bias, output_attentions
        )
        hidden_states = hidden_states + self.branch(1, attended)
        update = self.output(self.intermediate(self.layernorm_after(hidden_states)))
        return hidden_states + self.branch(2, update), probs


class ViTPooler(nnx.Module):
    """activation(dense(first token))."""

    def __init__(self, config, precision, rngs):
        self.dense = layers.linear(
            config.hidden_size, config.pooler_output_size, ("embed", "mlp"), precision, rngs
        )
        self.activation = layers.activation(config.pooler_act, "pooler_act")

    def __call__(self, hidden_states):
        return self.activation(self.dense(hidden_states[:, 0]))


class VisionEncoderBackbone(stacks.EncoderBackbone):
    """embeddings -> encoder.layer.* -> final norm -> pooler: what ViT, DeiT, BEiT and VideoMAE
    share; each family builds its own embeddings, layers, norm and pooler."""

    supports_scan_layers = supports_remat = True

    def get_input_embeddings(self):
        return self.embeddings.patch_embeddings

    def run(self, embeddings, bias, output_hidden_states, output_attentions):
        """embeddings [B, T, E] and what each layer's attention_bias reads -> the output."""
        hidden, all_hidden, all_probs = self.encoder(
            embeddings, bias, output_hidden_states, output_attentions
        )
        if self.layernorm is not None:
            hidden = self.layernorm(hidden)
        return BaseModelOutput(
            last_hidden_state=hidden,
            pooler_output=None if self.pooler is None else self.pooler(hidden),
            hidden_states=all_hidden,
            attentions=all_probs,
        )


class ViTModel(VisionEncoderBackbone):
    embeddings_class = ViTEmbeddings

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
        self.embeddings = self.embeddings_class(config, precision, rngs)
        make_layer = lambda _, rngs: ViTLayer(config, precision, rngs)  # noqa: E731
        self.encoder = stacks.Encoder(
            make_layer, config.num_hidden_layers, rngs, scan=scan_layers, remat=remat
        )
        self.layernorm = layers.layer_norm(
            config.hidden_size, config.layer_norm_eps, precision, rngs
        )
        self.pooler = ViTPooler(config, precision, rngs) if add_pooling_layer else nnx.data(None)

    def __call__(
        self,
        *,
        pixel_values,  # [B, C, H, W]
        attention_mask=None,  # [B, T] over the tokens ([CLS] + patches), 1 = attend
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutput:
        embeddings = self.embeddings(pixel_values, interpolate_pos_encoding)
        bias = layers.padding_bias(attention_mask)
        return self.run(embeddings, bias, output_hidden_states, output_attentions)


NO_POOLER = {"add_pooling_layer": False}

#: What the ViT-like families read from the config (flaxauto.config_checks refuses the rest).
CONFIG_ATTRIBUTES = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps", "image_size",
    "patch_size", "num_channels", "num_labels", "head_dim",
    # masked image modeling's decoder (not served) reads it; no forward served here does
    "encoder_stride",
)  # fmt: skip

#: ViTForImageClassification: the [CLS] token's final state -> classifier, no dropout.
CLS_CLASSIFIER = HeadSpec(
    ImageClassificationHead, options={"pooling": "first"}, backbone_options=NO_POOLER
)

register(
    model_types=("vit",),
    backbone=ViTModel,
    base_model_prefix="vit",
    main_input_name="pixel_values",
    optional_modules=("pooler",),
    renames=hub_name,
    torch_names=torch_name,
    config_attributes=(*CONFIG_ATTRIBUTES, "qkv_bias", "pooler_output_size", "pooler_act"),
    heads={"base": HeadSpec(None), "image-classification": CLS_CLASSIFIER},
)
