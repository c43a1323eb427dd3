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
            new_tokens = self._until_finished(new_tokens)
            if answer == "tensors":
                ids = np.concatenate([output["input_ids"], new_tokens]).tolist()
                records.append({"generated_token_ids": ids})
                continue
            text = self.tokenizer.decode(new_tokens, **decode)
            records.append(
                {"generated_text": output["_prompt"] + text if answer == "full" else text}
            )
        return records

    def _until_finished(self, tokens: np.ndarray) -> np.ndarray:
        """A row that finished before the batch did is filled with padding after its eos;
        alone (as transformers' pipeline runs it) it would have stopped at the eos."""
        eos = self.model.generation_config.eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos or ())
        for index, token in enumerate(tokens):
            if int(token) in eos:
                return tokens[: index + 1]
        return tokens
