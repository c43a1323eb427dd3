"""DeiT (transformers' DeiTModel): ViT with a distillation token after [CLS], so two tokens
before the patches and two kept positions when the table is interpolated.

AutoModelForImageClassification serves the class transformers' Auto class picks: the one the
config's `architectures` names, else DeiTForImageClassification (a classifier on [CLS], with a
loss). Distilled checkpoints (facebook/deit-*-distilled-*) name
DeiTForImageClassificationWithTeacher: two classifiers, on [CLS] and on the distillation token,
whose logits are averaged (inference only, no labels). Pass
`architectures=["DeiTForImageClassificationWithTeacher"]` to from_pretrained / set it on the
config to ask for that one on any checkpoint.
"""

from __future__ import annotations

from flaxauto.heads import DistilledImageClassificationHead, ImageClassificationHead
from flaxauto.models.vit import (
    CONFIG_ATTRIBUTES,
    NO_POOLER,
    ViTEmbeddings,
    ViTModel,
    hub_name,
    torch_name,
)
from flaxauto.registry import HeadSpec, register

WITH_TEACHER = "DeiTForImageClassificationWithTeacher"


class DeiTEmbeddings(ViTEmbeddings):
    token_names = ("cls_token", "distillation_token")


class DeiTModel(ViTModel):
    embeddings_class = DeiTEmbeddings


def image_classification_head(config, precision, rngs):
    """The head of the class transformers' AutoModelForImageClassification builds for this
    config (see the module docstring)."""
    if WITH_TEACHER in (config.architectures or ()):
        return DistilledImageClassificationHead(config, precision, rngs)
    return ImageClassificationHead(config, precision, rngs, pooling="first")


register(
    model_types=("deit",),
    backbone=DeiTModel,
    base_model_prefix="deit",
    main_input_name="pixel_values",
    optional_modules=("pooler",),
    renames=hub_name,
    torch_names=torch_name,
    config_attributes=(*CONFIG_ATTRIBUTES, "qkv_bias", "pooler_output_size", "pooler_act"),
    heads={
        "base": HeadSpec(None),
        "image-classification": HeadSpec(image_classification_head, backbone_options=NO_POOLER),
    },
)
