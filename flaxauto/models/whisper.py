"""Whisper (transformers' WhisperModel): a convolutional stem over log-mel features and a
pre-norm encoder-decoder built from BART's layers (models/bart.py) with Whisper's adapters:
no bias on the key projections, sinusoidal encoder positions, learned decoder positions from 0,
a final LayerNorm after each stack, and the output projection `proj_out` tied to the decoder's
token table.

Attribute paths are transformers' (`encoder.conv1`, `encoder.embed_positions`,
`decoder.embed_tokens`, `decoder.layers.0.encoder_attn.k_proj`, ...). The task heads:
AutoModelForSpeechSeq2Seq (WhisperForConditionalGeneration, base model prefix `model`) through
the shared encoder-decoder head, and AutoModelForAudioClassification
(WhisperForAudioClassification: the encoder alone, at the top of the checkpoint's names).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxauto import layers, stacks
from flaxauto.heads.audio import AudioClassificationHead
from flaxauto.heads.seq2seq import Seq2SeqLMHead, encoder_output
from flaxauto.models.bart import (
    BartAttention,
    BartDecoder,
    BartDecoderLayer,
    BartEncoderLayer,
    BartVariant,
)
from flaxauto.outputs import BaseModelOutput, Seq2SeqModelOutput
from flaxauto.registry import HeadSpec, register

Precision = layers.Precision

#: pre-norm layers, a LayerNorm after each stack, no LayerNorm on the embeddings
WHISPER = BartVariant(pre_norm=True, final_layer_norms=True, layernorm_embedding=False)
#: torch.nn.LayerNorm's default: Whisper's norms do not read the config
LAYER_NORM_EPS = 1e-5


def check_config(config) -> None:
    layers.check_heads_divide(config, "d_model", "encoder_attention_heads")
    layers.check_heads_divide(config, "d_model", "decoder_attention_heads")
    layers.activation(config.activation_function, "activation_function")
    if config.d_model % 2:
        raise ValueError(f"d_model={config.d_model} must be even for sinusoidal positions")
    if not config.is_encoder_decoder:
        raise NotImplementedError(
            "is_encoder_decoder=False (the decoder alone, WhisperForCausalLM) is not implemented"
        )


class WhisperAttention(BartAttention):
    """BART's attention with no bias on k_proj (keys shift every score of a query equally)."""

    def __init__(self, config, num_heads: int, precision: Precision, rngs: nnx.Rngs):
        super().__init__(config, num_heads, precision, rngs)
        width = config.d_model
        self.k_proj = layers.linear(
            width, width, ("embed", "heads"), precision, rngs, use_bias=False
        )


class WhisperEncoderLayer(BartEncoderLayer):
    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        super().__init__(config, WHISPER, precision, rngs)
        self.self_attn = WhisperAttention(config, config.encoder_attention_heads, precision, rngs)


class WhisperDecoderLayer(BartDecoderLayer):
    def __init__(self, config, precision: Precision, rngs: nnx.Rngs):
        super().__init__(config, WHISPER, precision, rngs)
        heads = config.decoder_attention_heads
        self.self_attn = WhisperAttention(config, heads, precision, rngs)
        self.encoder_attn = WhisperAttention(config, heads, precision, rngs)


