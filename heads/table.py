"""Table question answering: cell selection (column and cell logits), the optional aggregation
head, their losses, and answer decoding, as transformers' TapasForQuestionAnswering and
TapasTokenizer.convert_logits_to_predictions compute them.

The head is generic over a table encoder: it reads the backbone's last_hidden_state [B, T, E]
and pooler_output [B, E], and the table layout from token_type_ids [B, T, 7] (channel 1 the
1-based column, channel 2 the 1-based row, 0 outside the table body), as TapasTokenizer encodes it.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxauto import layers, outputs, segments
from flaxauto.heads import table_losses
from flaxauto.heads.base import Head

COLUMN_IDS, ROW_IDS, SEGMENT_IDS = 1, 2, 0  # channels of token_type_ids


@dataclasses.dataclass(frozen=True)
class TableSettings:
    """The config values the head reads (a frozen copy: static under jit)."""

    max_num_rows: int
    max_num_columns: int
    temperature: float
    select_one_column: bool
    allow_empty_column_selection: bool
    average_logits_per_cell: bool
    disable_per_token_loss: bool
    positive_label_weight: float
    num_aggregation_labels: int
    use_answer_as_supervision: bool | None
    aggregation_loss_weight: float
    cell_selection_preference: float | None
    answer_loss_importance: float
    use_normalized_answer_loss: bool
    huber_loss_delta: float | None
    answer_loss_cutoff: float | None
    aggregation_temperature: float
    average_approximation_function: str
    use_gumbel_for_cells: bool
    use_gumbel_for_aggregation: bool

    @classmethod
    def from_config(cls, config) -> TableSettings:
        values = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls)}
        approximation = values["average_approximation_function"]
        values["average_approximation_function"] = getattr(approximation, "value", approximation)
        return cls(**values)


def table_layout(inputs: dict, shape: tuple[int, int], settings: TableSettings):
    """(cell index [B, T] over max_num_rows x max_num_columns, column index, attention mask
    [B, T] and table mask [B, T] as floats) from token_type_ids [B, T, 7]; ids past the maxima
    share the last row / column, as in transformers. The table mask defaults to the body's
    tokens (row > 0)."""
    types = inputs.get("token_type_ids")
    types = jnp.zeros((*shape, 7), jnp.int32) if types is None else jnp.asarray(types)
    row_ids, column_ids = types[:, :, ROW_IDS], types[:, :, COLUMN_IDS]
    rows, columns = settings.max_num_rows, settings.max_num_columns
    row_index = segments.index_map(jnp.minimum(row_ids, rows - 1), rows, 1)
    column_index = segments.index_map(jnp.minimum(column_ids, columns - 1), columns, 1)
    mask = inputs.get("attention_mask")
    input_mask = jnp.ones(shape, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    table_mask = inputs.get("table_mask")
    table_mask = (row_ids > 0) if table_mask is None else jnp.asarray(table_mask)
    cells = segments.product_index(row_index, column_index)
    return cells, column_index, input_mask, table_mask.astype(jnp.float32)


class TableQuestionAnsweringHead(Head):
    """Token logits for cell selection (one weight vector, / temperature), restricted with
    select_one_column to the most likely column; aggregation logits from the pooled output when
    num_aggregation_labels > 0. Parameters keep transformers' top-level names (output_weights,
    output_bias, column_output_weights, column_output_bias, aggregation_classifier)."""

    label_names = (
        "labels", "aggregation_labels", "float_answer", "numeric_values", "numeric_values_scale",
    )  # fmt: skip
    input_names = ("table_mask",)

    def __init__(self, config, precision, rngs):
        self.settings = TableSettings.from_config(config)
        hidden = config.hidden_size
        weights_init = "zeros" if config.init_cell_selection_weights_to_zero else "normal"
        self.dropout = layers.dropout(config.hidden_dropout_prob, rngs)
        self.output_weights = layers.parameter((hidden,), ("embed",), precision, init=weights_init)
        self.output_bias = layers.parameter((), (), precision, init="zeros")
        self.column_output_weights = layers.parameter(
            (hidden,), ("embed",), precision, init=weights_init
        )
        self.column_output_bias = layers.parameter((), (), precision, init="zeros")
        if config.num_aggregation_labels > 0:
            self.aggregation_classifier = layers.linear(
                hidden, config.num_aggregation_labels, ("embed", None), precision, rngs
            )
        else:
            self.aggregation_classifier = nnx.data(None)

    def __call__(
        self, features, *, backbone, inputs, labels=None, aggregation_labels=None,
        float_answer=None, numeric_values=None, numeric_values_scale=None,
    ):  # fmt: skip
        s = self.settings
        hidden = self.dropout(features.last_hidden_state)  # [B, T, E]
        cells, cols, input_mask, table_mask = table_layout(inputs, hidden.shape[:2], s)
        cell_mask, _ = segments.reduce_mean(input_mask, cells)  # [B, cells]: 1 where a cell is

        logits = self._token_logits(hidden, self.output_weights, self.output_bias) / s.temperature
        columns_logits = None
        if s.select_one_column:
            columns_logits = table_losses.column_logits(
                self._token_logits(hidden, self.column_output_weights, self.column_output_bias),
                cells, cell_mask, s.allow_empty_column_selection,
            )  # fmt: skip
        logits_aggregation = None
        if self.aggregation_classifier is not None:
            logits_aggregation = self.aggregation_classifier(features.pooler_output)

        loss = None
        if labels is not None:
            loss, logits = self._loss(
                logits, columns_logits, logits_aggregation, cells, cols, cell_mask, input_mask,
                table_mask, jnp.asarray(labels), aggregation_labels, float_answer,
                numeric_values, numeric_values_scale,
            )  # fmt: skip
        elif s.select_one_column:
            no_labels = jnp.zeros(logits.shape, jnp.int32)
            _, logits = table_losses.single_column_selection(
                logits, columns_logits, no_labels, cells, cols, cell_mask
            )
        elif s.average_logits_per_cell:
            logits = segments.gather(segments.reduce_mean(logits, cells)[0], cells)
        return outputs.TableQuestionAnsweringOutput(
            loss=loss,
            logits=logits,
            logits_aggregation=logits_aggregation,
            hidden_states=features.hidden_states,
            attentions=features.attentions,
        )

    @staticmethod
    def _token_logits(hidden, weights, bias):
        return jnp.einsum("bsj,j->bs", hidden, weights[...]) + bias[...]  # [B, T]

    def _loss(self, logits, columns_logits, logits_aggregation, cells, cols, cell_mask,
              input_mask, table_mask, labels, aggregation_labels, float_answer,
              numeric_values, numeric_values_scale):  # fmt: skip
        """(total loss, the token logits transformers returns alongside it)."""
        s = self.settings
        logits = logits.astype(jnp.float32)
        weak = s.num_aggregation_labels > 0 and bool(s.use_answer_as_supervision)
        mask = None
        if weak:
            if float_answer is None:
                raise ValueError("weak supervision (use_answer_as_supervision) needs float_answer")
            float_answer = jnp.asarray(float_answer, jnp.float32)
            mask = table_losses.aggregate_mask(
                float_answer, logits_aggregation, labels, s.cell_selection_preference
            )
        if s.average_logits_per_cell:
            logits = segments.gather(segments.reduce_mean(logits, cells)[0], cells)
        if s.select_one_column:
            selection, logits = table_losses.single_column_selection(
                logits, columns_logits, labels, cells, cols, cell_mask
            )
        else:
            selection = table_losses.per_token_selection_loss(
                logits, labels, input_mask, s.positive_label_weight
            )
        total = jnp.zeros((), jnp.float32)
        if not s.disable_per_token_loss:
            total += jnp.mean(selection if mask is None else selection * (1.0 - mask))
        if s.num_aggregation_labels == 0:
            return total, logits
        if not weak and aggregation_labels is None:
            raise ValueError("the aggregation loss needs aggregation_labels (strong supervision)")
        per_example = table_losses.aggregation_loss(
            logits_aggregation, mask, None if weak else jnp.asarray(aggregation_labels), s
        )
        if weak:
            if numeric_values is None or numeric_values_scale is None:
                raise ValueError("the answer loss needs numeric_values and numeric_values_scale")
            answer, keep = table_losses.answer_loss(
                float_answer, mask, logits, jnp.asarray(numeric_values, jnp.float32),
                jnp.asarray(numeric_values_scale, jnp.float32), table_mask,
                logits_aggregation.astype(jnp.float32), s,
            )  # fmt: skip
            per_example = (per_example + answer) * keep
        return total + jnp.mean(per_example), logits


def convert_logits_to_predictions(
    inputs: dict, logits, logits_aggregation=None, cell_classification_threshold: float = 0.5
):
    """Answer coordinates (and aggregation operator indices) from the head's logits, as
    TapasTokenizer.convert_logits_to_predictions returns them: per example, the (row, column)
    of every body cell whose mean token probability exceeds the threshold, sorted. As there, an
    example without a table (no row or column ids) adds no entry.

    inputs: the tokenizer's input_ids, attention_mask and token_type_ids [B, T, 7]."""
    logits = np.array(logits, dtype=np.float32)
    logits[logits < -88.7] = -88.7  # float32 exp overflows below, as the tokenizer clamps
    probabilities = 1 / (1 + np.exp(-logits)) * np.asarray(inputs["attention_mask"])
    types = np.asarray(inputs["token_type_ids"])
    coordinates = []
    for probs, token_types in zip(probabilities, types, strict=True):
        segment, column, row = (token_types[:, c] for c in (SEGMENT_IDS, COLUMN_IDS, ROW_IDS))
        if column.max() == 0 and row.max() == 0:
            continue
        in_body = (segment == 1) & (column > 0) & (row > 0)
        cell_probs: dict[tuple[int, int], list[float]] = {}
        for i in np.flatnonzero(in_body):
            cell_probs.setdefault((int(row[i]) - 1, int(column[i]) - 1), []).append(probs[i])
        selected = [
            cell
            for cell, p in cell_probs.items()
            if np.array(p).mean() > cell_classification_threshold
        ]
        coordinates.append(sorted(selected))
    if logits_aggregation is None:
        return (coordinates,)
    return coordinates, np.asarray(logits_aggregation).argmax(axis=-1).tolist()


def answers_as_text(table, coordinates, aggregation_indices=None, aggregation_labels=None):
    """Per example, the selected cells' text, prefixed with the aggregation operator's name
    unless it is NONE: e.g. "SUM > 87, 53". table: a pandas DataFrame of strings."""
    answers = []
    for index, cells in enumerate(coordinates):
        text = ", ".join(str(table.iat[row, column]) for row, column in cells)
        if aggregation_indices is not None and aggregation_labels:
            operator = aggregation_labels[aggregation_indices[index]]
            if operator != "NONE":
                text = f"{operator} > {text}"
        answers.append(text)
    return answers


__all__ = [
    "TableQuestionAnsweringHead",
    "answers_as_text",
    "convert_logits_to_predictions",
]
