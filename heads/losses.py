"""Losses as transformers computes them, accumulated in float32 whatever the compute dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def cross_entropy(logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX):
    """Mean token cross-entropy over labels != ignore_index (torch's CrossEntropyLoss).

    logits [N, C], labels [N]. With every label ignored the mean is 0/0 = nan, as in torch.
    """
    logits = logits.astype(jnp.float32)
    labels = jnp.asarray(labels)
    valid = labels != ignore_index
    safe_labels = jnp.where(valid, labels, 0)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, safe_labels[:, None], axis=-1)[:, 0]
    return -jnp.sum(jnp.where(valid, picked, 0.0)) / jnp.sum(valid)


def mean_squared_error(predictions: jax.Array, targets: jax.Array):
    diff = predictions.astype(jnp.float32) - jnp.asarray(targets, jnp.float32)
    return jnp.mean(diff * diff)


def binary_cross_entropy_with_logits(logits: jax.Array, targets: jax.Array):
    logits = logits.astype(jnp.float32)
    targets = jnp.asarray(targets, jnp.float32)
    # log(1 + exp(-|x|)) form: stable for large |x|, as torch's BCEWithLogitsLoss.
    per_element = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return jnp.mean(per_element)


def sequence_classification_loss(logits: jax.Array, labels, problem_type: str | None):
    """transformers' rule: regression for one label, else int labels -> single-label CE,
    float labels -> multi-label BCE, unless config.problem_type says otherwise."""
    labels = jnp.asarray(labels)
    num_labels = logits.shape[-1]
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif jnp.issubdtype(labels.dtype, jnp.integer):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "regression":
        if num_labels == 1:
            return mean_squared_error(logits.reshape(-1), labels.reshape(-1))
        return mean_squared_error(logits, labels)
    if problem_type == "single_label_classification":
        return cross_entropy(logits.reshape(-1, num_labels), labels.reshape(-1))
    if problem_type == "multi_label_classification":
        return binary_cross_entropy_with_logits(logits, labels)
    raise NotImplementedError(f"problem_type={problem_type!r} is not implemented")


def causal_lm_loss(logits: jax.Array, labels):
    """transformers' ForCausalLMLoss: position t predicts labels[t + 1]; the last position has
    no target. logits [B, T, V], labels [B, T] (-100 ignored)."""
    labels = jnp.asarray(labels)
    no_target = jnp.full((*labels.shape[:-1], 1), IGNORE_INDEX, labels.dtype)
    targets = jnp.concatenate([labels[..., 1:], no_target], axis=-1)
    return cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


CTC_REDUCTIONS = ("mean", "sum", "none")


def ctc_loss(
    logits: jax.Array,
    logit_lengths: jax.Array,
    labels: jax.Array,
    *,
    blank_id: int,
    reduction: str = "mean",
    zero_infinity: bool = False,
    ignore_index: int = IGNORE_INDEX,
):
    """transformers' ForCTCLoss (torch.nn.functional.ctc_loss over log_softmax in float32).

    logits [B, T, V]; logit_lengths [B]: each row's valid frames; labels [B, U], where -100 and the
    blank are left out and the rest, in order, is the target. reduction "mean" divides each row's
    loss by its target length (at least 1) and averages the rows; "sum" adds them; "none" keeps
    them [B]. A target that no alignment fits in its frames has an infinite loss (0 with
    zero_infinity), as in torch.
    """
    import optax

    labels = jnp.asarray(labels)
    keep = (labels != ignore_index) & (labels != blank_id)  # [B, U]
    # the kept labels moved to the front of each row, in order (torch's masked_select)
    order = jnp.argsort(jnp.logical_not(keep), axis=-1, stable=True)
    packed_keep = jnp.take_along_axis(keep, order, axis=-1)
    packed = jnp.where(packed_keep, jnp.take_along_axis(labels, order, axis=-1), 0)
    target_lengths = jnp.sum(keep, axis=-1)  # [B]
    frames = jnp.arange(logits.shape[1])[None, :]
    per_row = optax.ctc_loss(
        logits.astype(jnp.float32),
        (frames >= logit_lengths[:, None]).astype(jnp.float32),
        packed,
        jnp.logical_not(packed_keep).astype(jnp.float32),
        blank_id=blank_id,
    )
    # optax scores impossible alignments with a finite floor (log 0 -> -1e5) where torch gives
    # inf: a target fits iff its frames cover each label plus a blank between repeated labels
    repeats = jnp.sum(packed_keep[:, 1:] & (packed[:, 1:] == packed[:, :-1]), axis=-1)
    fits = logit_lengths >= target_lengths + repeats
    per_row = jnp.where(fits, per_row, jnp.inf if not zero_infinity else 0.0)
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return jnp.sum(per_row)
    if reduction == "mean":
        return jnp.mean(per_row / jnp.maximum(target_lengths, 1).astype(jnp.float32))
    raise NotImplementedError(f"ctc_loss_reduction={reduction!r} is not implemented")
