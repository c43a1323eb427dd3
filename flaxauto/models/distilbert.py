"""DistilBERT (transformers' DistilBertModel): BERT's post-norm layer in its own layout.

No token types and no pooler; learned or sinusoidal position tables (`sinusoidal_pos_embds`:
the table is a fixed parameter that checkpoints carry; from_config fills it with sin/cos);
LayerNorm eps is fixed at 1e-12; `activation` names the FFN activation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flaxauto import layers, stacks
from flaxauto.heads import (
    MaskedLMHead,
    MultipleChoiceHead,
    QuestionAnsweringHead,
    SequenceClassificationHead,
    TokenClassificationHead,
)
from flaxauto.outputs import BaseModelOutput
from flaxauto.registry import ConfigAttr, HeadSpec, register

Precision = layers.Precision
LAYER_NORM_EPS = 1e-12  # hard-coded in transformers' DistilBERT


def check_config(config) -> None:
    layers.check_heads_divide(config, "dim", "n_heads")
    layers.activation(config.activation, "activation")


class Embeddings(nnx.Module):
    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        self.word_embeddings = layers.embedding(
            config.vocab_size, config.dim, ("vocab", "embed"), precision, rngs,
            padding_idx=config.pad_token_id,
        )  # fmt: skip
        init = "sinusoidal" if config.sinusoidal_pos_embds else None
        self.position_embeddings = layers.embedding(
            config.max_position_embeddings, config.dim, (None, "embed"), precision, rngs, init=init
        )
        self.LayerNorm = layers.layer_norm(config.dim, LAYER_NORM_EPS, precision, rngs)
        self.dropout = layers.dropout(config.dropout, rngs)

    def __call__(self, input_ids, position_ids, inputs_embeds) -> jax.Array:
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)  # [B, T, E]
        if position_ids is None:
            position_ids = jnp.arange(inputs_embeds.shape[1])[None, :]
        positions = self.position_embeddings(
            jnp.broadcast_to(position_ids, inputs_embeds.shape[:2])
        )
        return self.dropout(self.LayerNorm(inputs_embeds + positions))


class DistilBertSelfAttention(nnx.Module):
    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        self.n_heads = config.n_heads
        self.q_lin, self.k_lin, self.v_lin = layers.qkv_projections(config.dim, precision, rngs)
        self.out_lin = layers.linear(config.dim, config.dim, ("heads", "embed"), precision, rngs)
        self.dropout = layers.dropout(config.attention_dropout, rngs)
        self.implementation = precision.attention

    def __call__(self, hidden_states, bias, output_attentions=False):
        context, probs = layers.attend(
            (self.q_lin, self.k_lin, self.v_lin), hidden_states, num_heads=self.n_heads,
            bias=bias, dropout=self.dropout, implementation=self.implementation,
            output_attentions=output_attentions,
        )  # fmt: skip
        return self.out_lin(context), probs


class FFN(nnx.Module):
    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        self.lin1 = layers.linear(config.dim, config.hidden_dim, ("embed", "mlp"), precision, rngs)
        self.lin2 = layers.linear(config.hidden_dim, config.dim, ("mlp", "embed"), precision, rngs)
        self.activation = layers.activation(config.activation, "activation")
        self.dropout = layers.dropout(config.dropout, rngs)

    def __call__(self, hidden_states):
        return self.dropout(self.lin2(self.activation(self.lin1(hidden_states))))


class TransformerBlock(nnx.Module):
    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        self.attention = DistilBertSelfAttention(config, precision, rngs)
        self.sa_layer_norm = layers.layer_norm(config.dim, LAYER_NORM_EPS, precision, rngs)
        self.ffn = FFN(config, precision, rngs)
        self.output_layer_norm = layers.layer_norm(config.dim, LAYER_NORM_EPS, precision, rngs)

    def __call__(self, hidden_states, bias, output_attentions=False):
        attended, probs = self.attention(hidden_states, bias, output_attentions)
        attended = self.sa_layer_norm(attended + hidden_states)
        return self.output_layer_norm(self.ffn(attended) + attended), probs


class DistilBertModel(stacks.EncoderBackbone):
    """The DistilBERT backbone: embeddings and transformer; no pooler."""

    supports_scan_layers = supports_remat = True

    def __init__(
        self, config, precision: Precision, rngs: nnx.Rngs, *, scan_layers=False, remat=False
    ):
        check_config(config)
        self.embeddings = Embeddings(config, precision, rngs)
        make_block = lambda _, rngs: TransformerBlock(config, precision, rngs)  # noqa: E731
        self.transformer = stacks.Encoder(
            make_block, config.n_layers, rngs, scan=scan_layers, remat=remat
        )

    def __call__(
        self,
        *,
        input_ids=None,  # [B, T]
        attention_mask=None,  # [B, T], 1 = token, 0 = padding
        position_ids=None,  # [B or 1, T]
        inputs_embeds=None,  # [B, T, E]
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutput:
        layers.exactly_one(input_ids, inputs_embeds)
        embeddings = self.embeddings(input_ids, position_ids, inputs_embeds)
        return self.encode(
            self.transformer,
            embeddings,
            attention_mask,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )


# pre_classifier -> ReLU -> dropout(seq_classif_dropout) -> classifier, on the first token
POOLED = {
    "pooling": "first",
    "dense_activation": "relu",
    "dropout_rate": ConfigAttr("seq_classif_dropout"),
}
POOLED_NAMES = {"classifier.dense": "pre_classifier", "classifier.out": "classifier"}

#: What DistilBERT reads from the config (flaxauto.config_checks refuses the rest).
CONFIG_ATTRIBUTES = (
    "vocab_size", "max_position_embeddings", "sinusoidal_pos_embds", "n_layers", "n_heads", "dim",
    "hidden_dim", "dropout", "attention_dropout", "activation", "qa_dropout",
    "seq_classif_dropout", "pad_token_id", "tie_word_embeddings",
)  # fmt: skip

register(
    model_types=("distilbert",),
    backbone=DistilBertModel,
    base_model_prefix="distilbert",
    ignored=("embeddings.position_ids",),
    config_attributes=CONFIG_ATTRIBUTES,
    heads={
        "base": HeadSpec(None),
        "sequence-classification": HeadSpec(
            SequenceClassificationHead, names=POOLED_NAMES, options=POOLED
        ),
        "token-classification": HeadSpec(
            TokenClassificationHead, options={"dropout_rate": ConfigAttr("dropout")}
        ),
        "question-answering": HeadSpec(
            QuestionAnsweringHead, options={"dropout_rate": ConfigAttr("qa_dropout")}
        ),
        "masked-lm": HeadSpec(
            MaskedLMHead,
            names={
                "dense": "vocab_transform",
                "layer_norm": "vocab_layer_norm",
                "decoder": "vocab_projector",
                "bias": "vocab_projector.bias",
            },  # fmt: skip
            options={"activation_attribute": "activation", "layer_norm_eps": LAYER_NORM_EPS},
        ),
        "multiple-choice": HeadSpec(MultipleChoiceHead, names=POOLED_NAMES, options=POOLED),
    },
)
