"""text-generation: prompts continued by the model's compiled `generate`, answered as
transformers' pipeline answers them."""

from __future__ import annotations

import numpy as np
from transformers import GenerationConfig

from flaxauto.pipelines.base import Pipeline

#: what transformers' text-generation pipeline sets when neither the call nor the checkpoint's
#: generation config does (the sampling settings only when sampling)
PIPELINE_DEFAULTS = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}
SAMPLING_SETTINGS = {"temperature", "top_k", "top_p", "min_p", "typical_p"}
GENERATION_SETTINGS = {k for k in vars(GenerationConfig()) if not k.startswith("_")}


class TextGenerationPipeline(Pipeline):
    """Continues each prompt: `[{"generated_text": prompt + continuation}]` per prompt (one
    dict per returned sequence), or the continuation alone with return_full_text=False, or
    the token ids with return_tensors=True. Generation settings (max_new_tokens, do_sample,
    num_beams, ...) go to flaxauto's generate; `key` seeds sampling. A batch of prompts is
    left-padded and generated together."""

    task = "causal-lm"

    def check_params(
        self,
        return_full_text=None,
        return_tensors=None,
        return_text=None,
        clean_up_tokenization_spaces=None,
        prefix="",
        skip_special_tokens=True,
        add_special_tokens=None,
        key=None,
        **generate_kwargs,
    ):
        unknown = sorted(set(generate_kwargs) - GENERATION_SETTINGS)
        if unknown:
            raise TypeError(f"text-generation got unexpected parameters {unknown}")
        if return_full_text is not None and (return_text is not None or return_tensors):
            raise ValueError("return_full_text excludes return_text and return_tensors")
        if return_tensors:
            answer = "tensors"
        else:
            answer = "full" if return_full_text in (None, True) else "new"
        return {
            "answer": answer,
            "decode": {
                "skip_special_tokens": skip_special_tokens,
                "clean_up_tokenization_spaces": clean_up_tokenization_spaces,
            },
            "prefix": prefix,
            # transformers' tokenizer default (True) unless given
            "tokenizer_kwargs": {}
            if add_special_tokens is None
            else {"add_special_tokens": add_special_tokens},
            "key": key,
            "generate_kwargs": self._with_defaults(generate_kwargs, prefix),
        }

    def _with_defaults(self, generate_kwargs: dict, prefix: str) -> dict:
        """transformers' pipeline defaults for what neither the call nor the checkpoint set."""
        set_by_model = self.model.generation_config.to_diff_dict()
        given = set_by_model | generate_kwargs
        added = {
            k: v
            for k, v in PIPELINE_DEFAULTS.items()
            if k not in given and not (k == "max_new_tokens" and "max_length" in given)
        }
        if not (given | added).get("do_sample"):
            added = {k: v for k, v in added.items() if k not in SAMPLING_SETTINGS}
        if self.tokenizer.pad_token_id is not None and "pad_token_id" not in given:
            added["pad_token_id"] = self.tokenizer.pad_token_id
        kwargs = generate_kwargs | added
        if prefix and "max_length" in kwargs and "max_new_tokens" not in kwargs:
            # a total length counts the prefix too
            kwargs["max_length"] += len(self.tokenizer(prefix, add_special_tokens=False).input_ids)
        return kwargs

    def is_single(self, inputs) -> bool:
        if isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], dict):
            raise NotImplementedError("chat inputs (lists of messages) are not implemented")
        return isinstance(inputs, str)

    def preprocess(self, item, prefix="", tokenizer_kwargs=None, **params):
        encoded = self.tokenizer(prefix + item, return_tensors="np", **(tokenizer_kwargs or {}))
        return [{"input_ids": encoded["input_ids"][0], "_prompt": item}]

    def run_model(self, examples, generate_kwargs, key=None, **params):
        """One left-padded batch of prompts through generate -> each prompt's new tokens
        [num_return_sequences, N] and its prompt ids. A total max_length or min_length counts
        each prompt's own tokens: those prompts run one at a time."""
        if len(examples) > 1 and (
            "max_new_tokens" not in generate_kwargs or "min_length" in generate_kwargs
        ):
            return [
                output
                for example in examples
                for output in self.run_model([example], generate_kwargs, key, **params)
            ]
        width = max(len(e["input_ids"]) for e in examples)
        pad = self.pad_token_id()
        ids = np.full((len(examples), width), pad, np.int32)
        mask = np.zeros((len(examples), width), np.int32)
        for row, example in enumerate(examples):
            length = len(example["input_ids"])
            ids[row, width - length :], mask[row, width - length :] = example["input_ids"], 1
        sequences = np.asarray(
            self.model.generate(ids, mask, key=key, **generate_kwargs)
        )  # [B * num_return_sequences, width + N]
        per_prompt = sequences.reshape(len(examples), -1, sequences.shape[-1])
        return [
            {"new_tokens": rows[:, width:]} | example
            for rows, example in zip(per_prompt, examples, strict=True)
        ]

    def postprocess(self, item, outputs, answer, decode, **params):
        output = outputs[0]
        records = []
        for new_tokens in output["new_tokens"]:
            new_tokens = _until_finished(self.model, new_tokens)
            if answer == "tensors":
                ids = np.concatenate([output["input_ids"], new_tokens]).tolist()
                records.append({"generated_token_ids": ids})
                continue
            text = self.tokenizer.decode(new_tokens, **decode)
            records.append(
                {"generated_text": output["_prompt"] + text if answer == "full" else text}
            )
        return records


def _until_finished(model, tokens: np.ndarray, first: int = 0) -> np.ndarray:
    """A row that finished before the batch did is filled with padding after its eos; alone (as
    transformers' pipeline runs it) it would have stopped at the eos. The search starts at
    `first` (1 past an encoder-decoder's start token, which may be the eos)."""
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    for index in range(first, len(tokens)):
        if int(tokens[index]) in eos:
            return tokens[: index + 1]
    return tokens


