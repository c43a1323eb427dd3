"""BERT (transformers' BertModel), with every text head transformers registers for "bert".

Attribute paths are transformers' (`embeddings.word_embeddings`, `encoder.layer.0.attention.self.
query`, ...), so checkpoints map by name.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flaxauto import layers, stacks
from flaxauto.heads import (
    MaskedLMHead,
    MultipleChoiceHead,
    NextSentencePredictionHead,
    QuestionAnsweringHead,
    SequenceClassificationHead,
    TokenClassificationHead,
)
from flaxauto.outputs import BaseModelOutput
from flaxauto.registry import HeadSpec, register

Precision = layers.Precision


def check_config(config) -> None:
    """Refuse what this implementation does not compute, naming the attribute."""
    layers.check_heads_divide(config)
    position_type = getattr(config, "position_embedding_type", "absolute")
    if position_type != "absolute":
        raise NotImplementedError(
            f"position_embedding_type={position_type!r} is not implemented (only 'absolute')"
        )
    for flag in ("is_decoder", "add_cross_attention"):
        if getattr(config, flag, False):
            raise NotImplementedError(f"{flag}=True is not implemented for {config.model_type}")
    layers.activation(config.hidden_act)


class BertEmbeddings(nnx.Module):
    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        hidden = config.hidden_size
        self.word_embeddings = layers.embedding(
            config.vocab_size, hidden, ("vocab", "embed"), precision, rngs,
            padding_idx=config.pad_token_id,
        )  # fmt: skip
        self.position_embeddings = layers.embedding(
            config.max_position_embeddings, hidden, (None, "embed"), precision, rngs,
            padding_idx=self.position_padding_idx(config),
        )  # fmt: skip
        self.token_type_embeddings = layers.embedding(
            config.type_vocab_size, hidden, (None, "embed"), precision, rngs
        )
        self.LayerNorm = layers.layer_norm(hidden, config.layer_norm_eps, precision, rngs)
        self.dropout = layers.dropout(config.hidden_dropout_prob, rngs)

    @staticmethod
    def position_padding_idx(config) -> int | None:
        """BERT's position table has no padding row (RoBERTa's has)."""
        return None

    def __call__(self, input_ids, token_type_ids, position_ids, inputs_embeds) -> jax.Array:
        if position_ids is None:
            position_ids = self.default_position_ids(input_ids, inputs_embeds)
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)  # [B, T, E]
        if token_type_ids is None:
            token_type_ids = jnp.zeros(inputs_embeds.shape[:2], jnp.int32)
        embeddings = (
            inputs_embeds
            + self.token_type_embeddings(token_type_ids)
            + self.position_embeddings(jnp.broadcast_to(position_ids, inputs_embeds.shape[:2]))
        )
        return self.dropout(self.LayerNorm(embeddings))

    def default_position_ids(self, input_ids, inputs_embeds) -> jax.Array:
        """[1, T]: 0, 1, 2, ... (RoBERTa overrides this)."""
        length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        return jnp.arange(length)[None, :]


class BertSelfAttention(nnx.Module):
    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        self.num_heads = config.num_attention_heads
        self.query, self.key, self.value = layers.qkv_projections(
            config.hidden_size, precision, rngs
        )
        self.dropout = layers.dropout(config.attention_probs_dropout_prob, rngs)
        self.implementation = precision.attention

    def __call__(self, hidden_states, bias, output_attentions=False):
        return layers.attend(
            (self.query, self.key, self.value), hidden_states, num_heads=self.num_heads,
            bias=bias, dropout=self.dropout, implementation=self.implementation,
            output_attentions=output_attentions,
        )  # fmt: skip


class BertResidualOutput(nnx.Module):
    """dense -> dropout -> LayerNorm(x + residual): BertSelfOutput and BertOutput alike."""

    def __init__(self, config, in_features: int, in_axis: str, precision, rngs):
        self.dense = layers.linear(
            in_features, config.hidden_size, (in_axis, "embed"), precision, rngs
        )
        self.LayerNorm = layers.layer_norm(
            config.hidden_size, config.layer_norm_eps, precision, rngs
        )
        self.dropout = layers.dropout(config.hidden_dropout_prob, rngs)

    def __call__(self, hidden_states, residual):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class BertAttention(nnx.Module):
    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        self.self = BertSelfAttention(config, precision, rngs)
        self.output = BertResidualOutput(config, config.hidden_size, "heads", precision, rngs)

    def __call__(self, hidden_states, bias, output_attentions=False):
        context, probs = self.self(hidden_states, bias, output_attentions)
        return self.output(context, hidden_states), probs


class BertIntermediate(nnx.Module):
    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        self.dense = layers.linear(
            config.hidden_size, config.intermediate_size, ("embed", "mlp"), precision, rngs
        )
        self.activation = layers.activation(config.hidden_act)

    def __call__(self, hidden_states):
        return self.activation(self.dense(hidden_states))


class BertLayer(nnx.Module):
    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        self.attention = BertAttention(config, precision, rngs)
        self.intermediate = BertIntermediate(config, precision, rngs)
        self.output = BertResidualOutput(config, config.intermediate_size, "mlp", precision, rngs)

    def __call__(self, hidden_states, bias, output_attentions=False):
        attended, probs = self.attention(hidden_states, bias, output_attentions)
        return self.output(self.intermediate(attended), attended), probs


class BertPooler(nnx.Module):
    """tanh(dense(first token))."""

    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        self.dense = layers.linear(
            config.hidden_size, config.hidden_size, ("embed", "mlp"), precision, rngs
        )

    def __call__(self, hidden_states):
        return jnp.tanh(self.dense(hidden_states[:, 0]))


class BertModel(stacks.EncoderBackbone):
    """The BERT backbone: embeddings, encoder, optional pooler."""

    embeddings_class = BertEmbeddings
    supports_scan_layers = supports_remat = True

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
        make_layer = lambda _, rngs: BertLayer(config, precision, rngs)  # noqa: E731
        depth = config.num_hidden_layers
        self.encoder = stacks.Encoder(make_layer, depth, rngs, scan=scan_layers, remat=remat)
        if add_pooling_layer:
            self.pooler = BertPooler(config, precision, rngs)
        else:
            self.pooler = nnx.data(None)

    def __call__(
        self,
        *,
        input_ids=None,  # [B, T]
        attention_mask=None,  # [B, T], 1 = token, 0 = padding
        token_type_ids=None,  # [B, T]
        position_ids=None,  # [B or 1, T]
        inputs_embeds=None,  # [B, T, E]
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutput:
        layers.exactly_one(input_ids, inputs_embeds)
        embeddings = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        return self.encode(
            self.encoder,
            embeddings,
            attention_mask,
            self.pooler,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )


NO_POOLER = {"add_pooling_layer": False}

#: What BERT and RoBERTa read from the config (flaxauto.config_checks refuses the rest).
CONFIG_ATTRIBUTES = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
    "type_vocab_size", "layer_norm_eps", "pad_token_id", "classifier_dropout",
    "tie_word_embeddings",
    # only the values check_config accepts
    "position_embedding_type", "is_decoder", "add_cross_attention",
)  # fmt: skip

#: Heads BERT shares with RoBERTa as they are.
COMMON_HEADS = {
    "base": HeadSpec(None),
    "token-classification": HeadSpec(TokenClassificationHead, backbone_options=NO_POOLER),
    "question-answering": HeadSpec(QuestionAnsweringHead, backbone_options=NO_POOLER),
}

register(
    model_types=("bert",),
    backbone=BertModel,
    base_model_prefix="bert",
    optional_modules=("pooler",),
    ignored=("embeddings.position_ids", "embeddings.token_type_ids"),
    config_attributes=CONFIG_ATTRIBUTES,
    heads={
        **COMMON_HEADS,
        "sequence-classification": HeadSpec(
            SequenceClassificationHead, names={"classifier.out": "classifier"}
        ),
        "masked-lm": HeadSpec(
            MaskedLMHead,
            names={
                "dense": "cls.predictions.transform.dense",
                "layer_norm": "cls.predictions.transform.LayerNorm",
                "decoder": "cls.predictions.decoder",
                "bias": "cls.predictions.bias",
            },
            backbone_options=NO_POOLER,
        ),
        "multiple-choice": HeadSpec(MultipleChoiceHead, names={"classifier.out": "classifier"}),
        "next-sentence-prediction": HeadSpec(
            NextSentencePredictionHead, names={"classifier.out": "cls.seq_relationship"}
        ),
    },
)
