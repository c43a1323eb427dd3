"""Table question answering losses, as transformers' TapasForQuestionAnswering computes them.

Three supervision modes:
- strong cell supervision (SQA): `labels` [B, T] mark the answer's tokens;
- strong aggregation supervision (WikiSQL-supervised): `aggregation_labels` [B] too;
- weak supervision (WTQ, `use_answer_as_supervision`): `float_answer` [B] (NaN for a cell
  selection question), `numeric_values` / `numeric_values_scale` [B, T]; the model learns
  whether to aggregate from the answer, and a Huber loss on the expected result of the soft
  aggregation.
Everything accumulates in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxauto import segments

EPSILON_ZERO_DIVISION = 1e-10
#: a logit this low is a probability of 0 (exp(-10000) underflows)
CLOSE_ENOUGH_TO_LOG_ZERO = -10000.0


def bernoulli_log_prob(logits, targets):
    """log p(targets) of Bernoulli(sigmoid(logits)), in torch's -BCE-with-logits form."""
    return -(jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits))))


def column_logits(
    token_column_logits, cell_index, cell_mask, allow_empty_column_selection: bool
):  # fmt: skip
    """Per-column logits [B, columns]: the mean over a column's cells of each cell's mean token
    logit; padding columns (no cell) and, unless allowed, column 0 (no column) get log 0."""
    cell_logits, cell_logits_index = segments.reduce_mean(token_column_logits, cell_index)
    column_index = cell_index.project_inner(cell_logits_index)
    column_sum, out_index = segments.reduce_sum(cell_logits * cell_mask, column_index)
    cell_count, _ = segments.reduce_sum(cell_mask, column_index)
    logits = column_sum / (cell_count + EPSILON_ZERO_DIVISION)
    is_column_zero = out_index.indices == 0
    is_padding = (cell_count < 0.5) & ~is_column_zero
    logits = logits + CLOSE_ENOUGH_TO_LOG_ZERO * is_padding.astype(jnp.float32)
    if not allow_empty_column_selection:
        logits = logits + CLOSE_ENOUGH_TO_LOG_ZERO * is_column_zero.astype(jnp.float32)
    return logits


def single_column_selection(token_logits, columns_logits, labels, cell_index, col_index, cell_mask):
    """The hierarchical loss (pick the answer's column, then its cells in it) per example [B],
    and token logits [B, T] that select only cells of the most likely column.

    labels may be all zeros (no answer): the loss is then the column loss toward column 0."""
    labels_per_column, _ = segments.reduce_sum(labels.astype(jnp.float32), col_index)
    no_cell_selected = jnp.max(labels_per_column, axis=-1) == 0  # [B]
    column_label = jnp.where(no_cell_selected, 0, jnp.argmax(labels_per_column, axis=-1))
    column_log_probs = jax.nn.log_softmax(columns_logits, axis=-1)
    column_loss = -jnp.take_along_axis(column_log_probs, column_label[:, None], axis=-1)[:, 0]

    logits_per_cell, _ = segments.reduce_mean(token_logits, cell_index)  # [B, cells]
    labels_per_cell, labels_index = segments.reduce_max(labels.astype(jnp.int32), cell_index)
    column_of_cell = cell_index.project_inner(labels_index).indices  # [B, cells]
    column_mask = (column_of_cell == column_label[:, None]).astype(jnp.float32)
    cell_log_prob = bernoulli_log_prob(logits_per_cell, labels_per_cell.astype(jnp.float32))
    cell_loss = -jnp.sum(cell_log_prob * column_mask * cell_mask, axis=1)
    cell_loss = cell_loss / (jnp.sum(column_mask * cell_mask, axis=1) + EPSILON_ZERO_DIVISION)
    loss = column_loss + jnp.where(no_cell_selected, 0.0, cell_loss)

    selected_column = jnp.argmax(columns_logits, axis=-1)  # [B]
    selected = (column_of_cell == selected_column[:, None]) & (column_of_cell != 0)
    selected_mask = selected.astype(jnp.float32)
    new_logits_per_cell = logits_per_cell + CLOSE_ENOUGH_TO_LOG_ZERO * (
        1.0 - cell_mask * selected_mask
    )
    return loss, segments.gather(new_logits_per_cell, cell_index)


def per_token_selection_loss(logits, labels, input_mask, positive_label_weight: float):
    """Without select_one_column: weighted Bernoulli loss per token, averaged over real tokens."""
    labels = labels.astype(jnp.float32)
    weight = jnp.where(labels == 0, 1.0, positive_label_weight)
    per_token = -bernoulli_log_prob(logits, labels) * weight
    return jnp.sum(per_token * input_mask, axis=1) / (
        jnp.sum(input_mask, axis=1) + EPSILON_ZERO_DIVISION
    )


