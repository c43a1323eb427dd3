"""Language-model heads: the masked-LM prediction head (transform, tied decoder, bias)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flaxauto import layers, outputs
from flaxauto.decoding import DecodingHead, DecodingState
from flaxauto.heads import losses
from flaxauto.heads.base import Head


def tied_step_logits(embed: nnx.Embed, hidden: jax.Array) -> jax.Array:
    """[B, E] -> [B, V] over a tied token table [V, E], for one decoding step (bound by reading
    the table). The table is contracted as the left operand over its contiguous axis and the
    small [V, B] result transposed; measured on XLA:CPU, that reads the table as fast as a
    transposed [E, V] copy would at batch 1 (attend's hidden @ table.T: about 1.3x slower, XLA
    looping over a transposed view) and about 1.6x faster than either at batch 8, with no copy
    of the table."""
    hidden, table = embed.promote_dtype((hidden, embed.embedding[...]), dtype=embed.dtype)
    if hidden.dtype != jnp.float32:
        # bf16 logits round to few distinct values and greedy decoding breaks ties by index,
        # so the summation order picks tokens: attend's order matched transformers' bf16
        # tokens at batch 1 (measured: all of them, against a fifth in this form)
        return embed.attend(hidden)
    return jax.lax.dot_general(table, hidden, (((1,), (1,)), ((), ()))).T


class MaskedLMHead(Head):
    """hidden -> [dense -> activation -> LayerNorm] -> decoder (tied to the word embeddings) + bias.

    With tie_word_embeddings the decoder is the input embedding matrix, read through the
    backbone's embedding `attend`, so the model stays a tree (no shared parameter objects).
    """

    def __init__(
        self,
        config,
        precision,
        rngs,
        *,
        activation: str | None = None,
        activation_attribute: str = "hidden_act",
        layer_norm_eps: float | None = None,
    ):
        """activation: a fixed activation (RoBERTa's head always uses exact gelu); otherwise the
        config attribute `activation_attribute` names it. layer_norm_eps: a fixed epsilon for
        families without config.layer_norm_eps (DistilBERT)."""
        hidden, vocab = config.hidden_size, config.vocab_size
        self.dense = layers.linear(hidden, hidden, ("embed", "mlp"), precision, rngs)
        name = activation or getattr(config, activation_attribute)
        self.activation = layers.activation(name, activation_attribute)
        eps = config.layer_norm_eps if layer_norm_eps is None else layer_norm_eps
        self.layer_norm = layers.layer_norm(hidden, eps, precision, rngs)
        self.tied = bool(getattr(config, "tie_word_embeddings", True))
        if self.tied:
            self.decoder = nnx.data(None)
            self.tied_names = ("decoder.weight", "decoder.bias")
        else:
            self.decoder = layers.linear(
                hidden, vocab, ("embed", "vocab"), precision, rngs, use_bias=False
            )
            self.tied_names = ("decoder.bias",)  # transformers ties the decoder bias to `bias`
        self.bias = layers.parameter((vocab,), ("vocab",), precision, init="zeros")

    def __call__(self, features, *, backbone, inputs, labels=None):
        hidden = self.layer_norm(self.activation(self.dense(features.last_hidden_state)))
        if self.tied:
            logits = backbone.get_input_embeddings().attend(hidden)  # [B, T, V]
        else:
            logits = self.decoder(hidden)
        logits = logits + self.bias[...].astype(logits.dtype)[None, None, :]
        loss = None
        if labels is not None:
            loss = losses.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), jnp.reshape(labels, -1)
            )
        return outputs.MaskedLMOutput(
            logits=logits,
            loss=loss,
            hidden_states=features.hidden_states,
            attentions=features.attentions,
        )


class CausalLMHead(Head, DecodingHead):
    """hidden -> lm_head (no bias; with tie_word_embeddings the input embedding matrix, read
    through the backbone's `attend`) -> next-token logits; the loss shifts labels left by one, as
    transformers does, so `labels=input_ids` trains next-token prediction."""

    def __init__(self, config, precision, rngs):
        self.tied = bool(getattr(config, "tie_word_embeddings", True))
        if self.tied:
            self.lm_head = nnx.data(None)
            self.tied_names = ("lm_head.weight",)
        else:
            self.lm_head = layers.linear(
                config.hidden_size,
                config.vocab_size,
                ("embed", "vocab"),
                precision,
                rngs,
                use_bias=False,
            )

    def logits(self, hidden, backbone):
        """[..., E] -> [..., V]."""
        if self.tied:
            return backbone.get_input_embeddings().attend(hidden)
        return self.lm_head(hidden)

    def decode_logits(self, hidden, backbone):
        """[B, E] -> [B, V] for one decoding step, which is bound by reading the output matrix."""
        if not self.tied:
            return self.lm_head(hidden)
        return tied_step_logits(backbone.get_input_embeddings(), hidden)

    def start(self, backbone, prompt_ids, prompt_mask, *, cache, **encoder_inputs):
        """The decoding protocol (flaxauto.decoding): prefill the prompt [B, P] into the empty
        `cache` -> (state, logits of the token after the prompt [B, V])."""
        if encoder_inputs:
            raise TypeError(
                f"a causal LM starts from its prompt alone, not {sorted(encoder_inputs)}"
            )
        prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
        # transformers' positions for a left-padded prompt: count real tokens; padding gets 0
        positions = jnp.where(prompt_mask == 0, 0, jnp.cumsum(prompt_mask, axis=-1) - 1)  # [B, P]
        out = backbone(
            input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, cache=cache
        )
        logits = self.decode_logits(out.last_hidden_state[:, -1], backbone)  # the last only
        return DecodingState(cache=out.cache, position=positions[:, -1]), logits

    def step(self, backbone, state: DecodingState, tokens):
        """The decoding protocol: one token per row (tokens [R]) at the next position ->
        (state, logits [R, V])."""
        position = state.position + 1
        out = backbone(
            input_ids=tokens[:, None],  # [R, 1]
            attention_mask=jnp.ones((tokens.shape[0], 1), jnp.int32),
            position_ids=position[:, None],
            cache=state.cache,
        )
        logits = self.decode_logits(out.last_hidden_state[:, 0], backbone)
        return state.replace(cache=out.cache, position=position), logits

    def __call__(self, features, *, backbone, inputs, labels=None):
        logits = self.logits(features.last_hidden_state, backbone)  # [B, T, V]
        loss = None if labels is None else losses.causal_lm_loss(logits, labels)
        return outputs.CausalLMOutputWithPast(
            logits=logits,
            loss=loss,
            cache=getattr(features, "cache", None),
            hidden_states=features.hidden_states,
            attentions=features.attentions,
        )
