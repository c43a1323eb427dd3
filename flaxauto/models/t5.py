"""T5, mT5 and UMT5: one implementation of transformers' T5 with small adapters.

T5 has no position embeddings: every self attention adds a learned bias per head, looked up by
the bucket of the relative position (key slot - query slot). T5 and mT5 keep one bias table per
stack (transformers' `block.0.layer.0.SelfAttention.relative_attention_bias`) whose values every
layer of that stack shares; UMT5 keeps one table in every layer. The buckets are computed once
per stack either way (bidirectional in the encoder, causal in the decoder); in the decoder they
follow the query slots through the cache. Scores are not scaled (T5 folds the scale into its
initialisation), norms are RMS norms without a bias or mean, and the feed-forward is relu or
gated (`feed_forward_proj`, mT5: gated-gelu). Attribute paths are transformers' (`shared`,
`encoder.block.0.layer.0.SelfAttention.q`, `decoder.block.0.layer.1.EncDecAttention.o`,
`encoder.final_layer_norm`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxauto import layers, stacks
from flaxauto.converters.layout import LAYOUTS, Leaf
from flaxauto.decoder import DecoderBackbone, DecoderStep, EncoderDecoderCache
from flaxauto.heads import TokenClassificationHead
from flaxauto.heads.seq2seq import (
    Seq2SeqLMHead,
    Seq2SeqQuestionAnsweringHead,
    Seq2SeqSequenceClassificationHead,
    encoder_output,
    shift_tokens_right,
)
from flaxauto.outputs import (
    BaseModelOutput,
    BaseModelOutputWithPastAndCrossAttentions,
    Seq2SeqModelOutput,
)
from flaxauto.registry import ConfigAttr, HeadSpec, register

Array = jax.Array
Precision = layers.Precision


@dataclass(frozen=True)
class Variant:
    """Where a model_type departs from T5."""

    bias_per_layer: bool  # UMT5: every self attention has its own relative bias table


T5 = Variant(bias_per_layer=False)
UMT5 = Variant(bias_per_layer=True)


# -- config checks ---------------------------------------------------------------------------------


def check_config(config, encoder_only: bool) -> None:
    layers.activation(config.dense_act_fn, "feed_forward_proj")
    if getattr(config, "is_decoder", False):
        raise NotImplementedError(
            f"is_decoder=True (a decoder-only {config.model_type} stack) is not implemented"
        )
    # transformers' T5EncoderModel (under T5ForTokenClassification) sets the flag off in its config
    if not (encoder_only or getattr(config, "is_encoder_decoder", True)):
        raise NotImplementedError(
            f"is_encoder_decoder=False is not implemented for {config.model_type}"
        )


# -- relative positions ------------------------------------------------------------------------------


@functools.cache
def bucket_table(bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
    """[2 * max_distance + 1] int32: the bucket of relative position r at index r + max_distance.

    transformers' _relative_position_bucket, evaluated on the host in float32 in the same order
    of operations; every |r| >= max_distance falls in the last bucket, so the table covers all
    positions once r is clipped to [-max_distance, max_distance]."""
    relative = np.arange(-max_distance, max_distance + 1, dtype=np.int64)
    buckets = np.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).astype(np.int64) * num_buckets
        distance = np.abs(relative)
    else:
        distance = -np.minimum(relative, 0)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore"):  # log(0) at distance 0, which is_small takes
        ratio = np.log(distance.astype(np.float32) / np.float32(max_exact))
        ratio = ratio / np.float32(math.log(max_distance / max_exact))
        ratio = ratio * np.float32(num_buckets - max_exact)
        large = max_exact + np.where(np.isfinite(ratio), ratio, 0).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    buckets += np.where(distance < max_exact, distance, large)
    return buckets.astype(np.int32)


def relative_buckets(query_slots: Array, key_length: int, table: np.ndarray) -> Array:
    """query_slots [T] int32, key slots 0..S-1 -> buckets [T, S] int32 (from bucket_table)."""
    max_distance = (table.shape[0] - 1) // 2
    relative = jnp.arange(key_length, dtype=jnp.int32)[None, :] - query_slots[:, None]
    index = jnp.clip(relative, -max_distance, max_distance) + max_distance
    return jnp.asarray(table)[index]


def bias_from_table(table: Array, buckets: Array, dtype) -> Array:
    """table [num_buckets, H], buckets [T, S] -> per-head bias [1, H, T, S]."""
    values = jnp.take(table, buckets, axis=0)  # [T, S, H]
    return jnp.transpose(values, (2, 0, 1))[None].astype(dtype)


@dataclass(frozen=True)
class Relative:
    """What every self attention of one stack forward reads for its position bias: the buckets
    [T, S] and, for T5/mT5, the stack's bias [1, H, T, S] already looked up (None for UMT5,
    whose layers look up their own tables)."""

    buckets: Array
    shared_bias: Array | None


# -- modules, small to large ---------------------------------------------------------------------


def t5_norm(config, precision: Precision, rngs: nnx.Rngs) -> layers.RMSNorm:
    """T5LayerNorm: x * rsqrt(mean(x^2) + eps) in float32, cast, then scaled (no mean, no bias)."""
    return layers.rms_norm(config.d_model, config.layer_norm_epsilon, precision, rngs)


class T5Attention(nnx.Module):
    """q/k/v/o without biases, inner width num_heads * d_kv (may differ from d_model), scores
    not scaled; the relative bias (self attention) or none (cross attention) per head."""

    def __init__(self, config, precision: Precision, rngs: nnx.Rngs, *, own_bias: bool = False):
        width, inner = config.d_model, config.num_heads * config.d_kv
        self.q, self.k, self.v = (
            layers.linear(width, inner, ("embed", "heads"), precision, rngs, use_bias=False)
            for _ in range(3)
        )
        self.o = layers.linear(inner, width, ("heads", "embed"), precision, rngs, use_bias=False)
        self.num_heads = config.num_heads
        self.relative_attention_bias = (
            layers.embedding(
                config.relative_attention_num_buckets,
                config.num_heads,
                (None, "heads"),
                precision,
                rngs,
            )  # fmt: skip
            if own_bias
            else nnx.data(None)
        )
        self.dropout = layers.dropout(config.dropout_rate, rngs)
        self.implementation = precision.attention

    def heads(self, projection, x):
        return layers.split_heads(projection(x), self.num_heads)  # [B, T, H, D]

    def position_bias(self, relative: Relative, dtype) -> Array:
        if self.relative_attention_bias is None:
            return relative.shared_bias
        return bias_from_table(self.relative_attention_bias.embedding[...], relative.buckets, dtype)

    def _attend(self, q, k, v, bias, head_bias, output_attentions: bool):
        context, probs = layers.dot_product_attention(
            q, k, v, bias, self.dropout, head_bias=head_bias, scale=1.0,
            implementation=self.implementation, output_attentions=output_attentions,
        )  # fmt: skip
        return self.o(layers.merge_heads(context)), probs

    def __call__(self, hidden, bias, relative: Relative, output_attentions: bool):
        """Encoder self attention: hidden [B, T, E], bias [B, 1, 1, T]."""
        q, k, v = (self.heads(p, hidden) for p in (self.q, self.k, self.v))
        head_bias = self.position_bias(relative, hidden.dtype)
        return self._attend(q, k, v, bias, head_bias, output_attentions)

    def cached_self_attention(self, hidden, step: DecoderStep, layer_cache, bias, relative):
        """Decoder self attention over the cache's slots (bias [B, 1, T, S] is causal)."""
        q, k, v = (self.heads(p, hidden) for p in (self.q, self.k, self.v))
        k, v, layer_cache = step.keys_values(layer_cache, k, v)
        head_bias = self.position_bias(relative, hidden.dtype)
        return (*self._attend(q, k, v, bias, head_bias, step.output_attentions), layer_cache)

    def cross_attention(self, hidden, step: DecoderStep, layer_cache):
        """Over the encoder output, projected once into the cache; no position bias."""

        def project(encoder_hidden):  # [B, S_enc, E] -> keys, values [B, S_enc, H, D]
            return self.heads(self.k, encoder_hidden), self.heads(self.v, encoder_hidden)

        q = self.heads(self.q, hidden)
        k, v, layer_cache = step.cross_keys_values(layer_cache, project)
        context = self._attend(q, k, v, step.cross_bias, None, step.output_attentions)
        return (*context, layer_cache)


