"""DETR (transformers' DetrModel, DetrForObjectDetection): a ResNet with frozen batch norms, a
1x1 input projection, a post-norm transformer encoder over the feature map with 2-d positions
added to queries and keys, and a decoder whose object queries attend to each other and to the
encoder (positions again on queries and keys, never on values).

The backbone is transformers' ResNet built by flaxauto.models.resnet (not a copy), its batch norms
swapped for frozen ones as transformers swaps them (DetrFrozenBatchNorm2d: statistics and affine
are buffers). Two kinds of checkpoint: `backbone_config` a ResNetConfig (use_timm_backbone=False,
transformers' names) or a timm backbone (use_timm_backbone=True, the default and what real DETR
checkpoints carry). timm is never imported: the timm ResNets' architecture is tabulated below and
their parameter names (`conv1`, `layer1.0.bn2`, `layer2.0.downsample.0`) map onto the same
modules through a name table (DetrConvEncoder.checkpoint_name), both ways.

Module paths are the hub checkpoints' names (`backbone.conv_encoder.model`, `self_attn.out_proj`,
`layers.0.fc1`), which transformers 5 still writes; its in-memory names (`backbone.model`,
`o_proj`, `mlp.fc1`), which a torch.save(state_dict) carries, are mapped back by `hub_name`.
Pixels are [B, C, H, W] with pixel_mask [B, H, W] in transformers' layout, channels-last inside.
"""

from __future__ import annotations

import math
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxauto import config_checks, convnets, layers
from flaxauto.heads.query_detection import DetrDetectionHead
from flaxauto.models import resnet
from flaxauto.outputs import BaseModelOutput, DetrModelOutput
from flaxauto.registry import HeadSpec, register

Precision = layers.Precision

#: timm ResNets DETR checkpoints name (timm's create_model(name)): block type and depths; the
#: stem is 64 wide, bottleneck stages 256..2048, basic ones 64..512
TIMM_RESNETS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}
#: the timm backbone settings flaxauto computes; any other set is refused
TIMM_ATTRIBUTES = (
    "backbone", "num_channels", "features_only", "out_indices", "out_features", "output_stride",
    "freeze_batch_norm_2d", "use_pretrained_backbone", "stage_names",
)  # fmt: skip


# --- config -------------------------------------------------------------------------------------


def timm_resnet(name) -> tuple[str, tuple[int, ...]]:
    """timm's model name (a pretrained tag after a dot does not change the architecture)."""
    base = (name or "").split(".")[0]
    if base not in TIMM_RESNETS:
        raise NotImplementedError(
            f"backbone={name!r} (a timm backbone) is not implemented; flaxauto builds the timm "
            f"ResNets {sorted(TIMM_RESNETS)} without timm"
        )
    return TIMM_RESNETS[base]


def last_stage(indices, num_stages: int) -> int:
    """The 1-based stage whose output DETR reads: the last requested feature map."""
    index = list(indices)[-1] % (num_stages + 1)
    if index < 1:
        raise NotImplementedError(
            f"out_indices={list(indices)}: DETR on the stem's features is not implemented"
        )
    return index


