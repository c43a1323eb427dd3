"""What every pipeline shares: batching, bucketed padding, the compiled forward, progress.

A pipeline turns one input (a string, a dict, an image...) into one answer in three steps, as
transformers' pipelines do: `preprocess` makes one or more *examples* from the input (a long text
split with a stride gives several), the model runs over batches of examples, and `postprocess`
turns the outputs of one input's examples into its answer.

The forward is compiled once per padded shape. Examples are padded along their sequence axis to
the next bucket length (16, 24, 32, 48, 64, ... up to the model's maximum) and batches to
`batch_size` rows, so a stream of inputs of every length compiles a handful of programs, not one
per input.
`Pipeline.compilations` counts them.

A list of inputs (not a lazy iterable) runs its examples shortest first when the pipeline
`sorts_by_length` (the encoder text pipelines, whose examples are independent): each batch then
pads to little more than its own longest instead of to the longest of a random batch, the
padding compute transformers' pipelines spend. Answers come back in the list's order.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import jax
import numpy as np
from flax import nnx

#: the smallest padded length; lengths grow by half octaves from here up to the model's maximum
MIN_BUCKET = 16


def bucket_length(length: int, maximum: int | None) -> int:
    """The padded length for a sequence of `length`: the next of 16, 24, 32, 48, 64, 96, ...
    (powers of two and the points halfway between, in ratio: at most a third of a batch is
    padding, for twice the programs of powers of two alone), capped at `maximum` (a longer
    sequence is not capped: the model refuses it)."""
    bucket = MIN_BUCKET
    while bucket < length:
        bucket = bucket * 3 // 2 if bucket & (bucket - 1) == 0 else bucket * 4 // 3
    if maximum is not None and length <= maximum < bucket:
        return maximum
    return bucket


class Pipeline:
    """Subclasses set `task` (flaxauto's registry task), `output_fields` (the model outputs kept)
    and implement `preprocess(item, **params) -> list[example]` and
    `postprocess(item, outputs, **params)`, where an example is a dict of numpy arrays (the
    model's inputs, per example, without batch axis) plus any keys starting with "_" that the
    pipeline keeps for itself (offsets, the text), and `outputs` holds, per example, the kept
    output fields with the padding removed, and the example's "_" keys."""

    task: ClassVar[str]
    output_fields: ClassVar[tuple[str, ...]] = ("logits",)
    #: inputs padded along their first axis to the bucket length, and their padding value
    #: (None: the tokenizer's pad token id)
    padded_inputs: ClassVar[dict[str, int | None]] = {
        "input_ids": None,
        "attention_mask": 0,
        "token_type_ids": 0,
    }
    #: outputs whose second axis is the sequence, cut back to each example's length
    sequence_outputs: ClassVar[tuple[str, ...]] = ()

    #: what prepares the inputs, as pipeline() loads it: "tokenizer", "image_processor" or
    #: "feature_extractor" (transformers' classes, which need no torch)
    processor_kind: ClassVar[str] = "tokenizer"

    #: whether a list's examples may run in order of length (each example's outputs independent
    #: of which others share its batch; not so for sequential table questions, or sampling)
    sorts_by_length: ClassVar[bool] = False

    def __init__(self, model, processor=None, *, batch_size: int = 1, progress=False, **params):
        self.model = model
        self.processor = processor
        self.batch_size = _positive("batch_size", batch_size)
        self.progress = progress
        self.check_params(**params)  # refuse bad options now, not at the first call
        self.options = params  # given at construction; a call's own parameters override them
        self.compilations = 0
        self._forward = self._compile_forward()

    # -- what a pipeline says about itself ---------------------------------------------------

    @property
    def config(self):
        return self.model.config

    @property
    def tokenizer(self):
        return self.processor

    def check_params(self, **params) -> dict:
        """The call parameters this pipeline accepts, checked; unknown ones raise TypeError."""
        if params:
            raise TypeError(f"{type(self).__name__} got unexpected parameters {sorted(params)}")
        return params

    def preprocess(self, item, **params) -> list[dict]:
        raise NotImplementedError

    def postprocess(self, item, outputs: list[dict], **params):
        raise NotImplementedError

    def is_single(self, inputs) -> bool:
        """Whether `inputs` is one input (answered with one answer) rather than several."""
        return isinstance(inputs, (str, dict))

    # -- calling ------------------------------------------------------------------------------

    def __call__(self, inputs, **params):
        """One input -> its answer; a list -> a list of answers; any other iterable (a
        generator, a dataset) -> a generator of answers, computed lazily batch by batch."""
        params = self.check_params(**(self.options | params))
        if self.is_single(inputs):
            return next(self._answers([inputs], params))
        if isinstance(inputs, (list, tuple)):
            return list(self._answers(inputs, params))
        if isinstance(inputs, Iterable):
            return self._answers(inputs, params)
        raise TypeError(f"{type(self).__name__} cannot read inputs of type {type(inputs)}")

    def _answers(self, items: Iterable, params: dict) -> Iterator:
        if self.sorts_by_length and isinstance(items, (list, tuple)) and len(items) > 1:
            yield from self._answers_by_length(items, params)
            return
        items = iter(self._progress_bar(items))
        while chunk := list(itertools.islice(items, self.batch_size)):
            examples = [self.preprocess(item, **params) for item in chunk]
            outputs = self.run_model([e for per_item in examples for e in per_item], **params)
            yield from self._postprocessed(chunk, examples, outputs, params)

    def _answers_by_length(self, items, params: dict) -> Iterator:
        """A list's answers, its examples run shortest first (the progress bar counts batches)."""
        examples = [self.preprocess(item, **params) for item in items]
        flat = [example for per_item in examples for example in per_item]
        order = sorted(range(len(flat)), key=lambda i: self.example_length(flat[i]))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        outputs = [None] * len(flat)
        for batch in self._progress_bar(batches, unit="batch"):
            run = self.run_model([flat[i] for i in batch], **params)
            for i, output in zip(batch, run, strict=True):
                outputs[i] = output
        yield from self._postprocessed(items, examples, outputs, params)

    def _postprocessed(self, items, examples, outputs, params: dict) -> Iterator:
        """Each item's answer from its examples' outputs (`outputs` in the examples' order)."""
        outputs = iter(outputs)
        for item, per_item in zip(items, examples, strict=True):
            yield self.postprocess(item, [next(outputs) for _ in per_item], **params)

    def _progress_bar(self, items, unit: str = "input"):
        if not self.progress:
            return items
        from tqdm.auto import tqdm

        total = len(items) if hasattr(items, "__len__") else None
        return tqdm(items, total=total, desc=self.task, unit=unit)

    # -- the model ----------------------------------------------------------------------------

    def _compile_forward(self):
        graphdef, state = nnx.split(self.model)
        fields = self.output_fields

        def forward(state, inputs):
            self.compilations += 1  # runs once per trace, i.e. once per compiled shape
            outputs = nnx.merge(graphdef, state)(**inputs)
            return {name: getattr(outputs, name) for name in fields}

        compiled = jax.jit(forward)
        return lambda inputs: compiled(state, inputs)

    def max_length(self) -> int | None:
        """The longest sequence the model takes (its position table), if it has one."""
        return getattr(self.config, "max_position_embeddings", None)

    def run_model(self, examples: list[dict], **params) -> list[dict]:
        """The kept outputs of each example, computed `batch_size` examples at a time (a
        pipeline that runs the model otherwise, e.g. generate, reads its parameters)."""
        results = []
        for start in range(0, len(examples), self.batch_size):
            results += self._run_batch(examples[start : start + self.batch_size])
        return results

    def _run_batch(self, examples: list[dict]) -> list[dict]:
        model_inputs = [{k: v for k, v in e.items() if not k.startswith("_")} for e in examples]
        lengths = [self.example_length(e) for e in model_inputs]
        padded = bucket_length(max(lengths), self.max_length()) if lengths[0] else None
        # padding rows repeat the first example: a row of padding alone would attend to nothing
        rows = model_inputs + [model_inputs[0]] * (self.batch_size - len(model_inputs))
        batch = {
            name: np.stack([self._pad(name, row[name], padded) for row in rows])
            for name in model_inputs[0]
        }
        outputs = jax.device_get(self._forward(batch))
        return [
            {
                name: _cut(value[i], lengths[i]) if name in self.sequence_outputs else value[i]
                for name, value in outputs.items()
            }
            | {k: v for k, v in example.items() if k.startswith("_")}  # kept for postprocess
            for i, example in enumerate(examples)
        ]

    def example_length(self, example: dict) -> int:
        """The sequence length of one example (0: its inputs have no sequence axis)."""
        for name in self.padded_inputs:
            if name in example:
                return len(example[name])
        return 0

    def _pad(self, name: str, value: np.ndarray, length: int | None) -> np.ndarray:
        if length is None or name not in self.padded_inputs:
            return value
        fill = self.padded_inputs[name]
        if fill is None:
            fill = self.pad_token_id()
        padding = [(0, length - len(value))] + [(0, 0)] * (value.ndim - 1)
        return np.pad(value, padding, constant_values=fill)

    def pad_token_id(self) -> int:
        # the config's first: decoder classifiers find each row's last token by it
        for source in (self.config, self.tokenizer):
            value = getattr(source, "pad_token_id", None)
            if value is not None:
                return int(value)
        return 0


def _cut(value: np.ndarray, length: int) -> np.ndarray:
    return value[:length]


def _positive(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return value
