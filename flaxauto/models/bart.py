"""BART (transformers' BartModel) and the encoder-decoders built like it: one implementation,
with the variants as small adapters (models/mbart.py, marian.py, pegasus.py set a BartVariant).

Attribute paths are transformers' (`shared`, `encoder.layers.0.self_attn.q_proj`,
`decoder.layers.0.encoder_attn_layer_norm`, ...). The model holds one token table, `shared`;
transformers' `encoder.embed_tokens` / `decoder.embed_tokens` are tied names of it (a checkpoint
may carry any of them), read through the backbone so the model stays a tree.

The backbone is an encoder-decoder as flaxauto.decoding and heads/seq2seq.py expect it:
`encode(...)` runs the encoder alone, `decode(...)` the decoder alone (with an
EncoderDecoderCache whose cross part the first call fills), `__call__` both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax.numpy as jnp
from flax import nnx

from flaxauto import layers, stacks
from flaxauto.decoder import DecoderBackbone, DecoderStep, EncoderDecoderCache
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

Precision = layers.Precision


@dataclass(frozen=True)
class BartVariant:
    """How a BART-like family differs from BART (whose values are the defaults)."""

    #: layer norm before each sublayer (mBART, Pegasus) instead of after the residual sum
    pre_norm: bool = False
    #: `encoder.layer_norm` / `decoder.layer_norm` after the last layer (mBART, Pegasus)
    final_layer_norms: bool = False
    #: `layernorm_embedding` after the embeddings (BART, mBART)
    layernorm_embedding: bool = True
    #: "learned" (BART's table, read at position + 2), "sinusoidal" (Pegasus: a frozen table
    #: checkpoints carry) or "sinusoidal-computed" (Marian: a frozen table transformers computes
    #: at init, neither requires nor, in MarianMTModel, saves)
    positions: str = "learned"
    #: decoder_inputs_embeds are scaled by embed_scale as looked-up tokens are (Marian, Pegasus:
    #: the decoder scales whatever embeddings it gets; BART scales inside its token table)
    scale_decoder_inputs_embeds: bool = False
    #: decoder inputs made from input_ids / labels start with each row's last non-pad token
    #: (mBART's language id) instead of decoder_start_token_id
    wrap_last_token: bool = False


BART = BartVariant()

#: BART's learned position table holds 2 rows before position 0 (fairseq's padding offset)
LEARNED_POSITION_OFFSET = 2


def shares_embeddings(config) -> bool:
    """One token table for both stacks (all but Marian's share_encoder_decoder_embeddings=False)."""
    return bool(getattr(config, "share_encoder_decoder_embeddings", True))


def check_config(config) -> None:
    """Refuse what this implementation does not compute, naming the attribute."""
    layers.check_heads_divide(config, "d_model", "encoder_attention_heads")
    layers.check_heads_divide(config, "d_model", "decoder_attention_heads")
    layers.activation(config.activation_function, "activation_function")
    if getattr(config, "is_decoder", False):
        raise NotImplementedError(
            f"is_decoder=True (the decoder alone, {config.model_type}ForCausalLM) is not "
            "implemented"
        )
    if not getattr(config, "is_encoder_decoder", True):
        raise NotImplementedError("is_encoder_decoder=False is not implemented for bart")


# -- modules, small to large ---------------------------------------------------------------------


class BartAttention(nnx.Module):
    """Multi-head attention with q/k/v/out projections (biases on all), scores scaled by
    head_dim ** -0.5: self attention in both stacks, cross attention in the decoder."""

    def __init__(self, config, num_heads: int, precision: Precision, rngs: nnx.Rngs):
        width = config.d_model
        self.q_proj, self.k_proj, self.v_proj = (
            layers.linear(width, width, ("embed", "heads"), precision, rngs) for _ in range(3)
        )
        self.out_proj = layers.linear(width, width, ("heads", "embed"), precision, rngs)
        self.num_heads = num_heads
        self.dropout = layers.dropout(config.attention_dropout, rngs)
        self.implementation = precision.attention

    def heads(self, projection, x):
        return layers.split_heads(projection(x), self.num_heads)  # [B, T, H, D]

    def _attend(self, q, k, v, bias, output_attentions: bool):
        context, probs = layers.dot_product_attention(
            q, k, v, bias, self.dropout,
            implementation=self.implementation, output_attentions=output_attentions,
        )  # fmt: skip
        return self.out_proj(layers.merge_heads(context)), probs

    def __call__(self, hidden, bias, output_attentions: bool):
        """Encoder self attention: hidden [B, T, E], bias [B, 1, 1, T]."""
        q, k, v = (self.heads(p, hidden) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self._attend(q, k, v, bias, output_attentions)

    def cached_self_attention(self, hidden, step: DecoderStep, layer_cache, bias):
        """Decoder self attention over the cache's slots (bias [B, 1, T, S] is causal)."""
        q, k, v = (self.heads(p, hidden) for p in (self.q_proj, self.k_proj, self.v_proj))
        k, v, layer_cache = step.keys_values(layer_cache, k, v)
        return (*self._attend(q, k, v, bias, step.output_attentions), layer_cache)

    def cross_attention(self, hidden, step: DecoderStep, layer_cache):
        """Decoder cross attention over the encoder output, projected once into the cache."""

        def project(encoder_hidden):  # [B, S_enc, E] -> keys, values [B, S_enc, H, D]
            return self.heads(self.k_proj, encoder_hidden), self.heads(self.v_proj, encoder_hidden)

        q = self.heads(self.q_proj, hidden)
        k, v, layer_cache = step.cross_keys_values(layer_cache, project)
        return (*self._attend(q, k, v, step.cross_bias, step.output_attentions), layer_cache)


def _sublayer(pre_norm: bool, norm, hidden, run):
    """The residual around a sublayer, the norm before it (pre-norm) or after the sum (BART).
    run(x) -> (output, extra); returns (new hidden, extra)."""
    if pre_norm:
        output, extra = run(norm(hidden))
        return hidden + output, extra
    output, extra = run(hidden)
    return norm(hidden + output), extra


class _FeedForward(nnx.Module):
    """fc1 -> activation -> dropout -> fc2 -> dropout, as a sublayer of both stacks' layers."""

    def _init_feed_forward(self, config, ffn_dim: int, precision: Precision, rngs: nnx.Rngs):
        width = config.d_model
        self.fc1 = layers.linear(width, ffn_dim, ("embed", "mlp"), precision, rngs)
        self.fc2 = layers.linear(ffn_dim, width, ("mlp", "embed"), precision, rngs)
        self.activation_fn = layers.activation(config.activation_function, "activation_function")
        self.activation_dropout = layers.dropout(config.activation_dropout, rngs)
        self.dropout = layers.dropout(config.dropout, rngs)
        self.final_layer_norm = layers.layer_norm(width, 1e-5, precision, rngs)

    def feed_forward(self, x):
        x = self.activation_dropout(self.activation_fn(self.fc1(x)))
        return self.dropout(self.fc2(x)), None


class BartEncoderLayer(_FeedForward):
    def __init__(self, config, variant: BartVariant, precision: Precision, rngs: nnx.Rngs):
        self.self_attn = BartAttention(config, config.encoder_attention_heads, precision, rngs)
        self.self_attn_layer_norm = layers.layer_norm(config.d_model, 1e-5, precision, rngs)
        self._init_feed_forward(config, config.encoder_ffn_dim, precision, rngs)
        self.pre_norm = variant.pre_norm

    def __call__(self, hidden, bias, output_attentions: bool):
        def attention(x):
            output, probs = self.self_attn(x, bias, output_attentions)
            return self.dropout(output), probs

        hidden, probs = _sublayer(self.pre_norm, self.self_attn_layer_norm, hidden, attention)
        hidden, _ = _sublayer(self.pre_norm, self.final_layer_norm, hidden, self.feed_forward)
        return hidden, probs


class BartDecoderLayer(_FeedForward):
    def __init__(self, config, variant: BartVariant, precision: Precision, rngs: nnx.Rngs):
        heads, width = config.decoder_attention_heads, config.d_model
        self.self_attn = BartAttention(config, heads, precision, rngs)
        self.self_attn_layer_norm = layers.layer_norm(width, 1e-5, precision, rngs)
        self.encoder_attn = BartAttention(config, heads, precision, rngs)
        self.encoder_attn_layer_norm = layers.layer_norm(width, 1e-5, precision, rngs)
        self._init_feed_forward(config, config.decoder_ffn_dim, precision, rngs)
        self.pre_norm = variant.pre_norm

    def __call__(self, hidden, step: DecoderStep, layer_cache, bias):
        """-> (hidden, (self-attention probs, cross-attention probs), the layer's new cache)."""
        cache = [layer_cache]

        def self_attention(x):
            output, probs, cache[0] = self.self_attn.cached_self_attention(x, step, cache[0], bias)
            return self.dropout(output), probs

        def cross_attention(x):
            output, probs, cache[0] = self.encoder_attn.cross_attention(x, step, cache[0])
            return self.dropout(output), probs

        hidden, probs = _sublayer(self.pre_norm, self.self_attn_layer_norm, hidden, self_attention)
        hidden, cross = _sublayer(
            self.pre_norm, self.encoder_attn_layer_norm, hidden, cross_attention
        )
        hidden, _ = _sublayer(self.pre_norm, self.final_layer_norm, hidden, self.feed_forward)
        return hidden, (probs, cross), cache[0]


class _Embeddings(nnx.Module):
    """What both stacks add to the token embeddings: positions, layernorm_embedding, dropout."""

    def _init_embeddings(self, config, variant: BartVariant, precision, rngs):
        width = config.d_model
        if variant.positions == "learned":
            rows = config.max_position_embeddings + LEARNED_POSITION_OFFSET
            self.embed_positions = layers.embedding(rows, width, (None, "embed"), precision, rngs)
            self.position_offset = LEARNED_POSITION_OFFSET
        else:  # torch's frozen nn.Embedding: a table no optimiser moves
            self.embed_positions = layers.FixedTable(
                config.max_position_embeddings, width, (None, "embed"), precision.param_dtype,
                init="sinusoidal-halves", computed=variant.positions == "sinusoidal-computed",
            )  # fmt: skip
            self.position_offset = 0
        self.layernorm_embedding = (
            layers.layer_norm(width, 1e-5, precision, rngs)
            if variant.layernorm_embedding
            else nnx.data(None)
        )
        self.layer_norm = (
            layers.layer_norm(width, 1e-5, precision, rngs)
            if variant.final_layer_norms
            else nnx.data(None)
        )
        self.dropout = layers.dropout(config.dropout, rngs)

    def embed(self, inputs_embeds, position_ids):
        """inputs_embeds [B, T, E] (already scaled), position_ids [B or 1, T] -> [B, T, E]."""
        positions = self.embed_positions(position_ids + self.position_offset)
        hidden = inputs_embeds + positions.astype(inputs_embeds.dtype)
        if self.layernorm_embedding is not None:
            hidden = self.layernorm_embedding(hidden)
        return self.dropout(hidden)

    def final_norm(self, hidden):
        return hidden if self.layer_norm is None else self.layer_norm(hidden)

    def _check_layerdrop(self, rate: float, attribute: str) -> None:
        # transformers skips whole layers at random in training; eval runs them all
        if rate > 0 and not self.dropout.deterministic:
            raise NotImplementedError(f"{attribute}={rate} in training is not implemented")


class BartEncoder(_Embeddings):
    def __init__(self, config, variant, precision, rngs, *, scan_layers=False, remat=False):
        self._init_embeddings(config, variant, precision, rngs)
        self.layers = stacks.layer_stack(
            lambda _, rngs: BartEncoderLayer(config, variant, precision, rngs),
            config.encoder_layers, rngs, scan=scan_layers,
        )  # fmt: skip
        self.remat = remat
        self.layerdrop = config.encoder_layerdrop

    def __call__(
        self, inputs_embeds, attention_mask, *, output_hidden_states: bool, output_attentions: bool
    ) -> BaseModelOutput:
        self._check_layerdrop(self.layerdrop, "encoder_layerdrop")
        length = inputs_embeds.shape[1]
        hidden = self.embed(inputs_embeds, jnp.arange(length, dtype=jnp.int32)[None, :])
        bias = layers.padding_bias(attention_mask)  # [B, 1, 1, T]
        return stacks.run_encoder(
            self.layers, hidden, lambda layer, h: layer(h, bias, output_attentions),
            self.final_norm, output_hidden_states=output_hidden_states,
            output_attentions=output_attentions, remat=self.remat,
        )  # fmt: skip


class BartDecoder(_Embeddings, DecoderBackbone):
    cross_attention = True

    def __init__(self, config, variant, precision, rngs, *, scan_layers=False, remat=False):
        self._init_embeddings(config, variant, precision, rngs)
        self.layers = self.layer_stack(
            lambda _, rngs: BartDecoderLayer(config, variant, precision, rngs),
            config.decoder_layers, rngs, scan_layers, remat,
        )  # fmt: skip
        heads = config.decoder_attention_heads
        self.cache_shape = (config.decoder_layers, heads, config.d_model // heads)
        self.compute_dtype = precision.dtype
        self.layerdrop = config.decoder_layerdrop

    @property
    def stack(self):
        return self.layers

    def __call__(
        self, embed, input_ids, inputs_embeds, attention_mask, position_ids, cache,
        encoder_hidden_states, encoder_attention_mask, *,
        output_hidden_states: bool, output_attentions: bool,
    ) -> BaseModelOutputWithPastAndCrossAttentions:  # fmt: skip
        self._check_layerdrop(self.layerdrop, "decoder_layerdrop")
        embeds, step, position_ids = self.begin(
            embed, input_ids, inputs_embeds, attention_mask, position_ids, cache, (None,),
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
        )  # fmt: skip
        return self.finish(
            self.embed(embeds, position_ids), step, self.final_norm,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        )  # fmt: skip


class BartModel(nnx.Module):
    """The BART backbone: `shared` token table, `encoder`, `decoder`."""

    supports_scan_layers = supports_remat = True
    variant: BartVariant = BART

    def __init__(
        self, config, precision: Precision, rngs: nnx.Rngs, *, scan_layers=False, remat=False
    ):
        check_config(config)
        variant = type(self).variant

        def token_table(rows: int) -> nnx.Embed:
            return layers.embedding(
                rows, config.d_model, ("vocab", "embed"), precision, rngs,
                padding_idx=config.pad_token_id,  # as torch's: no lookup trains the padding row
            )  # fmt: skip

        shared = shares_embeddings(config)
        self.shared = token_table(config.vocab_size) if shared else nnx.data(None)
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.encoder = BartEncoder(
            config, variant, precision, rngs, scan_layers=scan_layers, remat=remat
        )
        self.decoder = BartDecoder(
            config, variant, precision, rngs, scan_layers=scan_layers, remat=remat
        )
        if not shared:  # Marian's own tables per stack (the decoder's of decoder_vocab_size)
            self.encoder.embed_tokens = token_table(config.vocab_size)
            self.decoder.embed_tokens = token_table(config.decoder_vocab_size)
        self.pad_token_id = config.pad_token_id
        self.decoder_start_token_id = config.decoder_start_token_id

    def get_input_embeddings(self) -> nnx.Embed:
        return self.encoder.embed_tokens if self.shared is None else self.shared

    def get_decoder_input_embeddings(self) -> nnx.Embed:
        """The table the decoder reads and a tied lm_head multiplies by."""
        return self.decoder.embed_tokens if self.shared is None else self.shared

    def _embed_tokens(self, table: nnx.Embed, scale: float | None = None):
        scale = self.embed_scale if scale is None else scale
        return lambda ids: table(ids) * jnp.asarray(scale, table.dtype or jnp.float32)

    def init_cache(self, batch_size: int, max_length: int, dtype=None, *, mesh=None, rules=None):
        """An empty EncoderDecoderCache: the decoder's self part for max_length tokens; the
        cross part is filled by the first decode given the encoder output."""
        return self.decoder.init_cache(batch_size, max_length, dtype, mesh=mesh, rules=rules)

    def encode(
        self,
        *,
        input_ids=None,  # [B, S]
        attention_mask=None,  # [B, S], 1 = token, 0 = padding
        inputs_embeds=None,  # [B, S, E], used as given (not scaled)
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutput:
        """The encoder alone."""
        layers.exactly_one(input_ids, inputs_embeds)
        if inputs_embeds is None:
            inputs_embeds = self._embed_tokens(self.get_input_embeddings())(input_ids)
        return self.encoder(
            inputs_embeds, attention_mask,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        )  # fmt: skip

    def decode(
        self,
        *,
        decoder_input_ids=None,  # [B, T]
        decoder_inputs_embeds=None,  # [B, T, E]; scaled only where the variant says (Marian)
        encoder_hidden_states=None,  # [B, S, E]; None once the cache holds its cross part
        encoder_attention_mask=None,  # [B, S]
        decoder_attention_mask=None,  # [B, T] (with a cache: the new tokens only)
        decoder_position_ids=None,  # [B or 1, T]; default: continuing from the cache
        cache: EncoderDecoderCache | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        """The decoder alone (positions default to transformers': the cache length onwards)."""
        if type(self).variant.scale_decoder_inputs_embeds and decoder_inputs_embeds is not None:
            scale = jnp.asarray(self.embed_scale, decoder_inputs_embeds.dtype)
            decoder_inputs_embeds = decoder_inputs_embeds * scale
        return self.decoder(
            self._embed_tokens(self.get_decoder_input_embeddings()),
            decoder_input_ids, decoder_inputs_embeds, decoder_attention_mask,
            decoder_position_ids, cache, encoder_hidden_states, encoder_attention_mask,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        )  # fmt: skip

    def __call__(
        self,
        *,
        input_ids=None,  # [B, S]
        attention_mask=None,  # [B, S]
        decoder_input_ids=None,  # [B, T]; default: input_ids shifted right (BART's denoising)
        decoder_attention_mask=None,  # [B, T]
        encoder_outputs=None,  # a BaseModelOutput (or tuple) from encode(): skips the encoder
        inputs_embeds=None,
        decoder_inputs_embeds=None,
        cache: EncoderDecoderCache | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> Seq2SeqModelOutput:
        flags = dict(output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            if input_ids is None:
                raise ValueError(
                    "If no `decoder_input_ids` or `decoder_inputs_embeds` are passed, "
                    "`input_ids` cannot be `None`."
                )
            decoder_input_ids = shift_tokens_right(
                input_ids, self.pad_token_id, self.decoder_start_token_id,
                wrap_last=type(self).variant.wrap_last_token,
            )  # fmt: skip
        if encoder_outputs is None:
            encoder_outputs = self.encode(
                input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                **flags,
            )  # fmt: skip
        else:
            encoder_outputs = encoder_output(encoder_outputs)
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


#: What BART reads from the config (flaxauto.config_checks refuses the rest).
CONFIG_ATTRIBUTES = (
    "vocab_size", "max_position_embeddings", "d_model", "encoder_layers", "decoder_layers",
    "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim",
    "activation_function", "dropout", "attention_dropout", "activation_dropout",
    "encoder_layerdrop", "decoder_layerdrop", "scale_embedding", "pad_token_id",
    "decoder_start_token_id", "tie_word_embeddings", "is_encoder_decoder", "is_decoder",
    "init_std", "num_labels", "classifier_dropout", "num_hidden_layers",
    # generation defaults (read by generate through the generation config)
    "forced_bos_token_id", "forced_eos_token_id", "max_length", "min_length", "num_beams",
    "length_penalty", "no_repeat_ngram_size", "early_stopping",
    # keys of older BART configs that no transformers 5 code reads (their hub values describe
    # BART as implemented here)
    "add_bias_logits", "add_final_layer_norm", "normalize_before", "normalize_embedding",
    "static_position_embeddings", "extra_pos_embeddings", "force_bos_token_to_be_generated",
    "gradient_checkpointing",
)  # fmt: skip

#: the backbone's tied tables: one `shared`, read under both stacks' names
TIES = {"shared": ("encoder.embed_tokens", "decoder.embed_tokens")}


def ties(config) -> dict:
    """TIES, or none where each stack has its own table (Marian unshared)."""
    return TIES if shares_embeddings(config) else {}


#: transformers' BartForConditionalGeneration: lm_head tied to `shared` (tie_word_embeddings),
#: final_logits_bias a saved buffer
SEQ2SEQ_LM = HeadSpec(Seq2SeqLMHead, options={"final_logits_bias": True})
#: BartForSequenceClassification / BartForQuestionAnswering (BART and mBART only)
CLASSIFICATION_HEADS = {
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
    ),  # fmt: skip
    "question-answering": HeadSpec(Seq2SeqQuestionAnsweringHead, options={"num_outputs": 2}),
}


def register_bart_like(
    model_types: tuple[str, ...], backbone: type, *, classifiers=True, wrap_last_token=False,
    **family,
) -> None:  # fmt: skip
    """register() a BART-like family with BART's heads (classifiers: the sequence
    classification and question answering ones too); `family` overrides register's keywords
    (config_attributes, ties, ...)."""
    lm = SEQ2SEQ_LM
    if wrap_last_token:
        lm = HeadSpec(Seq2SeqLMHead, options={**lm.options, "wrap_last_token": True})
    heads = {"base": HeadSpec(None), "seq2seq-lm": lm}
    if classifiers:
        heads |= CLASSIFICATION_HEADS
    register(
        **dict(
            model_types=model_types,
            backbone=backbone,
            base_model_prefix="model",
            ties=ties,
            ignored=("encoder.version", "decoder.version"),
            config_attributes=CONFIG_ATTRIBUTES,
            heads=heads,
        )
        | family
    )


register_bart_like(("bart",), BartModel)
