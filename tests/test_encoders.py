"""Encoder-family specifics beyond the conformance suite: RoBERTa's padding-aware positions,
DistilBERT's sinusoidal table, and one set of generic heads serving every encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flaxauto
from flaxauto.heads import MaskedLMHead, SequenceClassificationHead
from references import max_diff, run_torch, text_inputs, tiny_config, torch_model


@pytest.mark.parametrize("model_type", ["roberta", "xlm-roberta"])
def test_roberta_positions_skip_padding_and_follow_inputs_embeds(model_type, tmp_path):
    reference = torch_model(model_type, "base")
    reference.save_pretrained(tmp_path)
    model = flaxauto.AutoModel.from_pretrained(tmp_path)
    inputs = text_inputs(model_type, "base")
    left_padded = {k: np.flip(v, axis=1).copy() for k, v in inputs.items()}  # padding first
    for batch in (inputs, left_padded):
        expected = run_torch(reference, batch).last_hidden_state
        assert max_diff(model(**batch).last_hidden_state, expected) <= 1e-4
    embeds = reference.embeddings.word_embeddings(torch.as_tensor(inputs["input_ids"]))
    batch = {"inputs_embeds": embeds.detach().numpy(), "attention_mask": inputs["attention_mask"]}
    expected = run_torch(reference, batch).last_hidden_state
    assert max_diff(model(**batch).last_hidden_state, expected) <= 1e-4


def test_distilbert_sinusoidal_positions(tmp_path):
    reference = torch_model("distilbert", "masked-lm", sinusoidal_pos_embds=True)
    table = reference.distilbert.embeddings.position_embeddings.weight.detach().numpy()
    reference.save_pretrained(tmp_path)
    inputs = text_inputs("distilbert", "masked-lm")
    loaded = flaxauto.AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert max_diff(loaded(**inputs).logits, run_torch(reference, inputs).logits) <= 1e-4
    fresh = flaxauto.AutoModelForMaskedLM.from_config(
        tiny_config("distilbert", sinusoidal_pos_embds=True)
    )
    fresh_table = fresh.backbone.embeddings.position_embeddings.embedding[...]
    assert max_diff(fresh_table, table) <= 1e-6  # transformers' own sin/cos initialisation


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert"])
def test_every_encoder_uses_the_same_generic_heads(model_type):
    config = tiny_config(model_type)
    classifier = flaxauto.AutoModelForSequenceClassification.from_config(config)
    masked_lm = flaxauto.AutoModelForMaskedLM.from_config(config)
    assert type(classifier.head) is SequenceClassificationHead
    assert type(masked_lm.head) is MaskedLMHead