class T5DenseActDense(nnx.Module):
    """wo(dropout(act(wi(x))))."""

    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        width, inner = config.d_model, config.d_ff
        self.wi = layers.linear(width, inner, ("embed", "mlp"), precision, rngs, use_bias=False)
        self.wo = layers.linear(inner, width, ("mlp", "embed"), precision, rngs, use_bias=False)
        self.act = layers.activation(config.dense_act_fn, "feed_forward_proj")
        self.dropout = layers.dropout(config.dropout_rate, rngs)

    def __call__(self, x):
        return self.wo(self.dropout(self.act(self.wi(x))))


class T5DenseGatedActDense(nnx.Module):
    """wo(dropout(act(wi_0(x)) * wi_1(x))): "gated-<act>" (T5 v1.1, mT5: gelu_new)."""

    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        width, inner = config.d_model, config.d_ff
        self.wi_0, self.wi_1 = (
            layers.linear(width, inner, ("embed", "mlp"), precision, rngs, use_bias=False)
            for _ in range(2)
        )
        self.wo = layers.linear(inner, width, ("mlp", "embed"), precision, rngs, use_bias=False)
        self.act = layers.activation(config.dense_act_fn, "feed_forward_proj")
        self.dropout = layers.dropout(config.dropout_rate, rngs)

    def __call__(self, x):
        return self.wo(self.dropout(self.act(self.wi_0(x)) * self.wi_1(x)))