def trunk_plan(config):
    """(ResNet config for flaxauto.models.resnet, stages to run, timm output stride or None if
    the backbone is transformers' ResNet)."""
    backbone = config.backbone_config
    kind = getattr(backbone, "model_type", None)
    if kind == "resnet":
        config_checks.check_config_attributes(
            backbone, resnet.CONFIG_ATTRIBUTES, "DETR's backbone_config (resnet)"
        )
        resnet.check_config(backbone)
        stages = backbone.stage_names.index(backbone.out_features[-1])
        return backbone, last_stage([stages], len(backbone.depths)), None
    if kind != "timm_backbone":
        raise NotImplementedError(
            f"backbone_config.model_type={kind!r} is not implemented for DETR (resnet, or a timm "
            "ResNet with use_timm_backbone=True)"
        )
    config_checks.check_config_attributes(backbone, TIMM_ATTRIBUTES, "DETR's timm backbone")
    if not backbone.features_only:
        raise NotImplementedError("a timm backbone with features_only=False")
    if backbone.output_stride not in (None, 8, 16, 32):
        raise NotImplementedError(f"output_stride={backbone.output_stride}")
    layer_type, depths = timm_resnet(backbone.backbone)
    stages = last_stage(backbone.out_indices or [-1], len(depths))
    widths = (64, 128, 256, 512) if layer_type == "basic" else (256, 512, 1024, 2048)
    # timm's features_only model holds the stages up to the last feature map it returns
    trunk = types.SimpleNamespace(
        num_channels=backbone.num_channels, embedding_size=64, hidden_act="relu",
        layer_type=layer_type, depths=list(depths[:stages]), hidden_sizes=list(widths[:stages]),
        downsample_in_first_stage=False, downsample_in_bottleneck=False,
    )  # fmt: skip
    return trunk, stages, backbone.output_stride


def check_config(config) -> None:
    if config.position_embedding_type not in ("sine", "learned"):
        raise NotImplementedError(
            f"position_embedding_type={config.position_embedding_type!r} is not implemented"
        )
    layers.activation(config.activation_function, "activation_function")
    layers.check_heads_divide(config, "d_model", "encoder_attention_heads")
    layers.check_heads_divide(config, "d_model", "decoder_attention_heads")


# --- the convolutional backbone -----------------------------------------------------------------


class FrozenBatchNorm(nnx.Module):
    """transformers' DetrFrozenBatchNorm2d over [B, H, W, C]: weight, bias and the running
    statistics are buffers (never trained, no num_batches_tracked), folded into one scale and
    shift with eps 1e-5 inside the rsqrt, in the order transformers computes them."""

    def __init__(self, num_features: int, precision: Precision):
        self.dtype = precision.dtype
        buffer = lambda init: layers.buffer(  # noqa: E731
            (num_features,), ("embed",), precision.param_dtype, init=init
        )
        self.weight, self.bias = buffer("ones"), buffer("zeros")
        self.running_mean, self.running_var = buffer("zeros"), buffer("ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        weight, bias, mean, var = (
            v[...].astype(jnp.float32)
            for v in (self.weight, self.bias, self.running_mean, self.running_var)
        )
        scale = weight * jax.lax.rsqrt(var + 1e-5)
        shift = bias - mean * scale
        y = x.astype(jnp.float32) * convnets.per_channel(scale, x) + convnets.per_channel(shift, x)
        return y.astype(self.dtype)


def freeze_batch_norms(module: nnx.Module, precision: Precision) -> None:
    """Every layers.BatchNorm below `module` becomes a FrozenBatchNorm of its width, as
    transformers' replace_batch_norm does to the backbone it loads."""
    found = [
        (parent, name, value)
        for _, parent in nnx.iter_modules(module)
        for name, value in vars(parent).items()
        if isinstance(value, layers.BatchNorm)
    ]
    for parent, name, norm in found:
        setattr(parent, name, FrozenBatchNorm(norm.mean.get_value().shape[0], precision))


def dilate(conv: nnx.Conv, *, stride: int, dilation: int) -> None:
    """A 3x3 (or 1x1) convolution's stride and dilation as timm sets them (padding = dilation
    keeps a 3x3 map's size)."""
    conv.strides = (stride, stride)
    if conv.kernel_size[0] > 1:
        conv.kernel_dilation = (dilation, dilation)
        conv.padding = ((dilation, dilation), (dilation, dilation))


