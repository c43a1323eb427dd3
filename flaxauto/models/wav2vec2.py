"""wav2vec 2.0 and HuBERT (transformers' Wav2Vec2Model, HubertModel): one implementation, the
HuBERT differences as small switches (no extract_features output, optional feature-projection
norm, optional batch-normed instead of weight-normed positional convolution).

Raw audio [B, samples] -> convolutional feature encoder (channels-last [B, T, C]) -> feature
projection -> weight-normed convolutional position embedding -> a post-norm (`do_stable_layer_norm`
False) or pre-norm transformer encoder. Attribute paths are transformers' (`feature_extractor.
conv_layers.0.conv`, `encoder.pos_conv_embed.conv`, `encoder.layers.3.attention.q_proj`), so
checkpoints map by name; both spellings of the weight-normed convolution load
(`parametrizations.weight.original0/1` and the older `weight_g` / `weight_v`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flaxauto import layers, stacks
from flaxauto.heads.audio import AudioClassificationHead, CTCHead
from flaxauto.outputs import BaseModelOutput, Wav2Vec2BaseModelOutput
from flaxauto.registry import HeadSpec, register

Precision = layers.Precision

#: torch.nn.LayerNorm / GroupNorm's default eps: the feature encoder's norms do not read the config
TORCH_NORM_EPS = 1e-5


def check_config(config) -> None:
    """Refuse what this implementation does not compute, naming the attribute."""
    layers.check_heads_divide(config)
    if config.feat_extract_norm not in ("group", "layer"):
        raise NotImplementedError(
            f"feat_extract_norm={config.feat_extract_norm!r} is not implemented ('group', 'layer')"
        )
    depth = config.num_feat_extract_layers
    for name in ("conv_dim", "conv_kernel", "conv_stride"):
        if len(getattr(config, name)) != depth:
            raise ValueError(f"{name} has {len(getattr(config, name))} entries, not {depth}")
    for flag in ("add_adapter",):
        if getattr(config, flag, False):
            raise NotImplementedError(f"{flag}=True is not implemented for {config.model_type}")
    if getattr(config, "adapter_attn_dim", None) is not None:
        raise NotImplementedError(
            f"adapter_attn_dim={config.adapter_attn_dim!r} (attention adapters) is not implemented"
        )
    layers.activation(config.hidden_act)
    layers.activation(config.feat_extract_activation, "feat_extract_activation")


def conv_output_length(length, kernel: int, stride: int):
    """torch's Conv1d output length without padding: floor((length - kernel) / stride) + 1."""
    return (length - kernel) // stride + 1


# --- feature encoder -----------------------------------------------------------------------------


class FeatureEncoderLayer(nnx.Module):
    """Conv1d -> norm -> activation. feat_extract_norm "layer": a LayerNorm over channels in every
    layer; "group": a GroupNorm with one group per channel (normalised over time) in layer 0 only."""

    def __init__(self, config, index: int, precision: Precision, rngs: nnx.Rngs):
        in_dim = config.conv_dim[index - 1] if index > 0 else 1
        out_dim = config.conv_dim[index]
        self.conv = layers.conv(
            in_dim, out_dim, config.conv_kernel[index], (None, "embed"), precision, rngs,
            stride=config.conv_stride[index], use_bias=config.conv_bias, spatial_dims=1,
        )  # fmt: skip
        if config.feat_extract_norm == "layer":
            self.layer_norm = layers.layer_norm(out_dim, TORCH_NORM_EPS, precision, rngs)
        elif index == 0:
            self.layer_norm = layers.group_norm(out_dim, out_dim, TORCH_NORM_EPS, precision, rngs)
        else:
            self.layer_norm = nnx.data(None)
        self.activation = layers.activation(config.feat_extract_activation)

    def __call__(self, x):  # [B, T, C_in] -> [B, T', C_out]
        x = self.conv(x)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return self.activation(x)


class FeatureEncoder(nnx.Module):
    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        self.conv_layers = nnx.List(
            [
                FeatureEncoderLayer(config, index, precision, rngs)
                for index in range(config.num_feat_extract_layers)
            ]
        )

    def __call__(self, input_values):  # [B, samples] -> [B, T, C]
        x = input_values[..., None]  # one input channel, channels-last
        for layer in self.conv_layers:
            x = layer(x)
        return x


class FeatureProjection(nnx.Module):
    """LayerNorm (optional for HuBERT) -> Linear -> dropout; also returns the normed features
    (wav2vec2's extract_features)."""

    def __init__(self, config, precision: Precision, rngs: nnx.Rngs, *, layer_norm: bool = True):
        features = config.conv_dim[-1]
        if layer_norm:
            self.layer_norm = layers.layer_norm(features, config.layer_norm_eps, precision, rngs)
        else:
            self.layer_norm = nnx.data(None)
        self.projection = layers.linear(
            features, config.hidden_size, ("mlp", "embed"), precision, rngs
        )
        self.dropout = layers.dropout(config.feat_proj_dropout, rngs)

    def __call__(self, features):  # [B, T, C] -> [B, T, E], [B, T, C]
        normed = features if self.layer_norm is None else self.layer_norm(features)
        return self.dropout(self.projection(normed)), normed


