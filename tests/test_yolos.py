"""YOLOS beyond the conformance suite (which runs it at the config's image size): other image
sizes, whose position tables (initial and mid) transformers resizes bicubically; the model without
mid position tables; the refusal of what transformers cannot compute either."""

from __future__ import annotations

import numpy as np
import pytest
from test_gradients import NOISE_FLOOR, RELATIVE, flaxauto_gradients, torch_gradients

import flaxauto
from flaxauto.models.yolos import hub_name
from references import max_diff, run_torch, save_bin, task_inputs, task_labels, torch_model

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    model = torch_model("yolos", "object-detection")
    root = tmp_path_factory.mktemp("yolos")
    model.save_pretrained(root)
    return model, flaxauto.AutoModelForObjectDetection.from_pretrained(root)


# the config's grid is 4 x 6 patches (16 x 24 pixels, patch 4): larger, smaller, square, and
# sizes that are no multiple of the patch (the patch convolution drops the rest)
@pytest.mark.parametrize("size", [(20, 28), (12, 16), (16, 16), (23, 30)])
def test_other_image_sizes_resize_the_positions_as_transformers(detector, size):
    theirs_model, ours_model = detector
    pixels = np.random.default_rng(0).standard_normal((2, 3, *size)).astype(np.float32)
    inputs = {"pixel_values": pixels}
    labels = task_labels(theirs_model, "object-detection", inputs)
    theirs = run_torch(theirs_model, {**inputs, **labels})
    ours = ours_model(**inputs, **labels)
    for field in ("logits", "pred_boxes", "last_hidden_state", "loss"):
        diff = max_diff(getattr(ours, field), getattr(theirs, field))
        assert diff <= TOLERANCE, f"{field}: max |diff| {diff:.2e}"


def test_without_mid_position_embeddings(tmp_path):
    theirs_model = torch_model("yolos", "base", use_mid_position_embeddings=False)
    theirs_model.save_pretrained(tmp_path)
    ours_model = flaxauto.AutoModel.from_pretrained(tmp_path)
    assert ours_model.backbone.encoder.mid_position_embeddings is None
    pixels = np.random.default_rng(1).standard_normal((2, 3, 20, 20)).astype(np.float32)
    theirs = run_torch(theirs_model, {"pixel_values": pixels})
    ours = ours_model(pixel_values=pixels)
    for field in ("last_hidden_state", "pooler_output"):
        assert max_diff(getattr(ours, field), getattr(theirs, field)) <= TOLERANCE, field


def test_auxiliary_loss_with_labels_is_refused(tmp_path):
    torch_model("yolos", "object-detection", auxiliary_loss=True).save_pretrained(tmp_path)
    model = flaxauto.AutoModelForObjectDetection.from_pretrained(tmp_path)
    pixels = np.zeros((1, 3, 16, 24), np.float32)
    assert model(pixel_values=pixels).logits.shape == (1, 5, 4)  # inference is unaffected
    labels = [{"class_labels": np.array([1]), "boxes": np.array([[0.5, 0.5, 0.2, 0.2]])}]
    with pytest.raises(NotImplementedError, match="auxiliary_loss"):
        model(pixel_values=pixels, labels=labels)


def test_transformers_5_in_memory_names_load(detector, tmp_path):
    """A torch.save(state_dict()) file carries encoder.interpolation.mid_position_embeddings."""
    theirs_model, ours_model = detector
    state = theirs_model.state_dict()
    assert any("interpolation.mid_position_embeddings" in name for name in state)
    loaded = flaxauto.AutoModelForObjectDetection.from_pretrained(save_bin(theirs_model, tmp_path))
    pixels = np.random.default_rng(2).standard_normal((1, 3, 16, 24)).astype(np.float32)
    assert max_diff(loaded(pixel_values=pixels).logits, ours_model(pixel_values=pixels).logits) == 0


def test_loss_and_every_gradient_equal_pytorch_autograd(tmp_path):
    """test_gradients.py's check, with PyTorch's in-memory names mapped to the checkpoint names
    (encoder.interpolation.mid_position_embeddings) through the family's renames."""
    reference = torch_model("yolos", "object-detection")
    reference.save_pretrained(tmp_path)
    inputs = task_inputs("yolos", "object-detection", config=reference.config)
    batch = {**inputs, **task_labels(reference, "object-detection", inputs)}
    model = flaxauto.AutoModelForObjectDetection.from_pretrained(tmp_path)
    torch_loss, theirs = torch_gradients(reference, batch)
    loss, ours = flaxauto_gradients(model, batch)
    assert abs(loss - torch_loss) <= RELATIVE * max(1.0, abs(torch_loss))
    theirs = {hub_name(names[0]): gradient for names, gradient in theirs.items()}
    assert set(theirs) == set(ours)
    assert sum(bool(np.any(g)) for g in theirs.values()) > len(theirs) // 2
    # a gradient zero in exact arithmetic (a key bias) is float noise: compared against a share
    # of the largest gradient
    floor = NOISE_FLOOR * max(float(np.max(np.abs(g))) for g in theirs.values())
    for name, expected in theirs.items():
        scale = max(float(np.max(np.abs(expected))), floor)
        diff = max_diff(ours[name], expected)
        assert diff <= RELATIVE * scale, f"{name}: max |diff| {diff:.2e}, scale {scale:.2e}"
