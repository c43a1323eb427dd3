"""Object detection: the class and box heads on a detector's query tokens (YOLOS' detection
tokens, DETR's decoder queries), the loss through heads/detection_losses.py, and
post-processing as transformers' image processors do it."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxauto import layers, outputs
from flaxauto.heads.base import Head
from flaxauto.heads.detection_losses import center_to_corners, detection_loss


class MLPPredictionHead(nnx.Module):
    """transformers' DetrMLPPredictionHead: `layers.0` .. `layers.{n-1}`, relu between them."""

    def __init__(self, in_features, hidden, out_features, num_layers, precision, rngs):
        widths = [in_features] + [hidden] * (num_layers - 1) + [out_features]
        self.layers = nnx.List(
            [
                layers.linear(a, b, ("embed", None), precision, rngs)
                for a, b in zip(widths[:-1], widths[1:], strict=True)
            ]
        )

    def __call__(self, x):
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = jax.nn.relu(x)
        return x


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The config attributes the detection loss reads (hashable: it is static in the graph)."""

    num_labels: int
    class_cost: float
    bbox_cost: float
    giou_cost: float
    eos_coefficient: float
    bbox_loss_coefficient: float
    giou_loss_coefficient: float

    @classmethod
    def from_config(cls, config) -> LossSettings:
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


class ObjectDetectionHead(Head):
    """*ForObjectDetection: `class_labels_classifier` (num_labels + 1 logits, the last being "no
    object") and `bbox_predictor` (a 3-layer MLP, sigmoid: normalised cx, cy, w, h) on each query
    token, the last `num_detection_tokens` of the backbone's sequence (YOLOS; DETR's decoder
    queries have their own head, heads/query_detection.py); with `labels`, transformers'
    detection loss."""

    def __init__(self, config, precision, rngs):
        hidden = config.hidden_size
        self.num_queries = config.num_detection_tokens
        self.auxiliary_loss = bool(getattr(config, "auxiliary_loss", False))
        self.loss_settings = LossSettings.from_config(config)
        self.class_labels_classifier = MLPPredictionHead(
            hidden, hidden, config.num_labels + 1, 3, precision, rngs
        )
        self.bbox_predictor = MLPPredictionHead(hidden, hidden, 4, 3, precision, rngs)

    def __call__(self, features, *, backbone, inputs, labels=None):
        queries = features.last_hidden_state[:, -self.num_queries :]  # [B, Q, E]
        logits = self.class_labels_classifier(queries)  # [B, Q, num_labels + 1]
        pred_boxes = jax.nn.sigmoid(self.bbox_predictor(queries))  # [B, Q, 4]
        loss = loss_dict = None
        if labels is not None:
            if self.auxiliary_loss:
                # transformers' YolosForObjectDetection fails here too: it applies the heads to
                # the tuple of hidden states and weighs by config.decoder_layers, which YOLOS lacks
                raise NotImplementedError(
                    "auxiliary_loss=True with labels (transformers' YOLOS cannot compute it either)"
                )
            loss, loss_dict = detection_loss(logits, pred_boxes, labels, self.loss_settings)
        return outputs.ObjectDetectionOutput(
            loss=loss,
            loss_dict=loss_dict,
            logits=logits,
            pred_boxes=pred_boxes,
            last_hidden_state=features.last_hidden_state,
            hidden_states=features.hidden_states,
            attentions=features.attentions,
        )


# --- post-processing ----------------------------------------------------------------------------


def post_process_object_detection(
    outputs, threshold: float = 0.5, target_sizes=None
) -> list[dict[str, np.ndarray]]:
    """transformers' DetrImageProcessor / YolosImageProcessor.post_process_object_detection on a
    flaxauto output (anything with `logits` [B, Q, C+1] and `pred_boxes` [B, Q, 4]).

    Each query's score is its best class probability (softmax over the classes, the no-object
    class left out of the arg max); queries above `threshold` are kept in query order. Boxes are
    corners (xmin, ymin, xmax, ymax), normalised, or in pixels when target_sizes gives each
    image's (height, width) ([B, 2] or a list of pairs). Returns one dict per image with
    "scores" [K], "labels" [K] and "boxes" [K, 4] (numpy).
    """
    logits = jnp.asarray(outputs["logits"])
    if target_sizes is not None and len(logits) != len(target_sizes):
        raise ValueError(
            "Make sure that you pass in as many target sizes as the batch dimension of the logits"
        )
    scores, labels, boxes = _scores_labels_boxes(logits, jnp.asarray(outputs["pred_boxes"]))
    scores, labels, boxes = np.asarray(scores), np.asarray(labels), np.asarray(boxes)
    if target_sizes is not None:
        sizes = np.asarray(target_sizes, np.float32).reshape(len(logits), 2)  # (height, width)
        heights, widths = sizes[:, 0], sizes[:, 1]
        scale = np.stack([widths, heights, widths, heights], axis=1)[:, None, :]
        boxes = boxes * scale
    results = []
    for image_scores, image_labels, image_boxes in zip(scores, labels, boxes, strict=True):
        keep = image_scores > threshold
        results.append(
            {"scores": image_scores[keep], "labels": image_labels[keep], "boxes": image_boxes[keep]}
        )
    return results


@jax.jit
def _scores_labels_boxes(logits, pred_boxes):
    """-> scores [B, Q], labels [B, Q], normalised corner boxes [B, Q, 4]."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., :-1]
    return jnp.max(probs, axis=-1), jnp.argmax(probs, axis=-1), center_to_corners(pred_boxes)


__all__ = ["MLPPredictionHead", "ObjectDetectionHead", "post_process_object_detection"]