def apply_output_stride(stages, layer_type: str, output_stride: int) -> None:
    """timm's output_stride (DETR's `dilation`, DC5): once the network has reached that stride,
    later stages keep it and dilate their 3x3 convolutions instead (timm's make_blocks). A
    stage's first block uses the previous dilation, the others the stage's."""
    net_stride, dilation, previous = 4, 1, 1
    for index, stage in enumerate(stages):
        stride = 1 if index == 0 else 2
        if net_stride >= output_stride:
            dilation, stride = dilation * stride, 1
        else:
            net_stride *= stride
        if dilation == 1:
            continue
        for block_index, block in enumerate(stage.layers):
            first = previous
            convs = [c.convolution for c in block.layer]
            if layer_type == "bottleneck":  # 1x1, 3x3 (strided), 1x1
                dilate(convs[1], stride=stride if block_index == 0 else 1, dilation=first)
            else:  # 3x3 (strided), 3x3
                dilate(convs[0], stride=stride if block_index == 0 else 1, dilation=first)
                dilate(convs[1], stride=1, dilation=dilation)
            if block.shortcut is not None:
                dilate(block.shortcut.convolution, stride=stride, dilation=1)
            previous = dilation


class ResNetTrunk(nnx.Module):
    """transformers' ResNet stem and stages (flaxauto.models.resnet), run to `stages`."""

    def __init__(self, config, stages: int, precision: Precision, rngs: nnx.Rngs):
        self.embedder = resnet.ResNetEmbeddings(config, precision, rngs)
        self.encoder = resnet.ResNetEncoder(config, precision, rngs)
        self.stages = stages

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H/32, W/32, C']
        x = self.embedder(x)
        for stage in self.encoder.stages[: self.stages]:
            x = stage(x)
        return x


#: timm ResNet names <-> transformers' ResNet module paths below `conv_encoder.model`
_TIMM_TO_HF = (
    (r"^conv1\.", lambda m: "embedder.embedder.convolution."),
    (r"^bn1\.", lambda m: "embedder.embedder.normalization."),
    (r"^layer(\d+)\.(\d+)\.(conv|bn)(\d)\.", lambda m: (
        f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.layer.{int(m[4]) - 1}."
        f"{'convolution' if m[3] == 'conv' else 'normalization'}.")),
    (r"^layer(\d+)\.(\d+)\.downsample\.([01])\.", lambda m: (
        f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut."
        f"{'convolution' if m[3] == '0' else 'normalization'}.")),
)  # fmt: skip
_HF_TO_TIMM = (
    (r"^embedder\.embedder\.convolution\.", lambda m: "conv1."),
    (r"^embedder\.embedder\.normalization\.", lambda m: "bn1."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.(convolution|normalization)\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.{'conv' if m[4] == 'convolution' else 'bn'}"
               f"{int(m[3]) + 1}."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.(convolution|normalization)\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample."
               f"{'0' if m[3] == 'convolution' else '1'}."),
)  # fmt: skip


def _apply(table, name: str) -> str:
    for pattern, replacement in table:
        match = re.match(pattern, name)
        if match:
            return replacement(match) + name[match.end() :]
    return name


def timm_name(name: str) -> str:
    """`model.embedder.embedder.convolution.weight` -> `model.conv1.weight` (names below
    `conv_encoder`); names of no ResNet module pass unchanged."""
    prefix, _, rest = name.partition(".")
    return f"{prefix}.{_apply(_HF_TO_TIMM, rest)}" if prefix == "model" else name


def transformers_resnet_name(name: str) -> str:
    """The inverse of timm_name."""
    prefix, _, rest = name.partition(".")
    return f"{prefix}.{_apply(_TIMM_TO_HF, rest)}" if prefix == "model" else name


class DetrConvEncoder(nnx.Module):
    """The ResNet with frozen batch norms -> the last requested feature map [B, h, w, C]."""

    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        trunk, stages, output_stride = trunk_plan(config)
        self.timm = config.backbone_config.model_type == "timm_backbone"
        self.num_channels = trunk.num_channels
        self.model = ResNetTrunk(trunk, stages, precision, rngs)
        freeze_batch_norms(self.model, precision)
        if output_stride is not None:
            apply_output_stride(self.model.encoder.stages, trunk.layer_type, output_stride)
        self.channels = trunk.hidden_sizes[stages - 1]

    def checkpoint_name(self, name: str) -> str:
        """The checkpoint's name of a tensor below this module (converters.layout): timm's
        names for a timm backbone, else transformers' own."""
        return timm_name(name) if self.timm else name

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        return self.model(convnets.channels_last(pixel_values, self.num_channels))