class T5LayerFF(nnx.Module):
    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        dense = T5DenseGatedActDense if config.is_gated_act else T5DenseActDense
        self.DenseReluDense = dense(config, precision, rngs)
        self.layer_norm = t5_norm(config, precision, rngs)
        self.dropout = layers.dropout(config.dropout_rate, rngs)

    def __call__(self, hidden):
        return hidden + self.dropout(self.DenseReluDense(self.layer_norm(hidden)))


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, config, precision, rngs, *, own_bias: bool):
        self.SelfAttention = T5Attention(config, precision, rngs, own_bias=own_bias)
        self.layer_norm = t5_norm(config, precision, rngs)
        self.dropout = layers.dropout(config.dropout_rate, rngs)


class T5LayerCrossAttention(nnx.Module):
    def __init__(self, config, precision, rngs):
        self.EncDecAttention = T5Attention(config, precision, rngs)
        self.layer_norm = t5_norm(config, precision, rngs)
        self.dropout = layers.dropout(config.dropout_rate, rngs)


class T5Block(nnx.Module):
    """`layer`: self attention, (decoder: cross attention,) feed-forward; each pre-norm with a
    residual (x + dropout(sublayer(norm(x))))."""

    def __init__(self, config, variant: Variant, precision, rngs, *, decoder: bool):
        sublayers = [T5LayerSelfAttention(config, precision, rngs, own_bias=variant.bias_per_layer)]
        if decoder:
            sublayers.append(T5LayerCrossAttention(config, precision, rngs))
        sublayers.append(T5LayerFF(config, precision, rngs))
        self.layer = nnx.List(sublayers)

    def encoder_layer(self, hidden, bias, relative: Relative, output_attentions: bool):
        """-> (hidden, self-attention probs)."""
        sub = self.layer[0]
        output, probs = sub.SelfAttention(sub.layer_norm(hidden), bias, relative, output_attentions)
        hidden = hidden + sub.dropout(output)
        return self.layer[-1](hidden), probs

    def __call__(self, hidden, step: DecoderStep, layer_cache, bias, relative: Relative):
        """Decoder layer -> (hidden, (self probs, cross probs), the layer's new cache)."""
        sub = self.layer[0]
        output, probs, layer_cache = sub.SelfAttention.cached_self_attention(
            sub.layer_norm(hidden), step, layer_cache, bias, relative
        )
        hidden = hidden + sub.dropout(output)
        sub = self.layer[1]
        output, cross, layer_cache = sub.EncDecAttention.cross_attention(
            sub.layer_norm(hidden), step, layer_cache
        )
        hidden = hidden + sub.dropout(output)
        return self.layer[-1](hidden), (probs, cross), layer_cache