def aggregate_mask(float_answer, logits_aggregation, labels, cell_selection_preference):
    """[B]: 1 where the example should aggregate. A scalar answer asks for aggregation, unless
    the model prefers cell selection (non-NONE mass <= cell_selection_preference) and the answer
    is in the cells (some label is set). Not differentiated."""
    wants_aggregation = (~jnp.isnan(float_answer)).astype(jnp.float32)
    probs = jax.nn.softmax(logits_aggregation.astype(jnp.float32), axis=-1)
    predicts_selection = jnp.sum(probs[:, 1:], axis=1) <= cell_selection_preference
    has_cells = jnp.sum(labels, axis=1) > 0
    mask = jnp.where(predicts_selection & has_cells, 0.0, wants_aggregation)
    return jax.lax.stop_gradient(mask)


def aggregation_loss(logits_aggregation, mask, aggregation_labels, config):
    """Per example [B]. Strong supervision: cross entropy toward aggregation_labels. Weak: toward
    NONE (0) where the example selects cells, and -log(non-NONE mass) where it aggregates."""
    log_probs = jax.nn.log_softmax(logits_aggregation.astype(jnp.float32), axis=-1)
    weak = bool(config.use_answer_as_supervision)
    target = jnp.zeros(log_probs.shape[:1], jnp.int32) if weak else aggregation_labels
    known = -jnp.take_along_axis(log_probs, jnp.asarray(target)[:, None], axis=-1)[:, 0]
    if weak:
        known = known * (1 - mask)
        probs = jax.nn.softmax(logits_aggregation.astype(jnp.float32), axis=-1)
        aggregation_mass = jnp.sum(probs[:, 1:], axis=1)
        known = known + -jnp.log(aggregation_mass) * mask
    return config.aggregation_loss_weight * known


def expected_result(
    cell_logits, numeric_values, numeric_values_scale, table_mask, logits_agg, config
):
    """The answer the soft aggregation gives [B]: sum, average and count of the cells weighted
    by their selection probabilities, mixed by the SUM / AVERAGE / COUNT probabilities."""
    if config.use_gumbel_for_cells or config.use_gumbel_for_aggregation:
        raise NotImplementedError(
            "use_gumbel_for_cells / use_gumbel_for_aggregation=True (sampled relaxations in the "
            "regression loss) are not implemented"
        )
    if logits_agg.shape[-1] != 4:
        raise ValueError(
            "the answer loss mixes SUM, AVERAGE and COUNT: it needs num_aggregation_labels=4 "
            f"(NONE first), got {logits_agg.shape[-1]}"
        )
    scaled = jax.nn.sigmoid(cell_logits) / numeric_values_scale * table_mask  # [B, T]
    count = jnp.sum(scaled, axis=1)
    values = jnp.where(jnp.isnan(numeric_values), 0.0, numeric_values)
    total = jnp.sum(scaled * values, axis=1)
    approximation = config.average_approximation_function
    if approximation == "ratio":
        average = total / (count + EPSILON_ZERO_DIVISION)
    elif approximation in ("first_order", "second_order"):
        others = jnp.sum(scaled, axis=1, keepdims=True) - scaled + 1
        if approximation == "first_order":
            average = jnp.sum(values * scaled / others, axis=1)
        else:
            pointwise_var = scaled * (1 - scaled)
            var = jnp.sum(pointwise_var, axis=1, keepdims=True) - pointwise_var
            multiplier = (var / jnp.square(others) + 1) / others
            average = jnp.sum(values * scaled * multiplier, axis=1)
    else:
        raise NotImplementedError(f"average_approximation_function={approximation!r}")
    op_probs = jax.nn.softmax(logits_agg[:, 1:] / config.aggregation_temperature, axis=-1)
    return jnp.sum(jnp.stack([total, average, count], axis=1) * op_probs, axis=1)


def huber_loss(predictions, targets, delta: float = 1.0):
    errors = jnp.abs(predictions - targets)
    return jnp.where(errors < delta, 0.5 * errors**2, errors * delta - 0.5 * delta**2)


def answer_loss(float_answer, mask, cell_logits, numeric_values, numeric_values_scale,
                table_mask, logits_agg, config):  # fmt: skip
    """(scaled Huber loss per example [B], [B] 0 where it exceeds answer_loss_cutoff)."""
    expected = expected_result(
        cell_logits, numeric_values, numeric_values_scale, table_mask, logits_agg, config
    )
    answer = jnp.where(jnp.isnan(float_answer), 0.0, float_answer)
    if config.use_normalized_answer_loss:
        normalizer = jax.lax.stop_gradient(
            jnp.maximum(jnp.abs(expected), jnp.abs(answer)) + EPSILON_ZERO_DIVISION
        )
        per_example = huber_loss(expected / normalizer * mask, answer / normalizer * mask)
    else:
        if config.huber_loss_delta is None:
            raise ValueError("the answer loss needs config.huber_loss_delta (None is set)")
        per_example = huber_loss(expected * mask, answer * mask, config.huber_loss_delta)
    if config.answer_loss_cutoff is None:
        keep = jnp.ones_like(per_example)
    else:
        keep = jnp.where(per_example > config.answer_loss_cutoff, 0.0, 1.0)
    return config.answer_loss_importance * (per_example * mask), keep