class DetrConvModel(nnx.Module):
    """The `backbone` of hub checkpoints (`backbone.conv_encoder.*`); transformers 4 kept the
    position embedding here too (read from `backbone.position_embedding.*` on load)."""

    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        self.conv_encoder = DetrConvEncoder(config, precision, rngs)


# --- positions ----------------------------------------------------------------------------------


def nearest_rows(size_in: int, size_out: int) -> np.ndarray:
    """The source index of each output row of torch's interpolate(mode="nearest"): floor(i *
    in / out) with the scale in float32, as torch computes it (an exact ratio would differ
    where i * scale rounds below an integer)."""
    if size_in == size_out:
        return np.arange(size_out)
    scale = np.float32(size_in) / np.float32(size_out)
    rows = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(rows, size_in - 1)


def downsample_mask(pixel_mask: jax.Array, size: tuple[int, int]) -> jax.Array:
    """[B, H, W] -> [B, h, w] bool: the pixel mask at the feature map's size."""
    rows = nearest_rows(pixel_mask.shape[1], size[0])
    cols = nearest_rows(pixel_mask.shape[2], size[1])
    return pixel_mask[:, rows][:, :, cols] != 0


def sine_positions(mask: jax.Array, width: int, temperature: float = 10000.0) -> jax.Array:
    """transformers' DetrSinePositionEmbedding (normalize=True, scale 2 pi): [B, h, w] mask ->
    [B, h * w, 2 * width]; each position's cumulative count of real pixels down its column (y)
    and along its row (x), normalised by the last, as interleaved sin / cos features, y first."""
    mask = mask.astype(jnp.float32)
    y = jnp.cumsum(mask, axis=1)
    x = jnp.cumsum(mask, axis=2)
    y = y / (y[:, -1:, :] + 1e-6) * (2 * math.pi)
    x = x / (x[:, :, -1:] + 1e-6) * (2 * math.pi)
    dims = np.arange(width, dtype=np.float32)
    dim_t = np.float32(temperature) ** (2 * np.floor(dims / 2) / np.float32(width))
    dim_t = dim_t.reshape(1, 1, 1, -1)  # [1, 1, 1, D]

    def features(values):  # [B, h, w] -> [B, h, w, D]: sin on even channels, cos on odd
        angles = values[..., None] / dim_t
        even = (np.arange(width) % 2 == 0).reshape(1, 1, 1, -1)
        return jnp.where(even, jnp.sin(angles), jnp.cos(angles))

    positions = jnp.concatenate([features(y), features(x)], axis=-1)
    return positions.reshape(mask.shape[0], -1, 2 * width)


class LearnedPositions(nnx.Module):
    """transformers' DetrLearnedPositionEmbedding: a row table and a column table of 50 entries
    each; position (i, j) is [column j, row i] (no mask). from_config draws them N(0, init_std)
    (transformers: U(0, 1))."""

    def __init__(self, width: int, precision: Precision, rngs: nnx.Rngs):
        self.row_embeddings = layers.embedding(50, width, (None, "embed"), precision, rngs)
        self.column_embeddings = layers.embedding(50, width, (None, "embed"), precision, rngs)

    def __call__(self, batch: int, height: int, width: int) -> jax.Array:  # [B, h * w, 2 * D]
        columns = self.column_embeddings(jnp.arange(width))  # [w, D]
        rows = self.row_embeddings(jnp.arange(height))  # [h, D]
        grid = jnp.concatenate([
            jnp.broadcast_to(columns[None], (height, width, columns.shape[-1])),
            jnp.broadcast_to(rows[:, None], (height, width, rows.shape[-1])),
        ], axis=-1)  # fmt: skip
        grid = grid.reshape(1, height * width, grid.shape[-1])
        return jnp.broadcast_to(grid, (batch, *grid.shape[1:]))


