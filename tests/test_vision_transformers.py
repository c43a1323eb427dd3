"""ViT, DeiT, BEiT and VideoMAE beyond the conformance suite's one config each: other image
sizes (interpolated positions, resized relative tables), the config variants (shared relative
bias, absolute positions, the [CLS] path, no layer scale, no query/value bias), DeiT's
distillation head, every problem type's loss, and transformers' image processor feeding flaxauto.
Every number comes from the live transformers PyTorch model on the same weights."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import flaxauto
from flaxauto.converters.layout import export_tensors
from references import max_diff, run_torch, task_inputs, tiny_config, to_torch, torch_model

TOLERANCE = 1e-4


def _load(model, tmp_path, auto_class, **options):
    model.save_pretrained(tmp_path)
    return auto_class.from_pretrained(tmp_path, **options)


def _assert_close(ours, theirs, fields):
    for field in fields:
        diff = max_diff(getattr(ours, field), getattr(theirs, field))
        assert diff <= TOLERANCE, f"{field}: max |diff| {diff:.2e}"


def _pixels(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("model_type", ["vit", "deit"])
def test_interpolate_pos_encoding_at_another_image_size(model_type, tmp_path):
    """Positions resized bicubically as torch interpolates them (24 x 20 pixels: a 6 x 5 grid
    from the 4 x 4 table), and the same size refused without the flag, as in transformers."""
    reference = torch_model(model_type, "image-classification")
    ours = _load(reference, tmp_path, flaxauto.AutoModelForImageClassification)
    pixels = {"pixel_values": _pixels((2, 3, 24, 20))}
    theirs = run_torch(reference, pixels, interpolate_pos_encoding=True)
    _assert_close(ours(**pixels, interpolate_pos_encoding=True), theirs, ["logits"])
    with pytest.raises(ValueError, match="doesn't match model"):
        ours(**pixels)


BEIT_VARIANTS = {
    # one table shared by every layer, absolute positions, no layer scale, the [CLS] path
    "shared-absolute-cls": dict(
        use_shared_relative_position_bias=True, use_absolute_position_embeddings=True,
        layer_scale_init_value=0.0, use_mean_pooling=False,
    ),
    # a table per layer and a shared one together
    "both-biases": dict(use_shared_relative_position_bias=True),
}  # fmt: skip


@pytest.mark.parametrize("variant", list(BEIT_VARIANTS))
def test_beit_variants(variant, tmp_path):
    reference = torch_model("beit", "image-classification", **BEIT_VARIANTS[variant])
    ours = _load(reference, tmp_path, flaxauto.AutoModelForImageClassification)
    inputs = task_inputs("beit", "image-classification", config=reference.config)
    labels = {"labels": np.array([0, 2, 1, 1])}
    _assert_close(
        ours(**inputs, **labels), run_torch(reference, {**inputs, **labels}), ["logits", "loss"]
    )
    reloaded = type(reference).from_pretrained(_resaved(ours, tmp_path))
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, reference.state_dict()[name]), name


def _resaved(model, tmp_path):
    out = tmp_path / "resaved"
    model.save_pretrained(out)
    return out


def test_beit_at_another_image_size_resizes_its_tables(tmp_path):
    """Absolute positions (bicubic) and every relative table (bilinear) follow a 24 x 24 image."""
    overrides = dict(use_shared_relative_position_bias=True, use_absolute_position_embeddings=True)
    reference = torch_model("beit", "base", **overrides)
    ours = _load(reference, tmp_path, flaxauto.AutoModel)
    pixels = {"pixel_values": _pixels((2, 3, 24, 24))}
    _assert_close(
        ours(**pixels), run_torch(reference, pixels), ["last_hidden_state", "pooler_output"]
    )


@pytest.mark.parametrize("overrides", [dict(use_mean_pooling=False), dict(qv_bias=False)])
def test_videomae_variants(overrides, tmp_path):
    reference = torch_model("videomae", "video-classification", **overrides)
    ours = _load(reference, tmp_path, flaxauto.AutoModelForVideoClassification)
    inputs = task_inputs("videomae", "video-classification", config=reference.config)
    _assert_close(ours(**inputs), run_torch(reference, inputs), ["logits"])


def test_deit_with_teacher_follows_the_config_architectures(tmp_path):
    """A distilled checkpoint names DeiTForImageClassificationWithTeacher: transformers' Auto
    class builds that, and so does flaxauto (averaged logits, both heads' logits, no labels);
    save_pretrained keeps the architecture."""
    reference = torch_model("deit", "image-classification")
    teacher_class = transformers.DeiTForImageClassificationWithTeacher
    torch.manual_seed(0)
    teacher = teacher_class(reference.config).eval()
    teacher.save_pretrained(tmp_path)
    auto = transformers.AutoModelForImageClassification.from_pretrained(tmp_path)
    assert type(auto) is teacher_class
    ours = flaxauto.AutoModelForImageClassification.from_pretrained(tmp_path)
    inputs = task_inputs("deit", "image-classification", config=reference.config)
    fields = ["logits", "cls_logits", "distillation_logits"]
    _assert_close(ours(**inputs), run_torch(teacher, inputs), fields)
    with pytest.raises(TypeError, match="labels"):
        ours(**inputs, labels=np.zeros(4, np.int64))
    reloaded = transformers.AutoModelForImageClassification.from_pretrained(
        _resaved(ours, tmp_path)
    )
    assert type(reloaded) is teacher_class
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, teacher.state_dict()[name]), name


@pytest.mark.parametrize(
    "problem_type, num_labels",
    [("multi_label_classification", 3), ("regression", 1), ("regression", 3)],
)
def test_image_classification_loss_by_problem_type(problem_type, num_labels, tmp_path):
    reference = torch_model(
        "vit", "image-classification", problem_type=problem_type, num_labels=num_labels
    )
    ours = _load(reference, tmp_path, flaxauto.AutoModelForImageClassification)
    inputs = task_inputs("vit", "image-classification", config=reference.config)
    rng = np.random.default_rng(3)
    if problem_type == "multi_label_classification":
        labels = rng.integers(0, 2, size=(4, num_labels)).astype(np.float32)
    else:
        labels = rng.standard_normal((4, num_labels) if num_labels > 1 else (4,)).astype(np.float32)
    theirs = run_torch(reference, {**inputs, "labels": labels})
    _assert_close(ours(**inputs, labels=labels), theirs, ["logits", "loss"])


def test_image_processor_output_feeds_flaxauto(tmp_path):
    """transformers' ViTImageProcessorPil (numpy/PIL, no torch) on a real image array -> the same
    pixel_values give flaxauto's and PyTorch's logits alike."""
    reference = torch_model("vit", "image-classification")
    ours = _load(reference, tmp_path, flaxauto.AutoModelForImageClassification)
    height, width = 48, 64
    rows, cols = np.mgrid[0:height, 0:width]
    checker = ((rows // 8 + cols // 8) % 2) * 255
    image = np.stack([cols * 255 // width, rows * 255 // height, checker], -1).astype(np.uint8)
    processor = transformers.ViTImageProcessorPil(size={"height": 16, "width": 16})
    pixel_values = processor(images=[image, image[::-1]], return_tensors="np")["pixel_values"]
    assert pixel_values.shape == (2, 3, 16, 16)
    theirs = run_torch(reference, {"pixel_values": pixel_values})
    _assert_close(ours(pixel_values=pixel_values), theirs, ["logits"])


def test_attention_mask_over_tokens(tmp_path):
    """ViT's forward takes an attention_mask over [CLS] + patches, as transformers' does."""
    reference = torch_model("vit", "base")
    ours = _load(reference, tmp_path, flaxauto.AutoModel)
    inputs = task_inputs("vit", "base", config=reference.config)
    mask = np.ones((4, 17), np.int64)
    mask[1, 9:] = 0
    theirs = run_torch(reference, {**inputs, "attention_mask": mask})
    _assert_close(ours(**inputs, attention_mask=mask), theirs, ["last_hidden_state"])


def test_unimplemented_settings_are_refused():
    config = transformers.BeitConfig(use_mask_token=True)
    with pytest.raises(NotImplementedError, match="use_mask_token"):
        flaxauto.AutoModel.from_config(config)
    config = transformers.ViTConfig(head_dim=32)  # transformers' ViT would use 12 x 32
    with pytest.raises(NotImplementedError, match="head_dim=32"):
        flaxauto.AutoModel.from_config(config)


def test_pmap_data_parallel(tmp_path):
    """Images split over 4 devices under jax.pmap with replicated state, as old Flax scripts ran."""
    reference = torch_model("vit", "image-classification")
    ours = _load(reference, tmp_path, flaxauto.AutoModelForImageClassification)
    graphdef, state = nnx.split(ours)
    devices = jax.local_devices()[:4]
    inputs = task_inputs("vit", "image-classification", config=reference.config)
    per_device = inputs["pixel_values"].reshape(len(devices), -1, *inputs["pixel_values"].shape[1:])
    forward = jax.pmap(lambda state, x: nnx.merge(graphdef, state)(pixel_values=x).logits)
    logits = forward(flaxauto.sharding.replicate(state, devices), per_device)
    expected = run_torch(reference, inputs).logits
    assert max_diff(np.asarray(logits).reshape(expected.shape), expected) <= TOLERANCE


def test_beit_refuses_training_scanned_layers_with_drop_path():
    """Drop path's rate grows with depth; scanned layers would share layer 0's. Eval is fine."""
    config = tiny_config("beit", drop_path_rate=0.2)
    model = flaxauto.AutoModel.from_config(config, scan_layers=True)
    inputs = task_inputs("beit", "base", config=config)
    assert np.isfinite(np.asarray(model(**inputs).last_hidden_state)).all()
    model.train()
    with pytest.raises(NotImplementedError, match="drop_path_rate=0.2 and scan_layers"):
        model(**inputs)


@pytest.mark.parametrize(
    "model_type, task",
    [("vit", "image-classification"), ("beit", "image-classification"),
     ("videomae", "video-classification")],
)  # fmt: skip
def test_loss_and_every_gradient_match_pytorch_autograd(model_type, task, tmp_path):
    reference = torch_model(model_type, task)
    auto = getattr(flaxauto, flaxauto.registry.TASK_AUTO_CLASSES[task])
    ours = _load(reference, tmp_path, auto)
    batch = {
        **task_inputs(model_type, task, config=reference.config),
        "labels": np.array([0, 2, 1, 1]),
    }
    reference(**to_torch(batch)).loss.backward()
    loss, grads = nnx.value_and_grad(lambda model: model(**batch).loss)(ours)
    assert max_diff(loss, reference(**to_torch(batch)).loss.detach()) <= TOLERANCE
    nnx.update(ours, grads)  # the model now holds its gradients where its weights were
    ours_by_name = dict(export_tensors(ours))
    checked = 0
    for name, parameter in reference.named_parameters():
        expected = parameter.grad.numpy()
        got = ours_by_name[ours.family.renames(name)]
        scale = max(1.0, float(np.max(np.abs(expected))))
        assert float(np.max(np.abs(got - expected))) <= TOLERANCE * scale, name
        checked += 1
    assert checked == len(ours_by_name)
