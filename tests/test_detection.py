"""Detection post-processing and the object-detection pipeline against transformers': DETR's and
YOLOS' image processors' post_process_object_detection on the same logits and boxes, and
transformers' ObjectDetectionPipeline on a tiny YOLOS (labels identical, scores within 1e-4,
boxes identical)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers.modeling_outputs import ModelOutput

import flaxauto
from references import torch_model

TOLERANCE = 1e-4


def random_outputs(seed: int, batch=3, queries=7, classes=4):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((batch, queries, classes + 1)) * 2).astype(np.float32)
    boxes = rng.uniform(0.05, 0.95, size=(batch, queries, 4)).astype(np.float32)
    return {"logits": logits, "pred_boxes": boxes}


PROCESSORS = {
    "detr": transformers.DetrImageProcessorPil,
    "yolos": transformers.YolosImageProcessorPil,
}


@pytest.mark.parametrize("family", sorted(PROCESSORS))
@pytest.mark.parametrize(
    "target_sizes",
    [None, [(480, 640), (100, 37), (1, 1)], np.array([[480, 640], [100, 37], [20, 30]])],
    ids=["normalised", "list", "array"],
)
@pytest.mark.parametrize("threshold", [0.0, 0.4, 0.7])
def test_post_processing_equals_the_image_processors(family, target_sizes, threshold):
    found = random_outputs(0)
    torch_outputs = ModelOutput({k: torch.tensor(v) for k, v in found.items()})
    torch_sizes = target_sizes
    if isinstance(target_sizes, np.ndarray):
        torch_sizes = torch.tensor(target_sizes)
    theirs = PROCESSORS[family]().post_process_object_detection(
        torch_outputs, threshold=threshold, target_sizes=torch_sizes
    )
    ours = flaxauto.post_process_object_detection(found, threshold, target_sizes)
    assert len(ours) == len(theirs)
    for mine, reference in zip(ours, theirs, strict=True):
        assert np.array_equal(mine["labels"], reference["labels"].numpy())
        np.testing.assert_allclose(mine["scores"], reference["scores"].numpy(), atol=1e-6)
        np.testing.assert_allclose(mine["boxes"], reference["boxes"].numpy(), rtol=1e-6, atol=1e-5)


def test_post_processing_refuses_mismatched_target_sizes():
    with pytest.raises(ValueError, match="as many target sizes"):
        flaxauto.post_process_object_detection(random_outputs(1), 0.5, [(10, 10)])


def _images(count: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth random colour PIL images of different sizes and aspect ratios."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        height, width = rng.integers(20, 60, size=2)
        y, x = np.mgrid[0:height, 0:width] / max(height, width)
        phase = rng.uniform(0, 6, size=3)
        images.append(127.5 * (1 + np.sin(6 * x[..., None] + 4 * y[..., None] + phase)))
    return [Image.fromarray(image.astype(np.uint8)) for image in images]


def assert_same_detections(ours, theirs):
    assert len(ours) == len(theirs)
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine["label"] == reference["label"]
        assert mine["box"] == reference["box"]
        assert abs(mine["score"] - reference["score"]) <= TOLERANCE


def test_object_detection_pipeline_matches_transformers(tmp_path):
    id2label = {0: "cat", 1: "dog", 2: "remote"}
    model = torch_model("yolos", "object-detection", id2label=id2label)
    model.save_pretrained(tmp_path)
    # small images (multiples of 16 pixels, YOLOS' processor rounds down to them), as the tiny
    # model's 4-pixel patches make short sequences
    processor = transformers.YolosImageProcessorPil(size={"shortest_edge": 16, "longest_edge": 48})
    theirs = transformers.pipeline("object-detection", model=model, image_processor=processor)
    ours = flaxauto.pipeline(
        "object-detection", model=str(tmp_path), image_processor=processor, batch_size=2
    )
    images = _images(4)
    for params in ({"threshold": 0.0}, {"threshold": 0.4}, {}):
        expected = [theirs(image, **params) for image in images]
        assert sum(map(len, expected)) > 0
        found = ours(images, **params)
        for mine, reference in zip(found, expected, strict=True):
            assert_same_detections(mine, reference)
    assert_same_detections(ours(images[0], threshold=0.0), theirs(images[0], threshold=0.0))
    shapes = {processor(images=[i], return_tensors="np")["pixel_values"].shape for i in images}
    assert ours.compilations == len(shapes)  # one program per processed image size
    assert ours([]) == []


README = Path(__file__).parents[1] / "README.md"


def test_readme_detection_example_runs(tmp_path):
    """The README's example, executed on a tiny checkpoint (with COCO's 91 labels, which its
    training labels use) and a small image in place of the hub's: its detections are the image
    processor's post-processing of transformers' outputs, its loss transformers' loss."""
    model = torch_model("yolos", "object-detection", num_labels=91)
    model.save_pretrained(tmp_path)
    processor = transformers.YolosImageProcessorPil(size={"shortest_edge": 16, "longest_edge": 48})
    processor.save_pretrained(tmp_path)
    image_path = tmp_path / "image.png"
    _images(1)[0].save(image_path)
    found = re.search(
        r"<!-- detection-example:start -->\n```python\n(.*?)```", README.read_text(), re.S
    )
    assert found, "README.md lost its detection example markers"
    code = found.group(1).replace('"hustvl/yolos-tiny"', repr(str(tmp_path)))
    code = code.replace('"cats.jpg"', repr(str(image_path))).replace(
        "threshold=0.9", "threshold=0.02"
    )
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    image = namespace["image"]
    pixel_values = torch.tensor(namespace["pixel_values"])
    labels = [
        {"class_labels": torch.tensor([17, 75]),
         "boxes": torch.tensor([[0.3, 0.5, 0.4, 0.7], [0.6, 0.2, 0.1, 0.1]])}
    ]  # fmt: skip
    with torch.no_grad():
        theirs = model(pixel_values=pixel_values, labels=labels)
    expected = processor.post_process_object_detection(
        theirs, threshold=0.02, target_sizes=[(image.height, image.width)]
    )[0]
    assert len(expected["scores"]) > 0
    assert np.array_equal(namespace["found"]["labels"], expected["labels"].numpy())
    np.testing.assert_allclose(
        namespace["found"]["scores"], expected["scores"].numpy(), atol=TOLERANCE
    )
    np.testing.assert_allclose(namespace["found"]["boxes"], expected["boxes"].numpy(), atol=1e-3)
    assert abs(float(namespace["out"].loss) - float(theirs.loss)) <= TOLERANCE
    assert namespace["labels"][0]["valid"].tolist() == [True, True] + [False] * 18


def test_the_run_command_detects_in_image_files(tmp_path, capsys):
    """`flaxauto run object-detection MODEL image.png ...`: one JSON line per image, equal to
    transformers' pipeline on the same files."""
    from flaxauto.cli import main

    model = torch_model("yolos", "object-detection")
    model.save_pretrained(tmp_path)
    processor = transformers.YolosImageProcessorPil(size={"shortest_edge": 16, "longest_edge": 48})
    processor.save_pretrained(tmp_path)
    paths = []
    for index, image in enumerate(_images(2, seed=3)):
        paths.append(str(tmp_path / f"image{index}.png"))
        image.save(paths[-1])
    assert main(["run", "object-detection", str(tmp_path), *paths, "--param", "threshold=0.3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    theirs = transformers.pipeline("object-detection", model=model, image_processor=processor)
    assert len(lines) == len(paths)
    assert sum(len(json.loads(line)) for line in lines) > 0
    for line, path in zip(lines, paths, strict=True):
        assert_same_detections(json.loads(line), theirs(path, threshold=0.3))