class WhisperEncoder(nnx.Module):
    """input_features [B, mel, frames] -> conv1 (k3) -> gelu -> conv2 (k3, stride 2) -> gelu ->
    + embed_positions -> pre-norm layers -> layer_norm: [B, frames / 2, E]. The encoder takes
    exactly 2 * max_source_positions frames (30 s), as transformers requires."""

    def __init__(self, config, precision: Precision, rngs: nnx.Rngs, *, scan=False, remat=False):
        width = config.d_model
        self.max_source_positions = config.max_source_positions
        self.conv1 = layers.conv(
            config.num_mel_bins, width, 3, (None, "embed"), precision, rngs, padding=1,
            spatial_dims=1,
        )  # fmt: skip
        self.conv2 = layers.conv(
            width, width, 3, ("embed", "embed"), precision, rngs, stride=2, padding=1,
            spatial_dims=1,
        )  # fmt: skip
        self.embed_positions = layers.embedding(
            config.max_source_positions, width, (None, "embed"), precision, rngs,
            init="sinusoidal-timescales",
        )  # fmt: skip
        self.layers = stacks.layer_stack(
            lambda _, rngs: WhisperEncoderLayer(config, precision, rngs),
            config.encoder_layers, rngs, scan=scan,
        )  # fmt: skip
        self.layer_norm = layers.layer_norm(width, LAYER_NORM_EPS, precision, rngs)
        self.dropout = layers.dropout(config.dropout, rngs)
        self.layerdrop = config.encoder_layerdrop
        self.remat = remat
        self.dtype = precision.dtype

    def __call__(self, input_features, *, output_hidden_states, output_attentions):
        expected = 2 * self.max_source_positions
        if input_features.shape[-1] != expected:
            raise ValueError(
                f"Whisper expects the mel input features to be of length {expected}, but found "
                f"{input_features.shape[-1]}. Make sure to pad the input mel features to "
                f"{expected}."
            )
        if self.layerdrop > 0 and not self.dropout.deterministic:
            raise NotImplementedError(
                f"encoder_layerdrop={self.layerdrop} in training is not implemented"
            )
        x = jnp.swapaxes(jnp.asarray(input_features, self.dtype), 1, 2)  # [B, frames, mel]
        x = layers.ACTIVATIONS["gelu"](self.conv1(x))
        x = layers.ACTIVATIONS["gelu"](self.conv2(x))  # [B, S, E]
        hidden = self.dropout(x + self.embed_positions.embedding[...].astype(x.dtype)[None])
        return stacks.run_encoder(
            self.layers, hidden, lambda layer, h: layer(h, None, output_attentions),
            self.layer_norm, output_hidden_states=output_hidden_states,
            output_attentions=output_attentions, remat=self.remat,
        )  # fmt: skip


class WhisperDecoder(BartDecoder):
    """BART's decoder with Whisper's layers and a learned position table of
    max_target_positions rows read from position 0."""

    def __init__(self, config, precision, rngs, *, scan_layers=False, remat=False):
        super().__init__(config, WHISPER, precision, rngs, scan_layers=scan_layers, remat=remat)
        self.embed_tokens = layers.embedding(
            config.vocab_size, config.d_model, ("vocab", "embed"), precision, rngs
        )
        self.layers = self.layer_stack(
            lambda _, rngs: WhisperDecoderLayer(config, precision, rngs),
            config.decoder_layers, rngs, scan_layers, remat,
        )  # fmt: skip

    def _init_embeddings(self, config, variant, precision, rngs):
        width = config.d_model
        self.embed_positions = layers.embedding(
            config.max_target_positions, width, (None, "embed"), precision, rngs
        )
        self.position_offset = 0
        self.layernorm_embedding = nnx.data(None)
        self.layer_norm = layers.layer_norm(width, LAYER_NORM_EPS, precision, rngs)
        self.dropout = layers.dropout(config.dropout, rngs)