# --- encoder -------------------------------------------------------------------------------------


class PositionalConvEmbedding(nnx.Module):
    """A grouped Conv1d over time, `num_conv_pos_embeddings` wide, padded to keep the length (an
    even width drops its last output), then the activation. Weight-normed over the kernel axis
    (dim=2); HuBERT's conv_pos_batch_norm instead batch-normalises the input of a plain conv."""

    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        hidden, width = config.hidden_size, config.num_conv_pos_embeddings
        options = dict(padding=width // 2, groups=config.num_conv_pos_embedding_groups)
        if getattr(config, "conv_pos_batch_norm", False):
            self.batch_norm = layers.batch_norm(hidden, precision)
            self.conv = layers.conv(
                hidden, hidden, width, ("embed", "embed"), precision, rngs, spatial_dims=1,
                **options,
            )  # fmt: skip
        else:
            self.batch_norm = nnx.data(None)
            self.conv = layers.weight_norm_conv(
                hidden, hidden, width, ("embed", "embed"), precision, dim=2, spatial_dims=1,
                **options,
            )  # fmt: skip
        self.drop_last = width % 2 == 0
        self.activation = layers.activation(config.feat_extract_activation)

    def __call__(self, hidden):  # [B, T, E] -> [B, T, E]
        if self.batch_norm is not None:
            hidden = self.batch_norm(hidden)
        out = self.conv(hidden)  # [B, T + 1, E] for an even width
        if self.drop_last:
            out = out[:, :-1]
        return self.activation(out)


class Attention(nnx.Module):
    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_proj = layers.linear(hidden, hidden, ("embed", "heads"), precision, rngs)
        self.k_proj = layers.linear(hidden, hidden, ("embed", "heads"), precision, rngs)
        self.v_proj = layers.linear(hidden, hidden, ("embed", "heads"), precision, rngs)
        self.out_proj = layers.linear(hidden, hidden, ("heads", "embed"), precision, rngs)
        self.dropout = layers.dropout(config.attention_dropout, rngs)
        self.implementation = precision.attention

    def __call__(self, hidden, bias, output_attentions=False):
        context, probs = layers.attend(
            (self.q_proj, self.k_proj, self.v_proj), hidden, num_heads=self.num_heads,
            bias=bias, dropout=self.dropout, implementation=self.implementation,
            output_attentions=output_attentions,
        )  # fmt: skip
        return self.out_proj(context), probs


class FeedForward(nnx.Module):
    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        hidden, inner = config.hidden_size, config.intermediate_size
        self.intermediate_dense = layers.linear(hidden, inner, ("embed", "mlp"), precision, rngs)
        self.intermediate_dropout = layers.dropout(config.activation_dropout, rngs)
        self.activation = layers.activation(config.hidden_act)
        self.output_dense = layers.linear(inner, hidden, ("mlp", "embed"), precision, rngs)
        self.output_dropout = layers.dropout(config.hidden_dropout, rngs)

    def __call__(self, x):
        x = self.intermediate_dropout(self.activation(self.intermediate_dense(x)))
        return self.output_dropout(self.output_dense(x))


class EncoderLayer(nnx.Module):
    """Post-norm (x + attn -> norm, x + ff -> norm) or, with pre_norm (do_stable_layer_norm),
    x + attn(norm x), x + ff(norm x)."""

    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        eps = config.layer_norm_eps
        self.pre_norm = bool(config.do_stable_layer_norm)
        self.attention = Attention(config, precision, rngs)
        self.dropout = layers.dropout(config.hidden_dropout, rngs)
        self.layer_norm = layers.layer_norm(config.hidden_size, eps, precision, rngs)
        self.feed_forward = FeedForward(config, precision, rngs)
        self.final_layer_norm = layers.layer_norm(config.hidden_size, eps, precision, rngs)

    def __call__(self, hidden, bias, output_attentions=False):
        if self.pre_norm:
            attended, probs = self.attention(self.layer_norm(hidden), bias, output_attentions)
            hidden = hidden + self.dropout(attended)
            return hidden + self.feed_forward(self.final_layer_norm(hidden)), probs
        attended, probs = self.attention(hidden, bias, output_attentions)
        hidden = self.layer_norm(hidden + self.dropout(attended))
        return self.final_layer_norm(hidden + self.feed_forward(hidden)), probs


class Encoder(nnx.Module):
    """Padding frames zeroed, + convolutional positions, then the layers. Post-norm normalises
    before the layers, pre-norm after them; hidden_states are the first layer's input and each
    layer's output as it leaves the layer (transformers 5 records them so: the pre-norm encoder's
    final LayerNorm is in last_hidden_state only)."""

    def __init__(self, config, precision: Precision, rngs: nnx.Rngs, *, scan=False, remat=False):
        self.pre_norm = bool(config.do_stable_layer_norm)
        self.pos_conv_embed = PositionalConvEmbedding(config, precision, rngs)
        self.layer_norm = layers.layer_norm(
            config.hidden_size, config.layer_norm_eps, precision, rngs
        )
        self.dropout = layers.dropout(config.hidden_dropout, rngs)
        make_layer = lambda _, rngs: EncoderLayer(config, precision, rngs)  # noqa: E731
        self.layers = stacks.layer_stack(make_layer, config.num_hidden_layers, rngs, scan=scan)
        self.remat = remat

    def __call__(self, hidden, frame_mask, *, output_hidden_states, output_attentions):
        bias = None
        if frame_mask is not None:
            hidden = jnp.where(frame_mask[..., None], hidden, jnp.zeros((), hidden.dtype))
            bias = layers.padding_bias(frame_mask)  # [B, 1, 1, T]
        hidden = hidden + self.pos_conv_embed(hidden)
        if not self.pre_norm:
            hidden = self.layer_norm(hidden)
        hidden = self.dropout(hidden)
        last, all_hidden, all_probs, _ = stacks.run_layers(
            self.layers,
            hidden,
            lambda layer, x, _: (*layer(x, bias, output_attentions), None),
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            remat=self.remat,
        )
        if self.pre_norm:
            last = self.layer_norm(last)
        return last, all_hidden, all_probs


# --- the backbone --------------------------------------------------------------------------------


class Wav2Vec2Model(nnx.Module):
    """The wav2vec2 / HuBERT backbone: input_values [B, samples] (the feature extractor's
    normalised waveform) -> frames [B, T, E], T = the feature encoder's output length."""

    supports_scan_layers = supports_remat = True
    returns_extract_features = True  # transformers' Wav2Vec2BaseModelOutput field

    def __init__(
        self, config, precision: Precision, rngs: nnx.Rngs, *, scan_layers=False, remat=False
    ):
        check_config(config)
        self.dtype = precision.dtype
        self.conv_kernel, self.conv_stride = tuple(config.conv_kernel), tuple(config.conv_stride)
        self.apply_spec_augment = bool(config.apply_spec_augment)
        self.augmentation = {  # what training would apply (refused: see _refuse_augmentation)
            "mask_time_prob": float(config.mask_time_prob) if self.apply_spec_augment else 0.0,
            "mask_feature_prob": float(config.mask_feature_prob)
            if self.apply_spec_augment
            else 0.0,
            "layerdrop": float(config.layerdrop),
        }
        self.feature_extractor = FeatureEncoder(config, precision, rngs)
        self.feature_projection = FeatureProjection(
            config, precision, rngs, layer_norm=self.uses_projection_norm(config)
        )
        if config.mask_time_prob > 0.0 or config.mask_feature_prob > 0.0:
            # SpecAugment's learned mask vector (filled in at mask_time_indices)
            self.masked_spec_embed = layers.parameter((config.hidden_size,), ("embed",), precision)
        else:
            self.masked_spec_embed = nnx.data(None)
        self.encoder = Encoder(config, precision, rngs, scan=scan_layers, remat=remat)

    def uses_projection_norm(self, config) -> bool:
        return True

    def frame_lengths(self, sample_lengths):
        """[B] samples -> [B] frames: each convolution's output length in turn."""
        lengths = sample_lengths
        for kernel, stride in zip(self.conv_kernel, self.conv_stride, strict=True):
            lengths = conv_output_length(lengths, kernel, stride)
        return lengths

    def frame_mask(self, attention_mask, num_frames: int) -> jax.Array:
        """The sample mask [B, samples] down-sampled to frames [B, T] bool as transformers does:
        the first frame_lengths(sum of the mask) frames of each row (a length of 0 wraps to the
        last index there, marking every frame; kept for the same numbers)."""
        lengths = self.frame_lengths(jnp.sum(jnp.asarray(attention_mask, jnp.int32), axis=-1))
        last = lengths - 1
        last = jnp.where(last < 0, last + num_frames, last)  # torch's negative index
        return jnp.arange(num_frames)[None, :] <= last[:, None]

    def __call__(
        self,
        *,
        input_values,  # [B, samples]
        attention_mask=None,  # [B, samples], 1 = audio, 0 = padding
        mask_time_indices=None,  # [B, T] bool: frames replaced by masked_spec_embed
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutput:
        self._refuse_augmentation()
        features = self.feature_extractor(jnp.asarray(input_values, self.dtype))
        frame_mask = None
        if attention_mask is not None:
            frame_mask = self.frame_mask(attention_mask, features.shape[1])
        hidden, extract_features = self.feature_projection(features)
        hidden = self._mask_frames(hidden, mask_time_indices)
        last, all_hidden, all_probs = self.encoder(
            hidden,
            frame_mask,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        fields = dict(last_hidden_state=last, hidden_states=all_hidden, attentions=all_probs)
        if self.returns_extract_features:
            return Wav2Vec2BaseModelOutput(**fields, extract_features=extract_features)
        return BaseModelOutput(**fields)

    def _mask_frames(self, hidden, mask_time_indices):
        if mask_time_indices is None or not self.apply_spec_augment:
            return hidden
        if self.masked_spec_embed is None:
            raise ValueError(
                "mask_time_indices needs masked_spec_embed, which this config lacks "
                "(mask_time_prob and mask_feature_prob are both 0)"
            )
        embed = self.masked_spec_embed[...].astype(hidden.dtype)
        return jnp.where(jnp.asarray(mask_time_indices, bool)[..., None], embed, hidden)

    def _refuse_augmentation(self) -> None:
        """SpecAugment's random masks and LayerDrop run only in training; both are random in
        torch too, but a silently skipped augmentation changes what training does."""
        if self.encoder.dropout.deterministic:
            return
        active = [f"{name}={value}" for name, value in self.augmentation.items() if value > 0]
        if active:
            raise NotImplementedError(
                f"training with {', '.join(active)} is not implemented (SpecAugment masks and "
                "LayerDrop): load with those set to 0.0 (from_pretrained(..., mask_time_prob=0.0, "
                "layerdrop=0.0)) to train without them, or model.eval() for inference"
            )


class HubertModel(Wav2Vec2Model):
    """HuBERT: wav2vec2's backbone without extract_features in its output; its feature
    projection normalises only with feat_proj_layer_norm."""

    returns_extract_features = False

    def uses_projection_norm(self, config) -> bool:
        return bool(config.feat_proj_layer_norm)


#: What both families read from the config (flaxauto.config_checks refuses the rest). The
#: pre-training (codevectors, negatives), x-vector (tdnn) and adapter settings configure classes
#: flaxauto does not serve; they are listed because hub configs carry them at any value.
CONFIG_ATTRIBUTES = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "hidden_dropout", "activation_dropout", "attention_dropout", "feat_proj_dropout",
    "final_dropout", "layerdrop", "layer_norm_eps", "feat_extract_norm",
    "feat_extract_activation", "conv_dim", "conv_stride", "conv_kernel", "conv_bias",
    "num_conv_pos_embeddings", "num_conv_pos_embedding_groups", "do_stable_layer_norm",
    "num_feat_extract_layers", "apply_spec_augment", "mask_time_prob", "mask_time_length",
    "mask_time_min_masks", "mask_feature_prob", "mask_feature_length", "mask_feature_min_masks",
    "ctc_loss_reduction", "ctc_zero_infinity", "use_weighted_layer_sum", "classifier_proj_size",
    "pad_token_id",
    # HuBERT
    "feat_proj_layer_norm", "conv_pos_batch_norm",
    # classes flaxauto does not serve: pre-training, x-vectors, adapters (add_adapter and
    # adapter_attn_dim are refused by check_config when set)
    "feat_quantizer_dropout", "num_codevectors_per_group", "num_codevector_groups",
    "contrastive_logits_temperature", "num_negatives", "codevector_dim", "proj_codevector_dim",
    "diversity_loss_weight", "tdnn_dim", "tdnn_kernel", "tdnn_dilation", "xvector_output_dim",
    "add_adapter", "adapter_kernel_size", "adapter_stride", "num_adapter_layers",
    "output_hidden_size", "adapter_attn_dim",
)  # fmt: skip


def _register(model_type: str, backbone: type, prefix: str) -> None:
    register(
        model_types=(model_type,),
        backbone=backbone,
        base_model_prefix=prefix,
        main_input_name="input_values",
        # present only when SpecAugment is configured: a checkpoint trained with it loads into
        # a model with mask_time_prob=0.0 (as transformers drops it, with a report)
        optional_modules=("masked_spec_embed",),
        config_attributes=CONFIG_ATTRIBUTES,
        heads={
            "base": HeadSpec(None),
            "audio-classification": HeadSpec(AudioClassificationHead),
            "ctc": HeadSpec(CTCHead),
        },
    )


_register("wav2vec2", Wav2Vec2Model, "wav2vec2")
_register("hubert", HubertModel, "hubert")