class _Stack(nnx.Module):
    """What both stacks share: the layers under `block`, the final norm, dropout, and T5's
    shared relative bias table (UMT5: none here, one per layer)."""

    def _init_stack(self, config, variant, precision, rngs, num_layers, decoder, scan, remat):
        self.block = stacks.layer_stack(
            lambda _, rngs: T5Block(config, variant, precision, rngs, decoder=decoder),
            num_layers, rngs, scan=scan,
        )  # fmt: skip
        self.final_layer_norm = t5_norm(config, precision, rngs)
        self.dropout = layers.dropout(config.dropout_rate, rngs)
        # saved as transformers' block.0.layer.0.SelfAttention.relative_attention_bias.weight
        # (see the LAYOUTS entry below): held by the stack, so that scanned layers stay identical
        self.relative_attention_bias = (
            nnx.data(None)
            if variant.bias_per_layer
            else layers.parameter(
                (config.relative_attention_num_buckets, config.num_heads),
                (None, "heads"),
                precision,
                init="normal",
            )  # fmt: skip
        )
        self.buckets = bucket_table(
            not decoder, config.relative_attention_num_buckets,
            config.relative_attention_max_distance,
        )  # fmt: skip
        self.remat = remat

    def relative(self, query_slots: Array, key_length: int, dtype) -> Relative:
        buckets = relative_buckets(query_slots, key_length, self.buckets)  # [T, S]
        shared = None
        if self.relative_attention_bias is not None:
            shared = bias_from_table(self.relative_attention_bias[...], buckets, dtype)
        return Relative(buckets, shared)

    def final_norm(self, hidden):
        return self.dropout(self.final_layer_norm(hidden))


class T5EncoderStack(_Stack):
    def __init__(self, config, variant, precision, rngs, *, scan_layers=False, remat=False):
        self._init_stack(
            config, variant, precision, rngs, config.num_layers, False, scan_layers, remat
        )

    def __call__(
        self, inputs_embeds, attention_mask, *, output_hidden_states: bool, output_attentions: bool
    ) -> BaseModelOutput:
        length = inputs_embeds.shape[1]
        hidden = self.dropout(inputs_embeds)
        relative = self.relative(jnp.arange(length, dtype=jnp.int32), length, hidden.dtype)
        bias = layers.padding_bias(attention_mask)  # [B, 1, 1, T]

        def run_layer(layer, h):
            return layer.encoder_layer(h, bias, relative, output_attentions)

        return stacks.run_encoder(
            self.block, hidden, run_layer, self.final_norm,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            remat=self.remat,
        )  # fmt: skip


class T5DecoderStack(_Stack, DecoderBackbone):
    cross_attention = True

    def __init__(self, config, variant, precision, rngs, *, scan_layers=False, remat=False):
        self._init_stack(
            config, variant, precision, rngs, config.num_decoder_layers, True, scan_layers, remat
        )
        self.cache_shape = (config.num_decoder_layers, config.num_heads, config.d_kv)
        self.compute_dtype = precision.dtype

    @property
    def stack(self):
        return self.block

    def __call__(
        self, embed, input_ids, inputs_embeds, attention_mask, cache,
        encoder_hidden_states, encoder_attention_mask, *,
        output_hidden_states: bool, output_attentions: bool,
    ) -> BaseModelOutputWithPastAndCrossAttentions:  # fmt: skip
        embeds, step, _ = self.begin(
            embed, input_ids, inputs_embeds, attention_mask, None, cache, (None,),
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
        )  # fmt: skip
        length, slots = embeds.shape[1], step.slot_mask.shape[1]
        # the bias rows follow the query slots: the new tokens sit after the cached ones
        query_slots = step.start + jnp.arange(length, dtype=jnp.int32)
        relative = self.relative(query_slots, slots, embeds.dtype)
        return self.finish(
            self.dropout(embeds), step, self.final_norm, relative=relative,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        )  # fmt: skip


# The stack's shared table is transformers' first layer's (T5Attention in block 0).
LAYOUTS[_Stack] = {
    "relative_attention_bias": Leaf(
        "block.0.layer.0.SelfAttention.relative_attention_bias.weight", init="normal"
    )
}