# --- the transformer ----------------------------------------------------------------------------


class DetrAttention(nnx.Module):
    """q/k/v/out projections; positions join the queries' and keys' sources (layers.attend)."""

    def __init__(self, config, num_heads: int, precision: Precision, rngs: nnx.Rngs):
        d = config.d_model
        self.q_proj, self.k_proj, self.v_proj = layers.qkv_projections(d, precision, rngs)
        self.out_proj = layers.linear(d, d, ("heads", "embed"), precision, rngs)
        self.num_heads = num_heads
        self.dropout = layers.dropout(config.attention_dropout, rngs)
        self.implementation = precision.attention

    def __call__(self, hidden, source=None, *, bias=None, query_positions=None,
                 key_positions=None, output_attentions=False):  # fmt: skip
        context, probs = layers.attend(
            (self.q_proj, self.k_proj, self.v_proj), hidden, source, num_heads=self.num_heads,
            bias=bias, query_positions=query_positions, key_positions=key_positions,
            dropout=self.dropout, implementation=self.implementation,
            output_attentions=output_attentions,
        )  # fmt: skip
        return self.out_proj(context), probs


class DetrLayer(nnx.Module):
    """Post-norm: x = LN(x + attention), [x = LN(x + cross attention),] x = LN(x + MLP)."""

    def __init__(self, config, ffn_dim: int, num_heads: int, precision, rngs, *, cross: bool):
        d = config.d_model
        self.self_attn = DetrAttention(config, num_heads, precision, rngs)
        self.self_attn_layer_norm = layers.layer_norm(d, 1e-5, precision, rngs)
        if cross:
            self.encoder_attn = DetrAttention(config, num_heads, precision, rngs)
            self.encoder_attn_layer_norm = layers.layer_norm(d, 1e-5, precision, rngs)
        else:
            self.encoder_attn = nnx.data(None)
        self.fc1 = layers.linear(d, ffn_dim, ("embed", "mlp"), precision, rngs)
        self.fc2 = layers.linear(ffn_dim, d, ("mlp", "embed"), precision, rngs)
        self.final_layer_norm = layers.layer_norm(d, 1e-5, precision, rngs)
        self.activation = layers.activation(config.activation_function, "activation_function")
        self.dropout = layers.dropout(config.dropout, rngs)
        self.activation_dropout = layers.dropout(config.activation_dropout, rngs)

    def __call__(self, x, positions, bias, memory=None, memory_positions=None, memory_bias=None,
                 output_attentions=False):  # fmt: skip
        """x [B, T, E], positions [B|1, T, E]; a decoder layer's memory: the encoder's [B, S, E]
        with its positions and padding bias. -> (x, self-attention probs, cross probs)."""
        attended, probs = self.self_attn(
            x, bias=bias, query_positions=positions, output_attentions=output_attentions
        )
        x = self.self_attn_layer_norm(x + self.dropout(attended))
        cross_probs = None
        if self.encoder_attn is not None:
            attended, cross_probs = self.encoder_attn(
                x, memory, bias=memory_bias, query_positions=positions,
                key_positions=memory_positions, output_attentions=output_attentions,
            )  # fmt: skip
            x = self.encoder_attn_layer_norm(x + self.dropout(attended))
        update = self.fc2(self.activation_dropout(self.activation(self.fc1(x))))
        return self.final_layer_norm(x + self.dropout(update)), probs, cross_probs


