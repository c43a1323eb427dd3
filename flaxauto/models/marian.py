"""Marian (transformers' MarianModel / MarianMTModel, the opus-mt translation models): BART with
post-norm layers, no layernorm_embedding, and frozen sinusoidal positions (sines in the first half
of the features, cosines in the second) that transformers computes at init: checkpoints need not
carry them and MarianMTModel does not save them. With share_encoder_decoder_embeddings=False each
stack has its own token table, the decoder's of decoder_vocab_size rows, which the lm_head (tied
to it) and final_logits_bias share. An adapter of models/bart.py: no code of its own beyond the
variant and its config rules."""

from __future__ import annotations

from flaxauto.heads.seq2seq import Seq2SeqLMHead
from flaxauto.models.bart import CONFIG_ATTRIBUTES, BartModel, BartVariant, register_bart_like
from flaxauto.registry import HeadSpec

MARIAN = BartVariant(
    layernorm_embedding=False, positions="sinusoidal-computed", scale_decoder_inputs_embeds=True
)

#: keys older Marian configs carry that no transformers 5 code reads; the values opus-mt's
#: configs hold (False) count as unset (flaxauto.config_checks), any other value is refused
_BART_ONLY = {
    "add_bias_logits", "add_final_layer_norm", "normalize_before", "normalize_embedding",
    "extra_pos_embeddings", "force_bos_token_to_be_generated",
}  # fmt: skip


def check_config(config) -> None:
    if config.share_encoder_decoder_embeddings and config.decoder_vocab_size != config.vocab_size:
        # transformers' tie makes the decoder read the shared table of vocab_size rows while
        # its loss reshapes logits by decoder_vocab_size: no one answer to match
        raise NotImplementedError(
            f"decoder_vocab_size={config.decoder_vocab_size} with "
            f"share_encoder_decoder_embeddings=True (vocab_size={config.vocab_size})"
        )
    if getattr(config, "static_position_embeddings", True) is not True:
        raise NotImplementedError(
            "static_position_embeddings=False (Marian's positions are sinusoidal)"
        )


class MarianModel(BartModel):
    variant = MARIAN

    def __init__(self, config, precision, rngs, *, scan_layers=False, remat=False):
        check_config(config)
        super().__init__(config, precision, rngs, scan_layers=scan_layers, remat=remat)


#: MarianMTModel's `_keys_to_ignore_on_save` (MarianModel, the base class, saves them)
COMPUTED_POSITIONS = (
    "model.encoder.embed_positions.weight",
    "model.decoder.embed_positions.weight",
)

register_bart_like(
    ("marian",),
    MarianModel,
    classifiers=False,  # transformers registers none for Marian
    config_attributes=(
        *(a for a in CONFIG_ATTRIBUTES if a not in _BART_ONLY),
        "decoder_vocab_size",
        "share_encoder_decoder_embeddings",
        "static_position_embeddings",
        "bad_words_ids",
        "classif_dropout",
    ),  # fmt: skip
    heads={
        "base": HeadSpec(None),
        "seq2seq-lm": HeadSpec(
            Seq2SeqLMHead,
            options={"final_logits_bias": True, "vocab_attribute": "decoder_vocab_size"},
            keys_to_ignore_on_save=COMPUTED_POSITIONS,
        ),
    },
)
