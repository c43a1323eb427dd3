"""transformers' ForObjectDetectionLoss (DETR, YOLOS) in JAX, and the box helpers it shares with
post-processing.

The loss matches each image's targets to predictions one to one (the Hungarian assignment on a
cost of class probability, L1 and GIoU box distances), then scores the matched pairs: a
cross-entropy over every query (unmatched ones are "no object", weighted by eos_coefficient) and
L1 and GIoU losses over the matched boxes, normalised by the number of target boxes.

How the matching runs under jit: the cost matrix is computed in JAX (in the traced program, on the
device), and only the assignment itself, which is discrete and has no gradient, is solved on the
host by scipy's linear_sum_assignment (what transformers calls) through `jax.pure_callback`. The
callback returns, per target, the query it was matched to; the losses gather with those indices
in JAX, so gradients flow into logits and pred_boxes exactly as through torch's indexing. Why not
an in-JAX solver: an auction or Sinkhorn solver is approximate or breaks ties differently, and the
loss would then differ from transformers' whenever two assignments cost nearly the same;
scipy's exact solver gives the same assignment as transformers. The host round trip is small
(B x Q x M costs) beside a detector's forward.

Targets of different counts per image are padded to one count M (the largest, or the count that
`pad_detection_labels` fixes, so that a training step compiles once) with a validity mask; padded
targets take part in nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flaxauto import layers

# --- boxes --------------------------------------------------------------------------------------


def center_to_corners(boxes: jax.Array) -> jax.Array:
    """[..., 4] (center x, center y, width, height) -> (x0, y0, x1, y1)."""
    cx, cy, w, h = (boxes[..., i] for i in range(4))
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def _area(corners: jax.Array) -> jax.Array:
    return (corners[..., 2] - corners[..., 0]) * (corners[..., 3] - corners[..., 1])


def generalized_box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
    """GIoU of corner boxes that broadcast against each other: [..., 4] x [..., 4] -> [...].
    Pairwise [N, M] is boxes1[:, None] against boxes2[None]; aligned pairs [N] is boxes1
    against boxes2 (the diagonal transformers takes, with the same gradients)."""
    area1, area2 = _area(boxes1), _area(boxes2)
    inner_low = jnp.maximum(boxes1[..., :2], boxes2[..., :2])
    inner_high = jnp.minimum(boxes1[..., 2:], boxes2[..., 2:])
    inner = jnp.clip(inner_high - inner_low, min=0)
    intersection = inner[..., 0] * inner[..., 1]
    union = area1 + area2 - intersection
    iou = intersection / union
    outer_low = jnp.minimum(boxes1[..., :2], boxes2[..., :2])
    outer_high = jnp.maximum(boxes1[..., 2:], boxes2[..., 2:])
    outer = jnp.clip(outer_high - outer_low, min=0)
    enclosing = outer[..., 0] * outer[..., 1]
    return iou - (enclosing - union) / enclosing


# --- targets ------------------------------------------------------------------------------------

#: what a padded target slot holds: a valid box, so GIoU stays finite where it is masked out
_PAD_BOX = (0.5, 0.5, 1.0, 1.0)


class Targets(NamedTuple):
    """One image per row, padded to M targets."""

    class_labels: jax.Array  # [B, M] int32
    boxes: jax.Array  # [B, M, 4] normalised (cx, cy, w, h), float32
    valid: jax.Array  # [B, M] bool


def pad_detection_labels(labels: list[dict], max_targets: int) -> list[dict]:
    """transformers' detection labels (one dict per image: `class_labels` [n], `boxes` [n, 4])
    -> the same dicts with every image padded to `max_targets` and a `valid` mask [max_targets],
    so that batches with different numbers of objects have one shape (one compiled program).
    Other keys (image_id, area, ...) are kept."""
    padded = []
    for target in labels:
        classes = np.asarray(target["class_labels"]).reshape(-1)
        boxes = np.asarray(target["boxes"], np.float32).reshape(-1, 4)
        valid = np.asarray(target.get("valid", np.ones(len(classes), bool)), bool)
        count = len(classes)
        if count > max_targets:
            raise ValueError(f"an image has {count} targets, more than max_targets={max_targets}")
        extra = max_targets - count
        padded.append(
            {
                **target,
                "class_labels": np.concatenate([classes, np.zeros(extra, classes.dtype)]),
                "boxes": np.concatenate([boxes, np.tile(np.float32(_PAD_BOX), (extra, 1))]),
                "valid": np.concatenate([valid, np.zeros(extra, bool)]),
            }
        )
    return padded


def stack_targets(labels: list[dict]) -> Targets:
    """The list of per-image dicts -> arrays padded to the largest count (at least 1)."""
    counts = [int(np.shape(t["class_labels"])[0]) for t in labels]
    width = max([1, *counts])
    classes, boxes, valid = [], [], []
    for target, count in zip(labels, counts, strict=True):
        extra = width - count
        classes.append(jnp.pad(jnp.asarray(target["class_labels"], jnp.int32), (0, extra)))
        box = jnp.asarray(target["boxes"], jnp.float32).reshape(count, 4)
        boxes.append(jnp.concatenate([box, jnp.tile(jnp.float32(_PAD_BOX), (extra, 1))]))
        given = target.get("valid")
        mask = jnp.ones(count, bool) if given is None else jnp.asarray(given, bool)
        valid.append(jnp.pad(mask, (0, extra)))
    return Targets(jnp.stack(classes), jnp.stack(boxes), jnp.stack(valid))


def _check_boxes(boxes: jax.Array, valid: jax.Array) -> None:
    """transformers refuses target boxes with negative width or height (their GIoU is
    meaningless); so does this where the labels are concrete (not under jit)."""
    if isinstance(boxes, jax.core.Tracer) or isinstance(valid, jax.core.Tracer):
        return
    corners = np.asarray(center_to_corners(boxes))
    bad = (corners[..., 2:] < corners[..., :2]).any(-1) & np.asarray(valid)
    if bad.any():
        raise ValueError(f"boxes2 must be in [x0, y0, x1, y1] (corner) format, but got {corners}")


# --- matching -----------------------------------------------------------------------------------


def matching_cost(logits, pred_boxes, targets: Targets, config) -> jax.Array:
    """transformers' HungarianMatcher cost [B, Q, M]: class_cost * -p(target class) +
    bbox_cost * L1 + giou_cost * -GIoU; nan and inf become the largest float (matched last)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # [B, Q, C+1]
    batch, queries = probs.shape[:2]
    ids = jnp.broadcast_to(
        targets.class_labels[:, None, :], (batch, queries, targets.valid.shape[1])
    )
    class_cost = -jnp.take_along_axis(probs, ids, axis=2)
    pred = pred_boxes.astype(jnp.float32)[:, :, None, :]  # [B, Q, 1, 4]
    target = targets.boxes[:, None, :, :]  # [B, 1, M, 4]
    bbox_cost = jnp.sum(jnp.abs(pred - target), axis=-1)
    giou_cost = -generalized_box_iou(center_to_corners(pred), center_to_corners(target))
    cost = config.bbox_cost * bbox_cost + config.class_cost * class_cost
    cost = cost + config.giou_cost * giou_cost
    largest = jnp.finfo(cost.dtype).max
    return jnp.nan_to_num(cost, nan=largest, posinf=largest, neginf=largest)


