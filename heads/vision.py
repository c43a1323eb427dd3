"""Image and video classification heads: a pooled token (or the mean of all tokens, optionally
normalised) -> `classifier`; DeiT's pair of heads on the [CLS] and distillation tokens."""

from __future__ import annotations

import jax.numpy as jnp

from flaxauto import layers, outputs
from flaxauto.heads import losses
from flaxauto.heads.base import Head


def _extras(features) -> dict:
    return {"hidden_states": features.hidden_states, "attentions": features.attentions}


class ImageClassificationHead(Head):
    """transformers' *ForImageClassification / *ForVideoClassification: one vector per image,
    no dropout, `classifier` -> config.num_labels logits; the loss by config.problem_type
    (single-label, multi-label, regression), as transformers computes it.

    pooling: "first" (the [CLS] token's final state: ViT, DeiT), "pooler" (the backbone's
    pooler_output: BEiT) or "mean" (every token: VideoMAE); norm_eps: a LayerNorm `fc_norm`
    on the pooled vector (VideoMAE with use_mean_pooling)."""

    def __init__(self, config, precision, rngs, *, pooling: str, norm_eps: float | None = None):
        self.pooling = pooling
        self.problem_type = config.problem_type
        hidden = config.hidden_size
        if norm_eps is None:
            self.fc_norm = None
        else:
            self.fc_norm = layers.layer_norm(hidden, norm_eps, precision, rngs)
        self.classifier = layers.linear(hidden, config.num_labels, ("embed", None), precision, rngs)

    def pooled(self, features):
        if self.pooling == "first":
            return features.last_hidden_state[:, 0]
        if self.pooling == "pooler":
            return features.pooler_output
        if self.pooling == "mean":
            return jnp.mean(features.last_hidden_state, axis=1)
        raise NotImplementedError(f"pooling={self.pooling!r} is not implemented")

    def __call__(self, features, *, backbone, inputs, labels=None):
        pooled = self.pooled(features)  # [B, E]
        if self.fc_norm is not None:
            pooled = self.fc_norm(pooled)
        logits = self.classifier(pooled)  # [B, num_labels]
        loss = None
        if labels is not None:
            loss = losses.sequence_classification_loss(logits, labels, self.problem_type)
        return outputs.ImageClassifierOutput(logits=logits, loss=loss, **_extras(features))


class DistilledImageClassificationHead(Head):
    """DeiTForImageClassificationWithTeacher: `cls_classifier` on the [CLS] token and
    `distillation_classifier` on the distillation token (position 1); logits is their mean.
    Inference only, as in transformers: it takes no labels."""

    label_names = ()

    def __init__(self, config, precision, rngs):
        hidden, labels = config.hidden_size, config.num_labels
        self.cls_classifier = layers.linear(hidden, labels, ("embed", None), precision, rngs)
        self.distillation_classifier = layers.linear(
            hidden, labels, ("embed", None), precision, rngs
        )

    def __call__(self, features, *, backbone, inputs):
        hidden = features.last_hidden_state  # [B, T, E]
        cls_logits = self.cls_classifier(hidden[:, 0])
        distillation_logits = self.distillation_classifier(hidden[:, 1])
        return outputs.DistilledImageClassifierOutput(
            logits=(cls_logits + distillation_logits) / 2,
            cls_logits=cls_logits,
            distillation_logits=distillation_logits,
            **_extras(features),
        )


__all__ = ["DistilledImageClassificationHead", "ImageClassificationHead"]
