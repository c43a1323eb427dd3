"""The detection loss (heads/detection_losses.py) against transformers' ForObjectDetectionLoss on the
same random logits, boxes and labels: loss, every loss_dict entry, and the gradients with respect
to logits and pred_boxes (torch autograd), eagerly, under jit, with padded labels and with
auxiliary outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import YolosConfig
from transformers.loss.loss_for_object_detection import ForObjectDetectionLoss

from flaxauto.heads.detection_losses import detection_loss, pad_detection_labels

NUM_LABELS = 5
TOLERANCE = 1e-5


def loss_config(**overrides):
    # costs and coefficients off their defaults, so a swapped weight shows
    settings = dict(
        num_labels=NUM_LABELS, class_cost=2, bbox_cost=3, giou_cost=4, eos_coefficient=0.2,
        bbox_loss_coefficient=4, giou_loss_coefficient=3, auxiliary_loss=False,
    )  # fmt: skip
    settings.update(overrides)
    config = YolosConfig(**{k: v for k, v in settings.items() if k != "decoder_layers"})
    if "decoder_layers" in settings:  # what transformers' loss counts auxiliary outputs by
        config.decoder_layers = settings["decoder_layers"]
    return config


def random_case(seed: int, counts, queries: int, layers: int = 1):
    """logits [L, B, Q, C+1], pred_boxes [L, B, Q, 4] in (0, 1), labels with counts[i] targets."""
    rng = np.random.default_rng(seed)
    batch = len(counts)
    logits = rng.normal(size=(layers, batch, queries, NUM_LABELS + 1)).astype(np.float32) * 2
    centers = rng.uniform(0.2, 0.8, size=(layers, batch, queries, 2))
    sizes = rng.uniform(0.05, 0.4, size=(layers, batch, queries, 2))
    pred_boxes = np.concatenate([centers, sizes], -1).astype(np.float32)
    labels = []
    for count in counts:
        boxes = np.concatenate(
            [rng.uniform(0.2, 0.8, (count, 2)), rng.uniform(0.05, 0.4, (count, 2))], -1
        )
        classes = rng.integers(0, NUM_LABELS, size=count)
        labels.append({"class_labels": classes.astype(np.int64), "boxes": boxes.astype(np.float32)})
    return logits, pred_boxes, labels


def torch_reference(logits, pred_boxes, labels, config):
    """transformers' loss, loss_dict and d loss / d (final logits, final pred_boxes)."""
    logits_t = torch.tensor(logits, requires_grad=True)
    boxes_t = torch.tensor(pred_boxes, requires_grad=True)
    labels_t = [{k: torch.tensor(v) for k, v in target.items()} for target in labels]
    loss, loss_dict, _ = ForObjectDetectionLoss(
        logits_t[-1], labels_t, "cpu", boxes_t[-1], config,
        outputs_class=logits_t, outputs_coord=boxes_t,
    )  # fmt: skip
    loss.backward()
    found = {k: float(v.detach()) for k, v in loss_dict.items()}
    return float(loss.detach()), found, logits_t.grad.numpy(), boxes_t.grad.numpy()


def flax_loss(config, labels, auxiliary: bool):
    def compute(logits, pred_boxes):
        extra = None
        if auxiliary:
            extra = [
                {"logits": a, "pred_boxes": b}
                for a, b in zip(logits[:-1], pred_boxes[:-1], strict=True)
            ]
        return detection_loss(logits[-1], pred_boxes[-1], labels, config, extra)

    return compute


def check_against_torch(logits, pred_boxes, labels, config, auxiliary=False, jit=False, pad=None):
    expected, expected_dict, grad_logits, grad_boxes = torch_reference(
        logits, pred_boxes, labels, config
    )
    flax_labels = labels if pad is None else pad_detection_labels(labels, pad)
    compute = flax_loss(config, flax_labels, auxiliary)
    if jit:
        compute = jax.jit(compute)
    (loss, loss_dict), grads = jax.value_and_grad(compute, argnums=(0, 1), has_aux=True)(
        jnp.asarray(logits), jnp.asarray(pred_boxes)
    )
    assert set(loss_dict) == set(expected_dict)  # (jax orders a returned dict's keys)
    for name, value in expected_dict.items():
        assert abs(float(loss_dict[name]) - value) <= TOLERANCE * max(1, abs(value)), name
    assert abs(float(loss) - expected) <= TOLERANCE * max(1, abs(expected))
    np.testing.assert_allclose(np.asarray(grads[0]), grad_logits, atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(grads[1]), grad_boxes, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_loss_and_gradients_equal_transformers(jit):
    # four images with 2, 0, 3 and 1 targets
    logits, pred_boxes, labels = random_case(0, [2, 0, 3, 1], queries=6)
    check_against_torch(logits, pred_boxes, labels, loss_config(), jit=jit)


def test_padded_labels_give_the_same_loss_in_one_program():
    logits, pred_boxes, labels = random_case(1, [1, 4, 0], queries=5)
    check_against_torch(logits, pred_boxes, labels, loss_config(), jit=True, pad=6)
    # another batch with other counts, padded to the same width: the same compiled program
    compute = jax.jit(lambda lg, pb, lb: detection_loss(lg, pb, lb, loss_config())[0])
    for counts in ([2, 2, 1], [0, 0, 3]):
        logits, pred_boxes, labels = random_case(2, counts, queries=5)
        padded = pad_detection_labels(labels, 6)
        expected = torch_reference(logits, pred_boxes, labels, loss_config())[0]
        assert abs(float(compute(logits[-1], pred_boxes[-1], padded)) - expected) <= TOLERANCE
    assert compute._cache_size() == 1


def test_more_targets_than_queries_and_no_targets_at_all():
    # jitted: eager value_and_grad dispatches (and compiles) op by op, seconds per case
    logits, pred_boxes, labels = random_case(3, [4, 2], queries=3)
    check_against_torch(logits, pred_boxes, labels, loss_config(), jit=True)
    logits, pred_boxes, labels = random_case(4, [0, 0], queries=3)
    check_against_torch(logits, pred_boxes, labels, loss_config(), jit=True)


def test_auxiliary_outputs_are_matched_and_weighted_as_transformers():
    config = loss_config(auxiliary_loss=True, decoder_layers=3)
    logits, pred_boxes, labels = random_case(5, [3, 1], queries=5, layers=3)
    check_against_torch(logits, pred_boxes, labels, config, auxiliary=True, jit=True)


def test_refusals_as_transformers():
    logits, pred_boxes, labels = random_case(6, [1], queries=3)
    with pytest.raises(ValueError, match="All costs"):
        detection_loss(
            logits[-1], pred_boxes[-1], labels, loss_config(class_cost=0, bbox_cost=0, giou_cost=0)
        )
    labels[0]["boxes"][0, 2] = -0.1  # a negative width
    with pytest.raises(ValueError, match="corner"):
        detection_loss(logits[-1], pred_boxes[-1], labels, loss_config())