def _assign_on_host(cost: np.ndarray, valid: np.ndarray):
    """scipy's exact assignment per image over its valid targets -> for each target the query
    matched to it [B, M] and whether it was matched [B, M] (not when targets outnumber queries)."""
    from scipy.optimize import linear_sum_assignment

    # sharded operands arrive as jax Arrays: indexing them would dispatch jax operations from
    # the runtime's callback thread (it aborted the process under a mesh); numpy copies do not
    cost, valid = np.asarray(cost), np.asarray(valid)
    batch, _, width = cost.shape
    query = np.zeros((batch, width), np.int32)
    matched = np.zeros((batch, width), bool)
    for image in range(batch):
        columns = np.flatnonzero(valid[image])
        if columns.size == 0:
            continue
        rows, picked = linear_sum_assignment(cost[image][:, columns])
        query[image, columns[picked]] = rows
        matched[image, columns[picked]] = True
    return query, matched


def hungarian_match(logits, pred_boxes, targets: Targets, config):
    """-> (query index per target [B, M] int32, matched [B, M] bool); no gradient."""
    if config.class_cost == 0 and config.bbox_cost == 0 and config.giou_cost == 0:
        raise ValueError("All costs of the Matcher can't be 0")
    cost = jax.lax.stop_gradient(matching_cost(logits, pred_boxes, targets, config))
    # under a mesh: whole (replicated) arrays in and out of the host callback, which runs once
    cost = layers.constrain(cost, (None, None, None))
    valid = layers.constrain(targets.valid, (None, None))
    shape = targets.valid.shape
    result = (jax.ShapeDtypeStruct(shape, jnp.int32), jax.ShapeDtypeStruct(shape, jnp.bool_))
    query, matched = jax.pure_callback(
        _assign_on_host, result, cost, valid, vmap_method="sequential"
    )
    return layers.constrain(query, (None, None)), layers.constrain(matched, (None, None))


# --- losses -------------------------------------------------------------------------------------


def _classification_loss(logits, query, matched, targets: Targets, eos_coefficient: float):
    """Weighted cross-entropy over every query [B, Q]: a matched query's target is its object's
    class, the others' the no-object class (the last), whose weight is eos_coefficient; the mean
    is weighted as torch's cross_entropy(weight=...) weights it."""
    logits = logits.astype(jnp.float32)
    batch, queries, classes = logits.shape
    no_object = classes - 1
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], query.shape)
    columns = jnp.where(matched, query, queries)  # unmatched targets write out of bounds: dropped
    target_classes = jnp.full((batch, queries), no_object, jnp.int32)
    target_classes = target_classes.at[rows, columns].set(targets.class_labels, mode="drop")
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, target_classes[..., None], axis=-1)[..., 0]
    weights = jnp.where(target_classes == no_object, jnp.float32(eos_coefficient), 1.0)
    return -jnp.sum(weights * picked) / jnp.sum(weights)