class Text2TextGenerationPipeline(Pipeline):
    """text2text-generation, summarization and translation, which transformers 5 removed:
    kept with transformers 4.x's behaviour. Each text (with the model's `prefix`, and the
    settings of its config's `task_specific_params` for the task, as T5 and BART checkpoints
    carry them) goes through the encoder-decoder's compiled generate: `[{"<name>_text": ...}]`
    per returned sequence, or `"<name>_token_ids"` with return_tensors=True. A batch of texts is
    padded (encoder side) and generated together."""

    task = "seq2seq-lm"
    return_name = "generated"
    #: the task_specific_params entry this pipeline reads (translation: translation_xx_to_yy)
    task_name = "text2text-generation"

    def __init__(self, model, processor=None, *, task_name=None, **options):
        self.task_name = task_name or self.task_name
        specific = dict((getattr(model.config, "task_specific_params", None) or {}).get(
            self.task_name, {}
        ))  # fmt: skip
        self.prefix = specific.pop("prefix", getattr(model.config, "prefix", None)) or ""
        # transformers 4 applied these to the pipeline's copy of the generation config
        self.generation_defaults = specific
        super().__init__(model, processor, **options)

    def check_params(
        self,
        return_tensors=None,
        return_text=None,
        clean_up_tokenization_spaces=False,
        truncation=None,
        stop_sequence=None,
        key=None,
        src_lang=None,
        tgt_lang=None,
        **generate_kwargs,
    ):
        unknown = sorted(set(generate_kwargs) - GENERATION_SETTINGS)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected parameters {unknown}")
        if stop_sequence is not None:
            ids = self.tokenizer.encode(stop_sequence, add_special_tokens=False)
            generate_kwargs["eos_token_id"] = ids[0]  # transformers 4: the first token only
        return {
            "tensors": bool(return_tensors),
            "clean_up_tokenization_spaces": clean_up_tokenization_spaces,
            "truncation": truncation,
            "key": key,
            "languages": self.languages(src_lang, tgt_lang),
            "generate_kwargs": self.generation_defaults | generate_kwargs,
        }

    def languages(self, src_lang, tgt_lang) -> dict:
        return {}

    def __call__(self, inputs, **params):
        answers = super().__call__(inputs, **params)
        # transformers 4 answers a list of texts with one record each as a flat list
        texts = isinstance(inputs, list) and all(isinstance(x, str) for x in inputs)
        if texts and all(len(answer) == 1 for answer in answers):
            return [answer[0] for answer in answers]
        return answers

    def is_single(self, inputs) -> bool:
        return isinstance(inputs, str)

    def preprocess(self, item, truncation=None, languages=None, **params):
        if not isinstance(item, str):
            raise ValueError(f"{item!r}: the inputs are texts (str), or lists of texts")
        options = {"truncation": truncation or False}
        encoded = self.encode(self.prefix + item, options, languages or {})
        return [{k: v[0] for k, v in encoded.items() if k in ("input_ids", "attention_mask")}]

    def encode(self, text: str, options: dict, languages: dict) -> dict:
        return self.tokenizer(text, return_tensors="np", **options)

    def run_model(self, examples, generate_kwargs, key=None, **params):
        width = max(len(e["input_ids"]) for e in examples)
        ids = np.full((len(examples), width), self.pad_token_id(), np.int32)
        mask = np.zeros((len(examples), width), np.int32)
        for row, example in enumerate(examples):
            length = len(example["input_ids"])
            ids[row, :length] = example["input_ids"]
            mask[row, :length] = example.get("attention_mask", np.ones(length, np.int32))
        sequences = np.asarray(self.model.generate(ids, mask, key=key, **generate_kwargs))
        per_text = sequences.reshape(len(examples), -1, sequences.shape[-1])
        return [{"output_ids": rows} for rows in per_text]

    def postprocess(self, item, outputs, tensors, clean_up_tokenization_spaces, **params):
        records = []
        for ids in outputs[0]["output_ids"]:
            ids = _until_finished(self.model, ids, first=1)
            if tensors:
                records.append({f"{self.return_name}_token_ids": ids.tolist()})
            else:
                text = self.tokenizer.decode(
                    ids,
                    skip_special_tokens=True,
                    clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                )
                records.append({f"{self.return_name}_text": text})
        return records


class SummarizationPipeline(Text2TextGenerationPipeline):
    """summarization: `[{"summary_text": ...}]`."""

    return_name = "summary"
    task_name = "summarization"


class TranslationPipeline(Text2TextGenerationPipeline):
    """translation (or translation_xx_to_yy, which names the languages): `[{"translation_text":
    ...}]`; multilingual tokenizers (mBART, M2M, NLLB) get `src_lang` / `tgt_lang`."""

    return_name = "translation"
    task_name = "translation"

    def languages(self, src_lang, tgt_lang) -> dict:
        parts = self.task_name.split("_")
        if src_lang is None and tgt_lang is None and len(parts) == 4:  # translation_xx_to_yy
            src_lang, tgt_lang = parts[1], parts[3]
        return {k: v for k, v in (("src_lang", src_lang), ("tgt_lang", tgt_lang)) if v}

    def encode(self, text: str, options: dict, languages: dict) -> dict:
        build = getattr(self.tokenizer, "_build_translation_inputs", None)
        if build is None:
            return super().encode(text, options, languages)
        return build(
            text, return_tensors="np", truncation=options["truncation"],
            src_lang=languages.get("src_lang"), tgt_lang=languages.get("tgt_lang"),
        )  # fmt: skip
