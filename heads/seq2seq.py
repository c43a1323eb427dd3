"""The encoder-decoder LM head (BART, T5, Whisper, ...): decoder inputs from labels, logits,
loss, and the decoding protocol (flaxauto.decoding) for encoder-decoders.

A backbone it serves offers (see models/bart.py):
    encode(*, <encoder inputs>, output_hidden_states, output_attentions) -> BaseModelOutput
    decode(*, decoder_input_ids, encoder_hidden_states, encoder_attention_mask,
           decoder_attention_mask, decoder_position_ids, cache, ...) -> the decoder's output
           (last_hidden_state, cache: an EncoderDecoderCache, ...)
    __call__(...) -> Seq2SeqModelOutput
    get_input_embeddings(), and get_decoder_input_embeddings() where the decoder reads another
    table (a tied lm_head multiplies by the decoder's table)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxauto import layers, outputs
from flaxauto.decoding import DecodingHead, DecodingState
from flaxauto.heads import losses
from flaxauto.heads.base import Head
from flaxauto.heads.classification import QuestionAnsweringHead, SequenceClassificationHead
from flaxauto.heads.language_modeling import tied_step_logits

Array = jax.Array


def shift_tokens_right(
    labels, pad_token_id: int | None, decoder_start_token_id: int | None, *, wrap_last=False
):
    """labels [B, T] -> decoder_input_ids [B, T]: the start token, then labels[:, :-1], with
    ignored positions (-100) as padding, as transformers' shift_tokens_right / T5's
    _shift_right. wrap_last (mBART, which has no single start token): each row starts with its
    own last non-pad token (the language id) instead."""
    if pad_token_id is None:
        raise ValueError("self.model.config.pad_token_id has to be defined.")
    labels = jnp.asarray(labels)
    if wrap_last:
        labels = jnp.where(labels == losses.IGNORE_INDEX, pad_token_id, labels)
        last = jnp.sum(labels != pad_token_id, axis=1) - 1  # [B]; -1 (the end) for no token
        start = jnp.take_along_axis(labels, (last % labels.shape[1])[:, None], axis=1)  # [B, 1]
    else:
        if decoder_start_token_id is None:
            raise ValueError("self.model.config.decoder_start_token_id has to be defined.")
        start = jnp.full((labels.shape[0], 1), decoder_start_token_id, labels.dtype)
    shifted = jnp.concatenate([start, labels[:, :-1]], axis=1)
    return jnp.where(shifted == losses.IGNORE_INDEX, pad_token_id, shifted)


def encoder_output(value) -> outputs.BaseModelOutput:
    """`encoder_outputs=` as transformers takes it: a BaseModelOutput, or a tuple / list of
    (last_hidden_state, hidden_states, attentions), the first required."""
    if isinstance(value, outputs.BaseModelOutput):
        return value
    if isinstance(value, list | tuple) and value:
        fields = ("last_hidden_state", "hidden_states", "attentions")
        return outputs.BaseModelOutput(**dict(zip(fields, value, strict=False)))
    raise TypeError(
        "encoder_outputs must be the BaseModelOutput of model.encode(...) (or a tuple whose "
        f"first entry is the encoder's last hidden state), not {type(value).__name__}"
    )


def seq2seq_fields(features) -> dict:
    """The encoder and decoder fields of a Seq2SeqModelOutput, for a task output to carry."""
    names = (
        "cache", "decoder_hidden_states", "decoder_attentions", "cross_attentions",
        "encoder_last_hidden_state", "encoder_hidden_states", "encoder_attentions",
    )  # fmt: skip
    return {name: getattr(features, name) for name in names}


def decoder_start_ids(generation_config, batch_size: int) -> np.ndarray:
    """[B, 1]: generation_config.decoder_start_token_id (else bos_token_id, as transformers),
    one for all rows or one per row."""
    start = generation_config.decoder_start_token_id
    if start is None:
        start = generation_config.bos_token_id
    if start is None:
        raise ValueError(
            "`decoder_start_token_id` or `bos_token_id` has to be defined for encoder-decoder "
            "generation."
        )
    start = np.asarray(start, np.int32)
    if start.ndim == 1:
        if start.shape[0] != batch_size:
            raise ValueError(
                f"`decoder_start_token_id` expected to have length {batch_size} but got "
                f"{start.shape[0]}"
            )
        return start[:, None]
    return np.full((batch_size, 1), start, np.int32)


class Seq2SeqLMHead(Head, DecodingHead):
    """decoder hidden [B, T, E] -> logits [B, T, V]: the lm_head (tied to the decoder's token
    table unless tie_word_embeddings is False), plus BART's final_logits_bias buffer.

    final_logits_bias: the family saves a [1, V] bias buffer (BART, mBART, Marian, Pegasus).
    scale_tied_output: multiply the hidden states by d_model ** -0.5 before a tied lm_head
        (T5, whose embeddings are not scaled on the way in).
    vocab_attribute: the config attribute giving the output vocabulary (Marian:
        "decoder_vocab_size").
    wrap_last_token: labels shift right behind each row's last non-pad token (mBART), not
        behind decoder_start_token_id.
    tie_attribute: the config attribute saying whether the lm_head is tied (T5 and UMT5:
        "scale_decoder_outputs", the trace their configs keep of the checkpoint's
        tie_word_embeddings while forcing that attribute itself to True).
    untie_if_differs: (the head's PyTorch name, the table's), ("lm_head.weight",
        "shared.weight") for mT5: a checkpoint carrying the first with values apart from the
        second makes from_pretrained build this head untied (tied=False) and load it, as
        transformers 5 does (see flaxauto.modeling._carried_head).
    tied: overrides tie_attribute (from_pretrained passes it; see untie_if_differs).

    labels [B, T] become decoder_input_ids by shifting right behind decoder_start_token_id
    when none are given; the loss is the mean cross-entropy over labels != -100.
    """

    def __init__(
        self,
        config,
        precision,
        rngs,
        *,
        final_logits_bias: bool = False,
        scale_tied_output: bool = False,
        vocab_attribute: str = "vocab_size",
        wrap_last_token: bool = False,
        tie_attribute: str = "tie_word_embeddings",
        untie_if_differs: tuple[str, str] | None = None,
        tied: bool | None = None,
    ):
        vocab = getattr(config, vocab_attribute)
        self.tied = bool(getattr(config, tie_attribute, True)) if tied is None else tied
        if self.tied:
            self.lm_head = nnx.data(None)
            self.tied_names = ("lm_head.weight",)
        else:
            self.lm_head = layers.linear(
                config.d_model, vocab, ("embed", "vocab"), precision, rngs, use_bias=False
            )
        self.final_logits_bias = (
            layers.buffer((1, vocab), (None, "vocab"), precision.param_dtype)
            if final_logits_bias
            else nnx.data(None)
        )
        self.output_scale = config.d_model**-0.5 if scale_tied_output and self.tied else None
        self.pad_token_id = config.pad_token_id
        self.decoder_start_token_id = config.decoder_start_token_id
        self.wrap_last_token = wrap_last_token

    # -- the forward ---------------------------------------------------------------------------

    def prepare_inputs(self, inputs: dict, labels: dict) -> dict:
        """Decoder inputs from the labels when the caller gave none (transformers' rule)."""
        given = inputs.get("decoder_input_ids") is not None
        given = given or inputs.get("decoder_inputs_embeds") is not None
        if labels.get("labels") is None or given:
            return inputs
        decoder_input_ids = shift_tokens_right(
            labels["labels"], self.pad_token_id, self.decoder_start_token_id,
            wrap_last=self.wrap_last_token,
        )  # fmt: skip
        return inputs | {"decoder_input_ids": decoder_input_ids}

    def logits(self, hidden, backbone) -> Array:
        """[..., E] -> [..., V]."""
        if self.output_scale is not None:
            hidden = hidden * jnp.asarray(self.output_scale, hidden.dtype)
        if not self.tied:
            logits = self.lm_head(hidden)
        elif hidden.ndim == 2:  # a decoding step's rows [B, E]
            logits = tied_step_logits(_decoder_table(backbone), hidden)
        else:
            logits = _decoder_table(backbone).attend(hidden)
        if self.final_logits_bias is not None:
            bias = self.final_logits_bias[...].astype(logits.dtype)  # [1, V]
            logits = logits + bias.reshape((1,) * (logits.ndim - 1) + bias.shape[-1:])
        return logits

    def __call__(self, features, *, backbone, inputs, labels=None):
        logits = self.logits(features.last_hidden_state, backbone)  # [B, T, V]
        loss = None
        if labels is not None:
            loss = losses.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), jnp.reshape(labels, -1)
            )
        return outputs.Seq2SeqLMOutput(loss=loss, logits=logits, **seq2seq_fields(features))

    # -- the decoding protocol (flaxauto.decoding) ----------------------------------------------

    def decoder_prompt(self, generation_config, batch_size: int, decoder_input_ids=None):
        """The decoder's prompt [B, P] for generate: decoder_start_token_id, or the caller's
        decoder_input_ids with the start token put in front when no row begins with it (as
        transformers). A family with its own prompt (Whisper's language and task tokens)
        overrides this."""
        start = decoder_start_ids(generation_config, batch_size)
        if decoder_input_ids is None:
            return start
        ids = np.asarray(decoder_input_ids, np.int32)
        if ids.ndim != 2 or ids.shape[0] != batch_size:
            raise ValueError(
                f"decoder_input_ids must be [batch={batch_size}, length], got {ids.shape}"
            )
        if (ids[:, 0] != start[:, 0]).all():
            ids = np.concatenate([start, ids], axis=1)
        return ids

    def start(self, backbone, prompt_ids, prompt_mask, *, cache, **encoder_inputs):
        """Run the encoder once on encoder_inputs (transformers' names), fill the cache's cross
        part from its output and run the decoder over the decoder prompt [B, P] (left-padded to
        a bucket: mask 0 there) -> (state, logits of the token after the prompt [B, V]).

        The encoder's attention mask rides in the cache's cross part, so reorder (beam
        search) moves it with the beams."""
        encoded = backbone.encode(**encoder_inputs)
        prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
        # transformers numbers the decoder prompt's tokens from 0; bucket padding in front of it
        # takes position 0 too, and is never attended
        positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0)  # [B, P]
        out = backbone.decode(
            decoder_input_ids=prompt_ids,
            decoder_attention_mask=prompt_mask,
            decoder_position_ids=positions,
            encoder_hidden_states=encoded.last_hidden_state,
            encoder_attention_mask=encoder_inputs.get("attention_mask"),
            cache=cache,
        )
        logits = self.logits(out.last_hidden_state[:, -1], backbone)  # [B, V]
        return DecodingState(cache=out.cache, position=positions[:, -1]), logits

    def step(self, backbone, state: DecodingState, tokens):
        """One token per row (tokens [R]) through the decoder alone -> (state, logits [R, V])."""
        position = state.position + 1
        out = backbone.decode(
            decoder_input_ids=tokens[:, None],  # [R, 1]
            decoder_attention_mask=jnp.ones((tokens.shape[0], 1), jnp.int32),
            decoder_position_ids=position[:, None],
            cache=state.cache,
        )
        logits = self.logits(out.last_hidden_state[:, 0], backbone)
        return state.replace(cache=out.cache, position=position), logits