class T5Model(nnx.Module):
    """The T5 backbone: `shared` token table, `encoder`, `decoder` (absent for the encoder-only
    task models, transformers' T5EncoderModel)."""

    supports_scan_layers = supports_remat = True
    variant: Variant = T5

    def __init__(
        self, config, precision: Precision, rngs: nnx.Rngs, *, encoder_only: bool = False,
        decoder_from_input_ids: bool = False, scan_layers=False, remat=False,
    ):  # fmt: skip
        check_config(config, encoder_only)
        variant = type(self).variant
        self.shared = layers.embedding(
            config.vocab_size, config.d_model, ("vocab", "embed"), precision, rngs
        )
        execution = dict(scan_layers=scan_layers, remat=remat)
        self.encoder = T5EncoderStack(config, variant, precision, rngs, **execution)
        self.decoder = (
            nnx.data(None)
            if encoder_only
            else T5DecoderStack(config, variant, precision, rngs, **execution)
        )
        self.pad_token_id = config.pad_token_id
        self.decoder_start_token_id = config.decoder_start_token_id
        self.decoder_from_input_ids = decoder_from_input_ids

    def get_input_embeddings(self) -> nnx.Embed:
        return self.shared

    def init_cache(self, batch_size: int, max_length: int, dtype=None, *, mesh=None, rules=None):
        """An empty EncoderDecoderCache: the decoder's self part for max_length tokens; the
        cross part is filled by the first decode given the encoder output."""
        return self.decoder.init_cache(batch_size, max_length, dtype, mesh=mesh, rules=rules)

    def encode(
        self,
        *,
        input_ids=None,  # [B, S]
        attention_mask=None,  # [B, S], 1 = token, 0 = padding
        inputs_embeds=None,  # [B, S, E]
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutput:
        """The encoder alone."""
        layers.exactly_one(input_ids, inputs_embeds)
        if inputs_embeds is None:
            inputs_embeds = self.shared(input_ids)
        return self.encoder(
            inputs_embeds, attention_mask,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        )  # fmt: skip

    def decode(
        self,
        *,
        decoder_input_ids=None,  # [B, T]
        decoder_inputs_embeds=None,  # [B, T, E]
        encoder_hidden_states=None,  # [B, S, E]; None once the cache holds its cross part
        encoder_attention_mask=None,  # [B, S]
        decoder_attention_mask=None,  # [B, T] (with a cache: the new tokens only)
        decoder_position_ids=None,  # unused: T5's positions are relative slots (see below)
        cache: EncoderDecoderCache | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        """The decoder alone. T5 has no absolute positions: the bias reads key slot - query
        slot, which padding in front of a prompt shifts equally on both sides, so
        decoder_position_ids (taken for the contract) change nothing."""
        del decoder_position_ids
        if self.decoder is None:
            raise TypeError("this T5 task model is encoder-only (T5EncoderModel): no decoder")
        return self.decoder(
            self.shared, decoder_input_ids, decoder_inputs_embeds, decoder_attention_mask,
            cache, encoder_hidden_states, encoder_attention_mask,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        )  # fmt: skip

    def __call__(
        self,
        *,
        input_ids=None,  # [B, S]
        attention_mask=None,  # [B, S]
        decoder_input_ids=None,  # [B, T]
        decoder_attention_mask=None,  # [B, T]
        encoder_outputs=None,  # a BaseModelOutput (or tuple) from encode(): skips the encoder
        inputs_embeds=None,
        decoder_inputs_embeds=None,
        cache: EncoderDecoderCache | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> Seq2SeqModelOutput | BaseModelOutput:
        flags = dict(output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        no_decoder_inputs = decoder_input_ids is None and decoder_inputs_embeds is None
        if self.decoder_from_input_ids and no_decoder_inputs:
            if input_ids is None:
                raise ValueError(
                    "If no `decoder_input_ids` or `decoder_inputs_embeds` are passed, `input_ids` "
                    "cannot be `None`. Please pass either `input_ids` or `decoder_input_ids` or "
                    "`decoder_inputs_embeds`."
                )
            decoder_input_ids = shift_tokens_right(
                input_ids, self.pad_token_id, self.decoder_start_token_id
            )
        if encoder_outputs is None:
            encoder_outputs = self.encode(
                input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                **flags,
            )  # fmt: skip
        else:
            encoder_outputs = encoder_output(encoder_outputs)
        if self.decoder is None:
            return encoder_outputs
        decoded = self.decode(
            decoder_input_ids=decoder_input_ids,
            decoder_inputs_embeds=decoder_inputs_embeds,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            decoder_attention_mask=decoder_attention_mask,
            cache=cache,
            **flags,
        )
        return Seq2SeqModelOutput.of(encoder_outputs, decoded)


class MT5Model(T5Model):
    pass


class UMT5Model(T5Model):
    variant = UMT5


# -- registration ------------------------------------------------------------------------------------

#: What the T5 family reads from the config (flaxauto.config_checks refuses the rest).
CONFIG_ATTRIBUTES = (
    "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
    "relative_attention_num_buckets", "relative_attention_max_distance", "dropout_rate",
    "layer_norm_epsilon", "feed_forward_proj", "dense_act_fn", "is_gated_act",
    "is_encoder_decoder", "is_decoder", "pad_token_id", "decoder_start_token_id",
    "tie_word_embeddings", "scale_decoder_outputs", "classifier_dropout", "num_labels",
    # generation defaults (read by generate through the generation config)
    "max_length", "min_length", "num_beams", "length_penalty", "no_repeat_ngram_size",
    "early_stopping",
    # old hub configs: the maximum length of the original TF models, read by no forward
    "n_positions",
)  # fmt: skip

#: the backbone's tied tables: one `shared`, read under both stacks' names
TIES = {"shared": ("encoder.embed_tokens", "decoder.embed_tokens")}


#: T5ForSequenceClassification / T5ForQuestionAnswering feed the decoder input_ids shifted right
#: when given no decoder inputs (T5Model itself requires them)
DECODER_FROM_INPUT_IDS = {"decoder_from_input_ids": True}


def heads(scaled_outputs: bool) -> dict[str, HeadSpec]:
    """transformers' T5 task models: T5ForConditionalGeneration and T5ForQuestionAnswering keep
    shared / encoder / decoder at the top (no prefix); T5ForSequenceClassification runs T5Model
    under `transformer`, T5ForTokenClassification T5EncoderModel (no decoder). scaled_outputs: T5 and UMT5 multiply the decoder output by d_model ** -0.5
    before the lm_head when the checkpoint's config ties it (their config says so in
    scale_decoder_outputs, False for T5 v1.1 / flan-T5 with their own lm_head); mT5 never."""
    lm_options = {"scale_tied_output": True} if scaled_outputs else {}
    if scaled_outputs:
        lm_options["tie_attribute"] = "scale_decoder_outputs"
    else:  # mT5: hub files carry their own lm_head, which transformers 5 loads untied
        lm_options["untie_if_differs"] = ("lm_head.weight", "shared.weight")
    return {
        "base": HeadSpec(None),
        "seq2seq-lm": HeadSpec(Seq2SeqLMHead, options=lm_options, base_model_prefix=""),
        "sequence-classification": HeadSpec(
            Seq2SeqSequenceClassificationHead,
            names={
                "classifier.dense": "classification_head.dense",
                "classifier.out": "classification_head.out_proj",
            },
            options={
                "pooling": "last_eos",
                "dense_activation": "tanh",
                "dropout_before_dense": True,
                "dropout_rate": ConfigAttr("classifier_dropout"),
            },
            backbone_options=DECODER_FROM_INPUT_IDS,
        ),
        "question-answering": HeadSpec(
            Seq2SeqQuestionAnsweringHead,
            backbone_options=DECODER_FROM_INPUT_IDS,
            base_model_prefix="",
        ),
        "token-classification": HeadSpec(
            TokenClassificationHead,
            options={"dropout_rate": ConfigAttr("classifier_dropout")},
            backbone_options={"encoder_only": True},
        ),
    }


for model_types, backbone, scaled_outputs in (
    (("t5",), T5Model, True),
    (("mt5",), MT5Model, False),
    (("umt5",), UMT5Model, True),
):
    register(
        model_types=model_types,
        backbone=backbone,
        base_model_prefix="transformer",
        heads=heads(scaled_outputs),
        ties=TIES,
        ignored=("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",),
        config_attributes=CONFIG_ATTRIBUTES,
    )
