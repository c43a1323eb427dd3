"""Object detection on a decoder's object queries (DETR and its kin): `class_labels_classifier`
(num_labels + 1 logits, the last "no object") and `bbox_predictor` (a 3-layer ReLU MLP, sigmoid:
normalised center x, center y, width, height) on every query, and with `labels` transformers'
set-prediction loss, auxiliary losses over the intermediate decoder layers included."""

from __future__ import annotations

import jax

from flaxauto import layers, outputs
from flaxauto.heads.base import Head
from flaxauto.heads.detection import LossSettings, MLPPredictionHead
from flaxauto.heads.detection_losses import detection_loss


class DetrDetectionHead(Head):
    """DetrForObjectDetection's heads. labels: one dict per image with `class_labels` [n] and
    normalised `boxes` [n, 4] (see heads.detection_losses)."""

    def __init__(self, config, precision, rngs):
        d = config.d_model
        self.loss_settings = LossSettings.from_config(config)
        self.class_labels_classifier = layers.linear(
            d, config.num_labels + 1, ("embed", None), precision, rngs
        )
        self.bbox_predictor = MLPPredictionHead(d, d, 4, 3, precision, rngs)
        self.auxiliary = bool(config.auxiliary_loss)

    def predict(self, hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[..., Q, E] -> logits [..., Q, num_labels + 1], boxes [..., Q, 4]."""
        return self.class_labels_classifier(hidden), jax.nn.sigmoid(self.bbox_predictor(hidden))

    def __call__(self, features, *, backbone, inputs, labels=None):
        logits, boxes = self.predict(features.last_hidden_state)
        loss = loss_dict = auxiliary_outputs = None
        if labels is not None:
            loss, loss_dict, auxiliary_outputs = self.loss(logits, boxes, features, labels)
        return outputs.DetrObjectDetectionOutput(
            loss=loss,
            loss_dict=loss_dict,
            logits=logits,
            pred_boxes=boxes,
            auxiliary_outputs=auxiliary_outputs,
            last_hidden_state=features.last_hidden_state,
            decoder_hidden_states=features.decoder_hidden_states,
            decoder_attentions=features.decoder_attentions,
            cross_attentions=features.cross_attentions,
            encoder_last_hidden_state=features.encoder_last_hidden_state,
            encoder_hidden_states=features.encoder_hidden_states,
            encoder_attentions=features.encoder_attentions,
        )

    def loss(self, logits, boxes, features, labels):
        """(loss, loss_dict, auxiliary_outputs) as transformers' ForObjectDetectionLoss; the
        auxiliary outputs are every decoder layer's but the last, through the heads."""
        auxiliary = None
        if self.auxiliary:
            all_logits, all_boxes = self.predict(features.intermediate_hidden_states)  # [L, ...]
            auxiliary = [
                {"logits": all_logits[i], "pred_boxes": all_boxes[i]}
                for i in range(all_logits.shape[0] - 1)
            ]
        loss, loss_dict = detection_loss(logits, boxes, labels, self.loss_settings, auxiliary)
        return loss, loss_dict, auxiliary


__all__ = ["DetrDetectionHead"]
