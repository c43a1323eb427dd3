"""Pegasus (transformers' PegasusModel): BART with pre-norm layers, a layer norm after each
stack, fixed sinusoidal positions (sines in the first half of the features, cosines in the
second; checkpoints carry the table) and no layernorm_embedding. An adapter of models/bart.py."""

from __future__ import annotations

from flaxauto.models.bart import BartModel, BartVariant, register_bart_like

PEGASUS = BartVariant(
    pre_norm=True, final_layer_norms=True, layernorm_embedding=False, positions="sinusoidal",
    scale_decoder_inputs_embeds=True,
)  # fmt: skip


class PegasusModel(BartModel):
    variant = PEGASUS


# transformers registers no sequence classification or question answering for Pegasus
register_bart_like(("pegasus",), PegasusModel, classifiers=False)