class DetrEncoder(nnx.Module):
    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        self.dropout = layers.dropout(config.dropout, rngs)
        self.layers = nnx.List([
            DetrLayer(config, config.encoder_ffn_dim, config.encoder_attention_heads, precision,
                      rngs, cross=False)
            for _ in range(config.encoder_layers)
        ])  # fmt: skip

    def __call__(self, x, positions, bias, output_hidden_states, output_attentions):
        x = self.dropout(x)
        hidden, probs = [x], []
        for layer in self.layers:
            x, attention, _ = layer(x, positions, bias, output_attentions=output_attentions)
            hidden.append(x)
            probs.append(attention)
        return BaseModelOutput(
            last_hidden_state=x,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            attentions=tuple(probs) if output_attentions else None,
        )


class DetrDecoder(nnx.Module):
    """Object queries through the layers, then `layernorm`. With auxiliary_loss transformers
    normalises every layer's output with that layernorm, feeds the normalised states on and
    stacks them (intermediate_hidden_states); the last is then normalised a second time."""

    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        self.layers = nnx.List([
            DetrLayer(config, config.decoder_ffn_dim, config.decoder_attention_heads, precision,
                      rngs, cross=True)
            for _ in range(config.decoder_layers)
        ])  # fmt: skip
        self.layernorm = layers.layer_norm(config.d_model, 1e-5, precision, rngs)
        self.auxiliary = bool(config.auxiliary_loss)

    def __call__(self, x, positions, bias, memory, memory_positions, memory_bias, *,
                 output_hidden_states, output_attentions):  # fmt: skip
        hidden, probs, cross, intermediate = [x], [], [], []
        for layer in self.layers:
            x, attention, cross_attention = layer(
                x, positions, bias, memory, memory_positions, memory_bias, output_attentions
            )
            hidden.append(x)
            probs.append(attention)
            cross.append(cross_attention)
            if self.auxiliary:
                x = self.layernorm(x)
                intermediate.append(x)
        x = self.layernorm(x)
        hidden[-1] = x  # transformers' last hidden state replaces the last layer's output
        return (
            x,
            tuple(hidden) if output_hidden_states else None,
            (tuple(probs), tuple(cross)) if output_attentions else (None, None),
            jnp.stack(intermediate) if self.auxiliary else None,
        )


