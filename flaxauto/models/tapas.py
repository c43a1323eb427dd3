"""TAPAS (transformers' TapasModel): BERT's encoder under table-aware embeddings, with the heads
transformers registers for "tapas" (base, masked LM, sequence classification, table QA).

Only the embeddings are new: one token type table per table feature (`token_type_ids` is
[B, T, 7]: segment, column, row, previous answer, column rank, inverse rank, numeric relation),
and with `reset_position_index_per_cell` positions that restart in every cell. The layers, the
stack and the pooler are BERT's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flaxauto import layers, segments
from flaxauto.heads import MaskedLMHead, SequenceClassificationHead
from flaxauto.heads.table import TableQuestionAnsweringHead
from flaxauto.models.bert import CONFIG_ATTRIBUTES as BERT_CONFIG_ATTRIBUTES
from flaxauto.models.bert import NO_POOLER, BertModel
from flaxauto.registry import ConfigAttr, HeadSpec, register

#: the channels of token_type_ids [B, T, 7], in transformers' order
TOKEN_TYPES = (
    "segment_ids", "column_ids", "row_ids", "prev_labels", "column_ranks", "inv_column_ranks",
    "numeric_relations",
)  # fmt: skip
COLUMN, ROW = TOKEN_TYPES.index("column_ids"), TOKEN_TYPES.index("row_ids")


class TapasEmbeddings(nnx.Module):
    """word + position + one token type embedding per table feature, LayerNorm, dropout."""

    def __init__(self, config, precision: layers.Precision, rngs: nnx.Rngs):
        hidden = config.hidden_size
        self.word_embeddings = layers.embedding(
            config.vocab_size, hidden, ("vocab", "embed"), precision, rngs,
            padding_idx=config.pad_token_id,
        )  # fmt: skip
        self.position_embeddings = layers.embedding(
            config.max_position_embeddings, hidden, (None, "embed"), precision, rngs
        )
        self.type_vocab_sizes = tuple(config.type_vocab_sizes)
        for i, size in enumerate(self.type_vocab_sizes):
            table = layers.embedding(size, hidden, (None, "embed"), precision, rngs)
            setattr(self, f"token_type_embeddings_{i}", table)
        self.LayerNorm = layers.layer_norm(hidden, config.layer_norm_eps, precision, rngs)
        self.dropout = layers.dropout(config.hidden_dropout_prob, rngs)
        self.reset_position_index_per_cell = config.reset_position_index_per_cell
        self.max_position = config.max_position_embeddings - 1

    def __call__(self, input_ids, token_type_ids, position_ids, inputs_embeds) -> jax.Array:
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)  # [B, T, E]
        shape = inputs_embeds.shape[:2]
        if token_type_ids is None:
            token_type_ids = jnp.zeros((*shape, len(self.type_vocab_sizes)), jnp.int32)
        if position_ids is None:
            position_ids = self.default_position_ids(token_type_ids, shape)
        embeddings = inputs_embeds + self.position_embeddings(jnp.broadcast_to(position_ids, shape))
        for i in range(len(self.type_vocab_sizes)):
            table = getattr(self, f"token_type_embeddings_{i}")
            embeddings = embeddings + table(token_type_ids[:, :, i])
        return self.dropout(self.LayerNorm(embeddings))

    def default_position_ids(self, token_type_ids, shape) -> jax.Array:
        """[B, T]: 0, 1, 2, ...; with reset_position_index_per_cell, the distance from the first
        token of the token's cell (question tokens and padding share cell (0, 0)), capped at
        max_position_embeddings - 1."""
        positions = jnp.broadcast_to(jnp.arange(shape[1]), shape)
        if not self.reset_position_index_per_cell:
            return positions
        column = segments.index_map(token_type_ids[:, :, COLUMN], self.type_vocab_sizes[COLUMN], 1)
        row = segments.index_map(token_type_ids[:, :, ROW], self.type_vocab_sizes[ROW], 1)
        cell = segments.product_index(column, row)
        first_per_cell, _ = segments.reduce_min(positions, cell)  # [B, cells]
        first = segments.gather(first_per_cell, cell)  # [B, T]
        return jnp.minimum(self.max_position, positions - first)


class TapasModel(BertModel):
    """BERT's backbone with TapasEmbeddings; token_type_ids is [B, T, 7]."""

    embeddings_class = TapasEmbeddings


#: What TAPAS reads from the config; the table QA settings are read by its head.
_NOT_TAPAS = ("type_vocab_size", "position_embedding_type")  # TapasConfig has neither
CONFIG_ATTRIBUTES = tuple(a for a in BERT_CONFIG_ATTRIBUTES if a not in _NOT_TAPAS) + (
    "type_vocab_sizes", "reset_position_index_per_cell", "positive_label_weight",
    "num_aggregation_labels", "aggregation_loss_weight", "use_answer_as_supervision",
    "answer_loss_importance", "use_normalized_answer_loss", "huber_loss_delta", "temperature",
    "aggregation_temperature", "average_approximation_function", "cell_selection_preference",
    "answer_loss_cutoff", "max_num_rows", "max_num_columns", "average_logits_per_cell",
    "select_one_column", "allow_empty_column_selection", "init_cell_selection_weights_to_zero",
    "disable_per_token_loss", "aggregation_labels", "no_aggregation_label_index",
    # sampling in the training loss: refused when a loss is asked for with them set
    "use_gumbel_for_cells", "use_gumbel_for_aggregation",
)  # fmt: skip

register(
    model_types=("tapas",),
    backbone=TapasModel,
    base_model_prefix="tapas",
    optional_modules=("pooler",),
    ignored=("embeddings.position_ids",),
    config_attributes=CONFIG_ATTRIBUTES,
    heads={
        "base": HeadSpec(None),
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
        "sequence-classification": HeadSpec(
            SequenceClassificationHead,
            names={"classifier.out": "classifier"},
            options={"dropout_rate": ConfigAttr("hidden_dropout_prob")},
        ),
        "table-question-answering": HeadSpec(TableQuestionAnsweringHead),
    },
)
