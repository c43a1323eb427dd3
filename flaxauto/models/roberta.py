"""RoBERTa and XLM-RoBERTa (one implementation): BERT's encoder with fairseq position ids.

Only the embeddings differ from BERT: positions count from padding_idx + 1 and skip padding
tokens, which keep position padding_idx. The heads are the generic ones, configured and named
as transformers' RobertaFor* classes name them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxauto.heads import MaskedLMHead, MultipleChoiceHead, SequenceClassificationHead
from flaxauto.models.bert import (
    COMMON_HEADS,
    CONFIG_ATTRIBUTES,
    NO_POOLER,
    BertEmbeddings,
    BertModel,
)
from flaxauto.registry import ConfigAttr, HeadSpec, register


class RobertaEmbeddings(BertEmbeddings):
    def __init__(self, config, precision, rngs):
        super().__init__(config, precision, rngs)
        self.padding_idx = config.pad_token_id

    @staticmethod
    def position_padding_idx(config) -> int | None:
        """Padding tokens take position padding_idx, a row torch never trains."""
        return config.pad_token_id

    def default_position_ids(self, input_ids, inputs_embeds) -> jax.Array:
        """[B, T]: padding_idx + 1, + 2, ... over real tokens; padding tokens get padding_idx."""
        if input_ids is None:  # embeddings cannot show padding: number every position
            length = inputs_embeds.shape[1]
            return self.padding_idx + 1 + jnp.arange(length)[None, :]
        is_token = (input_ids != self.padding_idx).astype(jnp.int32)
        return jnp.cumsum(is_token, axis=1) * is_token + self.padding_idx


class RobertaModel(BertModel):
    embeddings_class = RobertaEmbeddings


register(
    model_types=("roberta", "xlm-roberta"),
    backbone=RobertaModel,
    base_model_prefix="roberta",
    optional_modules=("pooler",),
    ignored=("embeddings.position_ids", "embeddings.token_type_ids"),
    config_attributes=CONFIG_ATTRIBUTES,
    heads={
        **COMMON_HEADS,
        "sequence-classification": HeadSpec(
            SequenceClassificationHead,
            names={"classifier.out": "classifier.out_proj"},
            options={"pooling": "first", "dense_activation": "tanh", "dropout_before_dense": True},
            backbone_options=NO_POOLER,
        ),
        "masked-lm": HeadSpec(
            MaskedLMHead,
            names={
                "dense": "lm_head.dense",
                "layer_norm": "lm_head.layer_norm",
                "decoder": "lm_head.decoder",
                "bias": "lm_head.bias",
            },  # fmt: skip
            options={"activation": "gelu"},  # RobertaLMHead uses exact gelu, not hidden_act
            backbone_options=NO_POOLER,
        ),
        "multiple-choice": HeadSpec(
            MultipleChoiceHead,
            names={"classifier.out": "classifier"},
            options={"dropout_rate": ConfigAttr("hidden_dropout_prob")},
        ),
    },
)