def _decoder_table(backbone) -> nnx.Embed:
    table = getattr(backbone, "get_decoder_input_embeddings", None)
    return table() if table is not None else backbone.get_input_embeddings()


class Seq2SeqSequenceClassificationHead(SequenceClassificationHead):
    """An encoder-decoder's sequence classifier (BART's: the decoder's output at each row's last
    eos token of input_ids, then dropout -> dense -> tanh -> dropout -> out_proj)."""

    def __call__(self, features, *, backbone, inputs, labels=None):
        logits = self.classifier(features, inputs.get("attention_mask"), inputs.get("input_ids"))
        loss = None
        if labels is not None:
            loss = losses.sequence_classification_loss(logits, labels, self.problem_type)
        return outputs.Seq2SeqSequenceClassifierOutput(
            loss=loss, logits=logits, **seq2seq_fields(features)
        )


class Seq2SeqQuestionAnsweringHead(QuestionAnsweringHead):
    """Start and end logits over the decoder's positions (BART's qa_outputs)."""

    def __call__(self, features, *, backbone, inputs, start_positions=None, end_positions=None):
        span = super().__call__(
            outputs.BaseModelOutput(last_hidden_state=features.last_hidden_state),
            backbone=backbone, inputs=inputs,
            start_positions=start_positions, end_positions=end_positions,
        )  # fmt: skip
        return outputs.Seq2SeqQuestionAnsweringModelOutput(
            loss=span.loss, start_logits=span.start_logits, end_logits=span.end_logits,
            **seq2seq_fields(features),
        )  # fmt: skip
