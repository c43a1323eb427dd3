"""mBART (transformers' MBartModel): BART with pre-norm layers, a layer norm after each stack, and
decoder inputs that start with each row's language id (the last non-pad token) rather than one
decoder start token. An adapter of models/bart.py: no code of its own beyond the variant."""

from __future__ import annotations

from flaxauto.models.bart import BartModel, BartVariant, register_bart_like

MBART = BartVariant(pre_norm=True, final_layer_norms=True, wrap_last_token=True)


class MBartModel(BartModel):
    variant = MBART


register_bart_like(("mbart",), MBartModel, wrap_last_token=True)