class DetrModel(nnx.Module):
    """pixel_values [B, C, H, W] (+ pixel_mask [B, H, W]) -> DetrModelOutput: the decoder's
    object queries [B, Q, E] and the encoder's feature tokens [B, h * w, E]."""

    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        check_config(config)
        self.backbone = DetrConvModel(config, precision, rngs)
        d = config.d_model
        if config.position_embedding_type == "sine":
            self.position_embedding = nnx.data(None)
        else:
            self.position_embedding = LearnedPositions(d // 2, precision, rngs)
        self.query_position_embeddings = layers.embedding(
            config.num_queries, d, (None, "embed"), precision, rngs
        )
        self.input_projection = convnets.conv(
            self.backbone.conv_encoder.channels, d, 1, precision, rngs
        )
        self.encoder = DetrEncoder(config, precision, rngs)
        self.decoder = DetrDecoder(config, precision, rngs)
        self.d_model = d

    def positions(self, mask: jax.Array) -> jax.Array:
        """[B, h, w] feature-map mask -> [B, h * w, E]."""
        if self.position_embedding is None:
            return sine_positions(mask, self.d_model // 2)
        return self.position_embedding(*mask.shape)

    def __call__(
        self,
        *,
        pixel_values,  # [B, C, H, W]
        pixel_mask=None,  # [B, H, W]: 1 on real pixels, 0 on padding
        decoder_attention_mask=None,  # [B, Q]: 1 for object queries that may be attended
        decoder_inputs_embeds=None,  # [B, Q, E]: the queries' first states (default zeros)
        inputs_embeds=None,
        encoder_outputs=None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> DetrModelOutput:
        for name, value in (("inputs_embeds", inputs_embeds), ("encoder_outputs", encoder_outputs)):
            if value is not None:
                raise NotImplementedError(f"{name}= is not implemented for DETR: pass pixel_values")
        batch, _, height, width = pixel_values.shape
        if pixel_mask is None:
            pixel_mask = jnp.ones((batch, height, width), jnp.int32)
        features = self.backbone.conv_encoder(pixel_values)  # [B, h, w, C]
        mask = downsample_mask(jnp.asarray(pixel_mask), features.shape[1:3])  # [B, h, w]
        tokens = self.input_projection(features)  # [B, h, w, E]
        tokens = tokens.reshape(batch, -1, self.d_model)  # row-major, as torch's flatten(2)
        positions = self.positions(mask).astype(tokens.dtype)
        flat_mask = mask.reshape(batch, -1)
        memory_bias = layers.padding_bias(flat_mask)
        encoded = self.encoder(
            tokens, positions, memory_bias, output_hidden_states, output_attentions
        )
        query_positions = self.query_position_embeddings.embedding[...][None].astype(tokens.dtype)
        if decoder_inputs_embeds is None:
            queries = jnp.zeros((batch, *query_positions.shape[1:]), tokens.dtype)
        else:
            queries = jnp.asarray(decoder_inputs_embeds, tokens.dtype)
        last, hidden, (probs, cross), intermediate = self.decoder(
            queries, query_positions, layers.padding_bias(decoder_attention_mask),
            encoded.last_hidden_state, positions, memory_bias,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        )  # fmt: skip
        return DetrModelOutput(
            last_hidden_state=last,
            decoder_hidden_states=hidden,
            decoder_attentions=probs,
            cross_attentions=cross,
            encoder_last_hidden_state=encoded.last_hidden_state,
            encoder_hidden_states=encoded.hidden_states,
            encoder_attentions=encoded.attentions,
            intermediate_hidden_states=intermediate,
        )


# --- checkpoint names ---------------------------------------------------------------------------

_HUB_NAMES = (  # transformers 5's in-memory spelling -> the hub's (and what it saves)
    (r"(^|\.)backbone\.model\.", r"\1backbone.conv_encoder.model."),
    (r"(^|\.)backbone\.position_embedding\.", r"\1position_embedding."),  # transformers 4
    (r"\.o_proj\.", ".out_proj."),
    (r"(^|\.)layers\.(\d+)\.mlp\.fc([12])\.", r"\1layers.\2.fc\3."),
)


def hub_name(key: str) -> str:
    for pattern, replacement in _HUB_NAMES:
        key = re.sub(pattern, replacement, key)
    return key


#: What DETR reads from the config (flaxauto.config_checks refuses the rest); the backbone's
#: own config is checked against resnet's attributes or TIMM_ATTRIBUTES. The loss reads the
#: costs and coefficients; encoder/decoder_layerdrop are read by nothing in transformers 5.
CONFIG_ATTRIBUTES = (
    "backbone_config", "backbone", "use_timm_backbone", "use_pretrained_backbone",
    "backbone_kwargs", "num_channels", "dilation", "num_queries", "d_model", "encoder_layers",
    "decoder_layers", "encoder_ffn_dim", "decoder_ffn_dim", "encoder_attention_heads",
    "decoder_attention_heads", "encoder_layerdrop", "decoder_layerdrop",
    "activation_function", "dropout", "attention_dropout", "activation_dropout", "init_std",
    "init_xavier_std", "auxiliary_loss", "position_embedding_type", "class_cost", "bbox_cost",
    "giou_cost", "mask_loss_coefficient", "dice_loss_coefficient", "bbox_loss_coefficient",
    "giou_loss_coefficient", "eos_coefficient", "num_labels",
)  # fmt: skip

register(
    model_types=("detr",),
    backbone=DetrModel,
    base_model_prefix="model",
    main_input_name="pixel_values",
    renames=hub_name,
    ignored=("num_batches_tracked",),  # frozen batch norms count nothing; old files carry it
    config_attributes=CONFIG_ATTRIBUTES,
    heads={"base": HeadSpec(None), "object-detection": HeadSpec(DetrDetectionHead)},
)
