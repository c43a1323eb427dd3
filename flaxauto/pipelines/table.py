"""table-question-answering over TAPAS: a table (a pandas DataFrame, or a dict of columns) and
one or more questions -> the answer cells, as transformers' pipeline answers them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import numpy as np

from flaxauto.heads.table import COLUMN_IDS, ROW_IDS, SEGMENT_IDS, convert_logits_to_predictions
from flaxauto.pipelines.base import Pipeline

PREV_LABELS = 3  # the token_type_ids channel that marks the previous answer's cells


class TableQuestionAnsweringPipeline(Pipeline):
    """Called as transformers' is: `pipe(table, query)`, `pipe(table=..., query=...)`,
    `pipe({"table": ..., "query": ...})` or a list of such dicts; a query may be a list of
    questions about the table. Each question gets {"answer", "coordinates", "cells"} plus
    "aggregator" when the model aggregates ("SUM > 87, 53"); one answer alone is returned
    bare. `sequential=True` asks the questions in turn, each seeing which cells answered the one
    before (the prev_labels token type), as conversational (SQA) models need. `truncation`
    (default "drop_rows_to_fit") and `padding` go to TapasTokenizer."""

    task = "table-question-answering"
    sequence_outputs = ("logits",)
    padded_inputs: ClassVar[dict] = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0}

    def __init__(self, model, processor=None, **options):
        config = model.config
        self.aggregate = bool(
            getattr(config, "aggregation_labels", None)
            and getattr(config, "num_aggregation_labels", None)
        )
        self.output_fields = ("logits", "logits_aggregation") if self.aggregate else ("logits",)
        super().__init__(model, processor, **options)

    def check_params(self, sequential=None, padding=None, truncation=None):
        return {
            "sequential": bool(sequential),
            "tokenizer_kwargs": {
                "padding": True if padding is None else padding,
                "truncation": "drop_rows_to_fit" if truncation is None else truncation,
            },
        }

    def __call__(self, table=None, query=None, **params):
        import pandas as pd

        if table is None:
            raise ValueError("Keyword argument `table` cannot be None.")
        if query is not None:
            inputs = [{"table": table, "query": query}]
        elif isinstance(table, dict) and "table" in table and "query" in table:
            inputs = [table]
        elif isinstance(table, (list, tuple)):
            if not all(isinstance(d, dict) and {"table", "query"} <= set(d) for d in table):
                raise ValueError("a list of inputs holds dicts with `table` and `query` keys")
            inputs = list(table)
        elif isinstance(table, Iterable) and not isinstance(table, (dict, pd.DataFrame)):
            return super().__call__(iter(table), **params)  # a generator: answered lazily
        else:
            raise ValueError("pass a table and a query, or dicts with `table` and `query` keys")
        answers = super().__call__(inputs, **params)
        return answers[0] if len(answers) == 1 else answers

    def preprocess(self, item, tokenizer_kwargs, **params):
        import pandas as pd

        table, query = item["table"], item["query"]
        if table is None:
            raise ValueError("Table cannot be None.")
        table = table if isinstance(table, pd.DataFrame) else pd.DataFrame(table)
        if table.empty:
            raise ValueError("table is empty")
        if query is None or query == "" or (isinstance(query, list) and not query):
            raise ValueError("query is empty")
        encoded = self.tokenizer(table, query, return_tensors="np", **tokenizer_kwargs)
        examples = []
        for i in range(len(encoded["input_ids"])):
            example = {k: np.asarray(encoded[k][i]) for k in self.padded_inputs if k in encoded}
            private = {"_table": table, "_types": example["token_type_ids"]}
            examples.append(example | private | {"_mask": example["attention_mask"]})
        return examples

    def run_model(self, examples, sequential=False, **params):
        if not sequential:
            return super().run_model(examples)
        return self._sequential(examples)

    def _sequential(self, examples) -> list[dict]:
        """One question at a time: each one's prev_labels mark the cells (of its table) whose
        mean token probability in the previous question's answer exceeded 0.5."""
        outputs, previous = [], None
        for example in examples:
            example = dict(example)
            types = example["token_type_ids"].copy()  # [T, 7]
            if previous is not None:
                in_body = _body_cells(types)
                labels = np.zeros(len(types), types.dtype)
                for i, cell in in_body:
                    labels[i] = int(previous[cell])
                types[:, PREV_LABELS] = labels
            example["token_type_ids"] = types
            (output,) = self._run_batch([example])
            outputs.append(output | {"_types": types})
            probabilities = _sigmoid(np.asarray(output["logits"], np.float64))
            probabilities = probabilities * example["attention_mask"]
            cells: dict[tuple[int, int], list[float]] = {}
            for i, cell in _body_cells(types):
                cells.setdefault(cell, []).append(probabilities[i])
            previous = {cell: np.array(p).mean() > 0.5 for cell, p in cells.items()}
        return outputs

    def postprocess(self, item, outputs, sequential=False, **params):
        answers = [self._answer(output) for output in outputs]
        return answers if len(answers) > 1 else answers[0]

    def _answer(self, output) -> dict:
        table = output["_table"]
        inputs = {"attention_mask": output["_mask"][None], "token_type_ids": output["_types"][None]}
        aggregation = output["logits_aggregation"][None] if self.aggregate else None
        predictions = convert_logits_to_predictions(inputs, output["logits"][None], aggregation)
        (coordinates,) = predictions[0] or [[]]
        answer = {
            "answer": ", ".join(table.iat[cell] for cell in coordinates),
            "coordinates": coordinates,
            "cells": [table.iat[cell] for cell in coordinates],
        }
        if self.aggregate:
            operator = int(predictions[1][0])
            answer["aggregator"] = self.config.aggregation_labels[operator]
            if operator != self.config.no_aggregation_label_index:
                answer["answer"] = f"{answer['aggregator']} > {answer['answer']}"
        return answer


def _body_cells(types: np.ndarray) -> list[tuple[int, tuple[int, int]]]:
    """(token index, (column, row)) of each token of the table's body, 0-based."""
    column, row = types[:, COLUMN_IDS] - 1, types[:, ROW_IDS] - 1
    body = (types[:, SEGMENT_IDS] == 1) & (column >= 0) & (row >= 0)
    return [(int(i), (int(column[i]), int(row[i]))) for i in np.flatnonzero(body)]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # the logistic function, without exp's overflow