def _box_losses(pred_boxes, query, matched, targets: Targets, num_boxes):
    """L1 and 1 - GIoU summed over the matched pairs, each divided by num_boxes."""
    source = jnp.take_along_axis(pred_boxes.astype(jnp.float32), query[..., None], axis=1)
    pad = jnp.broadcast_to(jnp.float32(_PAD_BOX), source.shape)
    keep = matched[..., None]
    # masked-out pairs hold a valid box, so their (discarded) GIoU has a finite gradient
    source = jnp.where(keep, source, pad)  # [B, M, 4]
    target = jnp.where(keep, targets.boxes, pad)
    l1 = jnp.sum(jnp.where(keep, jnp.abs(source - target), 0.0)) / num_boxes
    giou = generalized_box_iou(center_to_corners(source), center_to_corners(target))
    return l1, jnp.sum(jnp.where(matched, 1.0 - giou, 0.0)) / num_boxes


def _cardinality_error(logits, targets: Targets):
    """Mean |predicted objects - targets| per image (logged, no gradient, as in transformers)."""
    logits = jax.lax.stop_gradient(logits)
    predicted = jnp.sum(jnp.argmax(logits, axis=-1) != logits.shape[-1] - 1, axis=1)
    counts = jnp.sum(targets.valid, axis=1)
    return jnp.mean(jnp.abs(predicted - counts).astype(jnp.float32))


def _losses(logits, pred_boxes, targets: Targets, num_boxes, config) -> dict:
    query, matched = hungarian_match(logits, pred_boxes, targets, config)
    loss_ce = _classification_loss(logits, query, matched, targets, config.eos_coefficient)
    loss_bbox, loss_giou = _box_losses(pred_boxes, query, matched, targets, num_boxes)
    return {
        "loss_ce": loss_ce,
        "loss_bbox": loss_bbox,
        "loss_giou": loss_giou,
        "cardinality_error": _cardinality_error(logits, targets),
    }


def detection_loss(
    logits: jax.Array,
    pred_boxes: jax.Array,
    labels: list[dict],
    config,
    auxiliary_outputs: list[dict] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """transformers' ForObjectDetectionLoss -> (loss, loss_dict).

    logits [B, Q, num_labels + 1] (the last class is "no object"); pred_boxes [B, Q, 4] normalised
    (cx, cy, w, h); labels: one dict per image with `class_labels` [n] and normalised `boxes`
    [n, 4] (n may differ between images, and may be 0; an optional `valid` [n] mask marks padded
    targets, see pad_detection_labels); auxiliary_outputs: one {"logits", "pred_boxes"} per
    intermediate decoder layer (DETR with config.auxiliary_loss), each matched and scored again,
    its entries suffixed _0, _1, ... in loss_dict.

    loss_dict holds loss_ce, loss_bbox, loss_giou and cardinality_error (logged, not in the
    loss); loss = loss_ce + bbox_loss_coefficient * loss_bbox + giou_loss_coefficient * loss_giou
    summed over the final and auxiliary outputs. Reads config.num_labels, class_cost, bbox_cost,
    giou_cost, eos_coefficient, bbox_loss_coefficient, giou_loss_coefficient.

    num_boxes (the normaliser) counts the whole batch's targets, at least 1; under a mesh the
    batch is global, which is what transformers' reduction over processes computes.
    """
    if len(labels) != logits.shape[0]:
        raise ValueError(f"{len(labels)} label dicts for a batch of {logits.shape[0]} images")
    if logits.shape[-1] != config.num_labels + 1:
        raise ValueError(
            f"logits have {logits.shape[-1]} classes; config.num_labels + 1 = "
            f"{config.num_labels + 1} (the last is no-object)"
        )
    targets = stack_targets(labels)
    _check_boxes(targets.boxes, targets.valid)
    num_boxes = jnp.maximum(jnp.sum(targets.valid).astype(jnp.float32), 1.0)
    loss_dict = _losses(logits, pred_boxes, targets, num_boxes, config)
    for index, auxiliary in enumerate(auxiliary_outputs or ()):
        found = _losses(auxiliary["logits"], auxiliary["pred_boxes"], targets, num_boxes, config)
        loss_dict.update({f"{name}_{index}": value for name, value in found.items()})
    weights = {
        "loss_ce": 1.0,
        "loss_bbox": config.bbox_loss_coefficient,
        "loss_giou": config.giou_loss_coefficient,
    }
    suffixes = ["", *(f"_{index}" for index in range(len(auxiliary_outputs or ())))]
    loss = sum(
        loss_dict[name + suffix] * weight for suffix in suffixes for name, weight in weights.items()
    )
    return loss, loss_dict


__all__ = [
    "Targets",
    "center_to_corners",
    "detection_loss",
    "generalized_box_iou",
    "hungarian_match",
    "pad_detection_labels",
]
