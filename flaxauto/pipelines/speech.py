"""automatic-speech-recognition: CTC models (wav2vec2, HuBERT) decoded greedily through their
tokenizer, and Whisper through its compiled generate, answered as transformers' pipeline answers
({"text": ...}). Chunking long audio, timestamps, language detection and resampling are refused
naming them."""

from __future__ import annotations

import numpy as np
from transformers import GenerationConfig

from flaxauto.pipelines.base import Pipeline
from flaxauto.pipelines.media import _waveform

#: what transformers' speech-recognition pipeline sets for Whisper when neither the call nor
#: the checkpoint's generation config does (openai's decoding uses 5 beams)
WHISPER_DEFAULTS = {"max_new_tokens": 256, "num_beams": 5}
SAMPLING_SETTINGS = {"temperature", "top_k", "top_p", "min_p", "typical_p"}
#: generate keywords: transformers' generation settings and Whisper's own
GENERATION_SETTINGS = {k for k in vars(GenerationConfig()) if not k.startswith("_")} | {
    "language",
    "task",
    "is_multilingual",
}


class AutomaticSpeechRecognitionPipeline(Pipeline):
    """A waveform (a 1-D numpy array at the feature extractor's sampling rate, or {"raw" or
    "array": ..., "sampling_rate": ...}) -> {"text": ...}. CTC: each frame's most likely token,
    decoded by the tokenizer (repeats merged, blanks dropped); waveforms are padded to bucketed
    lengths when the feature extractor returns an attention mask, else run one at a time.
    Whisper: generate (pipeline defaults max_new_tokens=256, num_beams=5 unless the call or
    the checkpoint's generation config says otherwise; `generate_kwargs` or the settings
    themselves as keywords, `key` to seed sampling), up to 30 s of audio."""

    task = "ctc"
    #: the registry tasks that serve speech recognition, by model type
    tasks = ("ctc", "speech-seq2seq")
    processor_kind = "feature_extractor"
    #: the tokenizer decodes the tokens (pipeline() loads it from the checkpoint too)
    extra_processors = ("tokenizer",)

    def __init__(self, model, processor=None, *, tokenizer=None, **options):
        if tokenizer is None:
            raise ValueError("automatic-speech-recognition needs tokenizer= to decode the tokens")
        self.text_tokenizer = tokenizer
        self.whisper = model.config.model_type == "whisper"
        if model.task == "speech-seq2seq" and not self.whisper:
            raise NotImplementedError(f"speech recognition with {model.config.model_type!r}")
        super().__init__(model, processor, **options)
        # CTC waveforms are padded (and masked) only for extractors that return an attention
        # mask; other models see padding as signal (group norm over time)
        masked = getattr(processor, "return_attention_mask", False)
        self.padded_inputs = (
            {"input_values": 0.0, "attention_mask": 0} if masked and not self.whisper else {}
        )

    @property
    def tokenizer(self):
        return self.text_tokenizer

    def check_params(
        self,
        chunk_length_s=None,
        stride_length_s=None,
        return_timestamps=None,
        return_language=None,
        decoder_kwargs=None,
        ignore_warning=None,
        key=None,
        generate_kwargs=None,
        **settings,
    ):
        refused = {
            "chunk_length_s": chunk_length_s,
            "stride_length_s": stride_length_s,
            "return_timestamps": return_timestamps
            or getattr(self.model.generation_config, "return_timestamps", None),
            "return_language": return_language,
            "decoder_kwargs": decoder_kwargs,  # a language model's beam search (pyctcdecode)
        }
        for name, value in refused.items():
            if value:
                raise NotImplementedError(
                    f"automatic-speech-recognition with {name}={value!r} is not implemented"
                )
        settings = dict(generate_kwargs or {}) | settings
        unknown = sorted(set(settings) - GENERATION_SETTINGS)
        if unknown:
            raise TypeError(f"automatic-speech-recognition got unexpected parameters {unknown}")
        if not self.whisper:
            if settings or key is not None:
                raise ValueError(
                    f"generation settings {sorted(settings)} apply to Whisper; a CTC model "
                    "decodes each frame's most likely token"
                )
            return {}
        if settings.get("num_return_sequences", 1) != 1:
            raise NotImplementedError("automatic-speech-recognition with num_return_sequences")
        return {"generate_kwargs": self._with_defaults(settings), "key": key}

    def _with_defaults(self, settings: dict) -> dict:
        """transformers' pipeline defaults for what neither the call nor the checkpoint set."""
        given = self.model.generation_config.to_diff_dict() | settings
        added = {
            k: v
            for k, v in WHISPER_DEFAULTS.items()
            if k not in given and not (k == "max_new_tokens" and "max_length" in given)
        }
        if not (given | added).get("do_sample"):
            added = {k: v for k, v in added.items() if k not in SAMPLING_SETTINGS}
        if self.tokenizer.pad_token_id is not None and "pad_token_id" not in given:
            added["pad_token_id"] = self.tokenizer.pad_token_id
        return settings | added

    def is_single(self, inputs) -> bool:
        return isinstance(inputs, (np.ndarray, dict, str, bytes))

    def preprocess(self, item, **params):
        if isinstance(item, dict) and "stride" in item:
            raise NotImplementedError("an audio dict's 'stride' (chunked decoding)")
        extractor = self.processor
        waveform = _waveform(item, extractor.sampling_rate)
        if self.whisper:
            if len(waveform) > extractor.n_samples:
                raise NotImplementedError(
                    f"long-form transcription: the audio is longer than the model's "
                    f"{extractor.chunk_length} s window"
                )
            features = extractor(
                waveform, sampling_rate=extractor.sampling_rate, return_tensors="np"
            )
            return [{"input_features": features["input_features"][0]}]
        features = extractor(
            waveform,
            sampling_rate=extractor.sampling_rate,
            return_attention_mask=True,  # as transformers' pipeline asks for it
            return_tensors="np",
        )
        return [
            {"input_values": features["input_values"][0], "_samples": len(waveform)}
            | {"attention_mask": features["attention_mask"][0]}
        ]

    def run_model(self, examples, generate_kwargs=None, key=None, **params):
        if self.whisper:
            return self._generate(examples, generate_kwargs, key)
        if self.padded_inputs:
            return super().run_model(examples)
        return [self._run_batch([example])[0] for example in examples]

    def _generate(self, examples, generate_kwargs, key) -> list[dict]:
        """Whisper's features all have one shape (the 30 s window): a batch is padded with
        copies of its first row to batch_size, so every batch reuses one compiled program."""
        features = [e["input_features"] for e in examples]
        features += [features[0]] * (self.batch_size - len(features))
        generate_kwargs, prompt = self._whisper_lengths(generate_kwargs, len(features))
        sequences = self.model.generate(
            None, input_features=np.stack(features), key=key, **generate_kwargs
        )  # [batch_size, prompt + new]
        # transformers' Whisper returns the continuation alone; flaxauto's the prompt too
        return [{"tokens": np.asarray(row[prompt:])} for row in sequences[: len(examples)]]

    def _whisper_lengths(self, generate_kwargs: dict, batch: int) -> tuple[dict, int]:
        """transformers' Whisper counts a max_length without max_new_tokens from after its
        decoder prompt (up to max_target_positions // 2 - 1 prompt tokens), and cuts
        max_new_tokens to what the position table leaves; flaxauto's generate counts the
        prompt in max_length as for every encoder-decoder, so the lengths are given to it
        that way. Returns the settings and the prompt's length."""
        from flaxauto.generation.settings import resolve_generation_config

        options = set(getattr(self.model.head, "generation_options", ()))
        settings = {k: v for k, v in generate_kwargs.items() if k not in options}
        config, _ = resolve_generation_config(self.model, None, **settings)
        for name in options & set(generate_kwargs):  # language= and task= shape the prompt
            setattr(config, name, generate_kwargs[name])
        prompt = np.asarray(self.model.decoder_prompt(config, batch)).shape[1]
        limit = self.config.max_target_positions
        if config.max_new_tokens is None and config.max_length is not None:
            initial = min(limit // 2 - 1, prompt)
            lengths = {"max_length": min(config.max_length + initial, limit)}
        elif config.max_new_tokens is not None and config.max_new_tokens + prompt > limit:
            lengths = {"max_new_tokens": limit - prompt}
        else:
            lengths = {}
        return generate_kwargs | lengths, prompt

    def postprocess(self, item, outputs, **params):
        output = outputs[0]
        if self.whisper:
            return {"text": self._whisper_text(output["tokens"])}
        frames = int(self.model.backbone.frame_lengths(output["_samples"]))
        tokens = np.asarray(output["logits"])[:frames].argmax(-1)  # [T] best token per frame
        # transformers keeps special tokens for CTC: the tokenizer's decode drops the blank
        return {"text": self.tokenizer.decode(tokens, skip_special_tokens=False)}

    def _whisper_text(self, tokens: np.ndarray) -> str:
        """The text of Whisper's new tokens as transformers' pipeline decodes them. A row that
        finished before the rest of its batch is cut at its first eos (alone, as transformers
        runs it, it would have stopped there)."""
        eos = self.model.generation_config.eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos or ())
        ends = [i for i, token in enumerate(tokens) if int(token) in eos]
        tokens = tokens[: ends[0] + 1] if ends else tokens
        text, _ = self.tokenizer._decode_asr(
            [{"tokens": tokens[None]}],
            return_timestamps=None,
            return_language=None,
            time_precision=self.processor.chunk_length / self.config.max_source_positions,
        )
        return text
