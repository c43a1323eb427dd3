"""object-detection: an image -> [{"score", "label", "box": {"xmin", "ymin", "xmax", "ymax"}}],
the boxes in the image's own pixels, as transformers' ObjectDetectionPipeline answers."""

from __future__ import annotations

import inspect

import numpy as np

from flaxauto.heads.detection import post_process_object_detection
from flaxauto.pipelines.base import Pipeline


class ObjectDetectionPipeline(Pipeline):
    """Each image goes through the checkpoint's image processor (which resizes it; YOLOS and DETR
    take any size), the model, and post_process_object_detection with the image's (height,
    width), keeping detections scoring above `threshold` (default 0.5), in query order.

    Images are not padded to a common size: YOLOS has no pixel mask, so padding would change its
    answer. Images of the same processed size share a batch (and a compiled program); each other
    size compiles its own."""

    task = "object-detection"
    processor_kind = "image_processor"
    output_fields = ("logits", "pred_boxes")
    padded_inputs = {}  # noqa: RUF012 (a ClassVar in Pipeline)

    def __init__(self, model, processor=None, **options):
        super().__init__(model, processor, **options)
        accepted = inspect.signature(type(model.backbone).__call__).parameters
        self.model_inputs = {"pixel_values", *({"pixel_mask"} & set(accepted))}

    def check_params(self, threshold=0.5, timeout=None):
        return {"threshold": threshold, "timeout": timeout}

    def is_single(self, inputs) -> bool:
        return not isinstance(inputs, (list, tuple)) and not hasattr(inputs, "__next__")

    def preprocess(self, item, timeout=None, **params):
        from transformers.image_utils import load_image

        if isinstance(item, np.ndarray):  # [H, W, 3] uint8, which transformers' loader refuses
            from PIL import Image

            item = Image.fromarray(item)
        image = load_image(item, timeout=timeout)  # PIL, as transformers' pipeline reads it
        processed = self.processor(images=[image], return_tensors="np")
        example = {k: np.asarray(v[0]) for k, v in processed.items() if k in self.model_inputs}
        return [example | {"_target_size": (image.height, image.width)}]

    def run_model(self, examples, **params):
        """Batches of up to batch_size examples of one shape, in input order."""
        results: list[dict | None] = [None] * len(examples)
        by_shape: dict[tuple, list[int]] = {}
        for index, example in enumerate(examples):
            by_shape.setdefault(example["pixel_values"].shape, []).append(index)
        for indices in by_shape.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                for index, result in zip(
                    chunk, self._run_batch([examples[i] for i in chunk]), strict=True
                ):
                    results[index] = result
        return results

    def postprocess(self, item, outputs, threshold=0.5, **params):
        output = outputs[0]
        found = post_process_object_detection(
            {"logits": output["logits"][None], "pred_boxes": output["pred_boxes"][None]},
            threshold,
            [output["_target_size"]],
        )[0]
        id2label = self.config.id2label
        return [
            {"score": float(score), "label": id2label[int(label)], "box": _box(box)}
            for score, label, box in zip(
                found["scores"], found["labels"], found["boxes"], strict=True
            )
        ]


def _box(corners: np.ndarray) -> dict[str, int]:
    # truncated toward zero, as torch's Tensor.int()
    xmin, ymin, xmax, ymax = (int(v) for v in corners.astype(np.int32))
    return {"xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax}


__all__ = ["ObjectDetectionPipeline"]