class WhisperModel(nnx.Module):
    """The Whisper backbone: `encoder` and `decoder` (encoder_only: the encoder alone, for
    WhisperForAudioClassification)."""

    supports_scan_layers = supports_remat = True

    def __init__(
        self, config, precision: Precision, rngs: nnx.Rngs, *, encoder_only: bool = False,
        scan_layers=False, remat=False,
    ):  # fmt: skip
        check_config(config)
        self.encoder = WhisperEncoder(config, precision, rngs, scan=scan_layers, remat=remat)
        if encoder_only:
            self.decoder = nnx.data(None)
        else:
            self.decoder = WhisperDecoder(
                config, precision, rngs, scan_layers=scan_layers, remat=remat
            )
        self.max_target_positions = config.max_target_positions
        self.spec_augment = bool(config.apply_spec_augment) and (
            config.mask_time_prob > 0 or config.mask_feature_prob > 0
        )

    def get_input_embeddings(self) -> nnx.Embed:
        return self.decoder.embed_tokens

    def get_decoder_input_embeddings(self) -> nnx.Embed:
        return self.decoder.embed_tokens

    def init_cache(self, batch_size: int, max_length: int, dtype=None, *, mesh=None, rules=None):
        return self.decoder.init_cache(batch_size, max_length, dtype, mesh=mesh, rules=rules)

    def encode(
        self,
        *,
        input_features=None,  # [B, mel, 2 * max_source_positions]
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutput:
        """The encoder alone."""
        if self.spec_augment and not self.encoder.dropout.deterministic:
            raise NotImplementedError(
                "training with apply_spec_augment=True (SpecAugment's random masks over the "
                "input features) is not implemented: load with apply_spec_augment=False"
            )
        return self.encoder(
            input_features,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )

    def decode(
        self,
        *,
        decoder_input_ids=None,  # [B, T]
        decoder_inputs_embeds=None,  # [B, T, E]
        encoder_hidden_states=None,  # [B, S, E]; None once the cache holds its cross part
        encoder_attention_mask=None,  # unused by Whisper (its encoder output is never padded)
        decoder_attention_mask=None,  # [B, T]
        decoder_position_ids=None,  # [B or 1, T]; default: continuing from the cache
        cache=None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ):
        """The decoder alone."""
        table = self.decoder.embed_tokens
        return self.decoder(
            table, decoder_input_ids, decoder_inputs_embeds, decoder_attention_mask,
            decoder_position_ids, cache, encoder_hidden_states, None,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        )  # fmt: skip

    def __call__(
        self,
        *,
        input_features=None,  # [B, mel, frames]
        decoder_input_ids=None,  # [B, T]
        decoder_attention_mask=None,  # [B, T]
        decoder_position_ids=None,  # [B or 1, T]
        encoder_outputs=None,  # from encode(): skips the encoder
        decoder_inputs_embeds=None,  # [B, T, E]
        cache=None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ):
        flags = dict(output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        if encoder_outputs is None:
            encoder_outputs = self.encode(input_features=input_features, **flags)
        else:
            encoder_outputs = encoder_output(encoder_outputs)
        if self.decoder is None:  # WhisperForAudioClassification
            if decoder_input_ids is not None or decoder_inputs_embeds is not None:
                raise TypeError("Whisper's audio classification runs the encoder alone")
            return encoder_outputs
        if (
            decoder_input_ids is not None
            and decoder_input_ids.shape[-1] > self.max_target_positions
        ):
            raise ValueError(
                f"decoder inputs of length {decoder_input_ids.shape[-1]} exceed the maximum "
                f"allowed length of {self.max_target_positions} tokens."
            )
        decoded = self.decode(
            decoder_input_ids=decoder_input_ids,
            decoder_inputs_embeds=decoder_inputs_embeds,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            decoder_attention_mask=decoder_attention_mask,
            decoder_position_ids=decoder_position_ids,
            cache=cache,
            **flags,
        )
        return Seq2SeqModelOutput.of(encoder_outputs, decoded)


class WhisperSeq2SeqHead(Seq2SeqLMHead):
    """WhisperForConditionalGeneration's head: the shared encoder-decoder head (proj_out tied to
    the decoder's token table) with Whisper's decoder prompt for generate, built as transformers'
    WhisperGenerationMixin builds it for one 30 s window: <|startoftranscript|>, the language
    token, the task token, <|notimestamps|>, from the generation config (generation_config.json:
    lang_to_id, task_to_id, no_timestamps_token_id, or the older forced_decoder_ids) and its
    `language` / `task` (set them on the generation config or pass them to generate).

    Not implemented, refused naming them: language detection (a multilingual model with no
    language given), timestamp decoding (return_timestamps=True) and long-form transcription
    (more than 30 s of features)."""

    #: generate() keywords that set the generation config's entries of the same names
    generation_options = ("language", "task", "is_multilingual", "return_timestamps")

    def decoder_prompt(self, generation_config, batch_size: int, decoder_input_ids=None):
        if decoder_input_ids is not None:
            return super().decoder_prompt(generation_config, batch_size, decoder_input_ids)
        if getattr(generation_config, "return_timestamps", None):
            raise NotImplementedError(
                "return_timestamps=True (timestamp decoding) is not implemented"
            )
        languages = getattr(generation_config, "language", None)
        english_only = getattr(generation_config, "is_multilingual", None) is False
        if english_only and (languages is not None or getattr(generation_config, "task", None)):
            raise ValueError(
                "Cannot specify `task` or `language` for an English-only model. If the model is "
                "intended to be multilingual, pass `is_multilingual=True` to generate, or update "
                "the generation config."
            )
        if languages is None or isinstance(languages, str):
            languages = [languages] * batch_size
        if len(languages) != batch_size:
            raise ValueError(
                f"When passing a list of languages, the length of the list must match the batch "
                f"size. Expected length of {batch_size}, but got {len(languages)} languages."
            )
        rows = [_prompt_tokens(generation_config, language) for language in languages]
        if len({len(row) for row in rows}) != 1:
            raise ValueError(f"Whisper's decoder prompts differ in length: {rows}")
        return np.asarray(rows, np.int32)

    def start(self, backbone, prompt_ids, prompt_mask, *, cache, **encoder_inputs):
        features = encoder_inputs.get("input_features")
        window = 2 * backbone.encoder.max_source_positions
        if features is not None and features.shape[-1] > window:
            raise NotImplementedError(
                f"long-form transcription (input_features of {features.shape[-1]} frames, more "
                f"than {window}: over 30 s) is not implemented; split the audio into 30 s windows"
            )
        return super().start(backbone, prompt_ids, prompt_mask, cache=cache, **encoder_inputs)


def _prompt_tokens(generation_config, language) -> list[int]:
    """One row's decoder prompt, as transformers' WhisperGenerationMixin._retrieve_init_tokens."""
    config = generation_config
    tokens = [config.decoder_start_token_id]
    task = getattr(config, "task", None)
    if task is None and language is None:
        forced = getattr(config, "forced_decoder_ids", None)
        position = 1
        for index, token in sorted(forced or ()):
            if index != position:
                break
            tokens.append(token)
            position += 1
    if language is not None:
        language_id = _language_id(config, language)
        tokens = (
            [tokens[0], language_id, *tokens[2:]] if len(tokens) > 1 else [*tokens, language_id]
        )
    elif hasattr(config, "lang_to_id") and (len(tokens) <= 1 or tokens[1] is None):
        raise NotImplementedError(
            "language detection is not implemented: pass language= (e.g. 'en') to generate or "
            "set generation_config.language"
        )
    task_ids = getattr(config, "task_to_id", {}) or {}
    if task is not None:
        if task not in ("translate", "transcribe"):
            raise ValueError(f"The `{task}` task is not supported. The task should be one of "
                             "`['translate', 'transcribe']`")  # fmt: skip
        tokens.append(task_ids[task])
    elif language is not None and task_ids and not any(t in tokens for t in task_ids.values()):
        tokens.append(task_ids["transcribe"])
    no_timestamps = getattr(config, "no_timestamps_token_id", None)
    if no_timestamps is not None and tokens[-1] != no_timestamps:
        tokens.append(no_timestamps)
    return [token for token in tokens if token is not None]


def _language_id(config, language: str) -> int:
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    language = language.lower()
    if language in config.lang_to_id:
        token = language
    elif language in TO_LANGUAGE_CODE:
        token = f"<|{TO_LANGUAGE_CODE[language]}|>"
    elif language in TO_LANGUAGE_CODE.values():
        token = f"<|{language}|>"
    else:
        raise ValueError(f"Unsupported language: {language}.")
    if token not in config.lang_to_id:
        raise ValueError(
            f"{token} is not supported by this specific model as it is not in the "
            "`generation_config.lang_to_id`. (You should just add it to the generation config)"
        )
    return config.lang_to_id[token]


#: What Whisper reads from the config (flaxauto.config_checks refuses the rest).
CONFIG_ATTRIBUTES = (
    "vocab_size", "num_mel_bins", "d_model", "encoder_layers", "decoder_layers",
    "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim",
    "activation_function", "dropout", "attention_dropout", "activation_dropout",
    "encoder_layerdrop", "decoder_layerdrop", "max_source_positions", "max_target_positions",
    "pad_token_id", "decoder_start_token_id", "tie_word_embeddings", "is_encoder_decoder",
    "use_weighted_layer_sum", "classifier_proj_size", "num_hidden_layers", "init_std",
    # transformers 5 computes an embed_scale from it and never applies it
    "scale_embedding",
    # generation defaults (generate reads them through the generation config)
    "suppress_tokens", "begin_suppress_tokens", "max_length", "forced_decoder_ids",
    # SpecAugment for fine-tuning (WhisperModel._mask_input_features): training only, refused
    # there; the median filter of word timestamps (not implemented)
    "apply_spec_augment", "mask_time_prob", "mask_time_length", "mask_time_min_masks",
    "mask_feature_prob", "mask_feature_length", "mask_feature_min_masks", "median_filter_width",
    "use_cache",
)  # fmt: skip

register(
    model_types=("whisper",),
    backbone=WhisperModel,
    base_model_prefix="model",
    main_input_name="input_features",
    config_attributes=CONFIG_ATTRIBUTES,
    heads={
        "base": HeadSpec(None),
        "speech-seq2seq": HeadSpec(WhisperSeq2SeqHead, names={"lm_head": "proj_out"}),
        "audio-classification": HeadSpec(
            AudioClassificationHead,
            options={"mask_frames": False},
            backbone_options={"encoder_only": True},
            base_model_prefix="",
        ),
    },
)
