"""The convolutional image families (ResNet, RegNet, ConvNeXt) beyond the conformance suite:
config variants and problem types against live transformers, BatchNorm in training and eval mode
against PyTorch's (running statistics, momentum, num_batches_tracked), drop path, refusals."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

import flaxauto
from flaxauto.converters.layout import export_tensors
from references import max_diff, run_torch, task_inputs, tiny_config, torch_model

TOLERANCE = 1e-4
TASK = "image-classification"

#: (model_type, config overrides, problem type): each layer kind and downsampling switch once,
#: with the problem types the conformance suite's integer labels do not reach
VARIANTS = [
    ("resnet", dict(layer_type="basic", downsample_in_first_stage=True), "multi_label"),
    ("resnet", dict(downsample_in_bottleneck=True, num_labels=1), "regression"),
    ("regnet", dict(layer_type="x", downsample_in_first_stage=False), "multi_label"),
    ("convnext", dict(layer_scale_init_value=0.0, problem_type="regression"), "regression"),
]


def _labels(problem: str, num_labels: int, rng) -> np.ndarray:
    if problem == "multi_label":
        return rng.integers(0, 2, size=(4, num_labels)).astype(np.float32)
    shape = (4,) if num_labels == 1 else (4, num_labels)
    return rng.standard_normal(shape).astype(np.float32)


def _odd_pixels(config, rng) -> np.ndarray:
    """A size the strides do not divide (max pool and conv padding at the borders)."""
    size = 2 * getattr(config, "image_size", 16) + 3
    return rng.standard_normal((4, config.num_channels, size, size)).astype(np.float32)


@pytest.mark.parametrize(
    ("model_type", "overrides", "problem"), VARIANTS, ids=[f"{v[0]}-{v[2]}" for v in VARIANTS]
)
def test_variants_match_transformers(model_type, overrides, problem, tmp_path):
    reference = torch_model(model_type, TASK, **overrides)
    reference.save_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    batch = {
        "pixel_values": _odd_pixels(reference.config, rng),
        "labels": _labels(problem, reference.config.num_labels, rng),
    }
    theirs = run_torch(reference, batch, output_hidden_states=True)
    model = flaxauto.AutoModelForImageClassification.from_pretrained(tmp_path)
    ours = model(**batch, output_hidden_states=True)
    assert max_diff(ours.logits, theirs.logits) <= TOLERANCE
    assert max_diff(ours.loss, theirs.loss) <= TOLERANCE
    assert len(ours.hidden_states) == len(theirs.hidden_states)
    for a, b in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        assert a.shape == b.shape and max_diff(a, b) <= TOLERANCE

    base = flaxauto.AutoModel.from_pretrained(tmp_path)
    base_ref = getattr(reference, reference.base_model_prefix)
    pixels = {"pixel_values": batch["pixel_values"]}
    out, ref = base(**pixels), run_torch(base_ref, pixels)
    for field in ("last_hidden_state", "pooler_output"):
        assert getattr(out, field).shape == getattr(ref, field).shape
        assert max_diff(getattr(out, field), getattr(ref, field)) <= TOLERANCE


def _statistics(tensors) -> dict[str, np.ndarray]:
    keys = ("running_mean", "running_var", "num_batches_tracked")
    return {name: np.asarray(value) for name, value in tensors if name.endswith(keys)}


def _train_step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(lambda m: m(**batch).loss)(model)
    optimizer.update(model, grads)
    return loss


@pytest.mark.parametrize("model_type", ["resnet", "regnet"])
def test_a_training_step_updates_weights_and_statistics_as_pytorch(model_type, tmp_path):
    """One SGD step under nnx.jit in train mode: the loss (batch statistics normalise), every
    updated weight (so every gradient) and every running statistic (momentum 0.1, the unbiased
    variance, the counter) equal PyTorch's; save_pretrained writes them for transformers."""
    reference = torch_model(model_type, TASK)
    reference.save_pretrained(tmp_path / "start")
    batch = task_inputs(model_type, TASK, config=reference.config)
    batch["labels"] = np.random.default_rng(1).integers(0, 3, size=len(batch["pixel_values"]))
    before = {k: v.clone() for k, v in reference.state_dict().items()}

    reference.train()
    torch_loss = reference(**{k: torch.as_tensor(v) for k, v in batch.items()}).loss
    torch_loss.backward()
    torch.optim.SGD(reference.parameters(), lr=1.0).step()
    after = reference.state_dict()

    model = flaxauto.AutoModelForImageClassification.from_pretrained(tmp_path / "start")
    model.train()
    optimizer = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)
    loss = nnx.jit(_train_step)(model, optimizer, batch)
    assert max_diff(loss, torch_loss.detach()) <= TOLERANCE

    model.save_pretrained(tmp_path / "trained")
    saved = safetensors.numpy.load_file(tmp_path / "trained" / "model.safetensors")
    stats = _statistics(saved.items())
    assert stats and all(saved[n].dtype == np.int64 and saved[n] == 1 for n in stats
                         if n.endswith("num_batches_tracked"))  # fmt: skip
    reloaded = type(reference).from_pretrained(tmp_path / "trained").state_dict()
    for name, tensor in after.items():
        assert not torch.equal(tensor, before[name]), name  # the step moved it
        assert max_diff(reloaded[name], tensor) <= TOLERANCE, name


def test_eval_mode_reads_the_running_statistics_and_leaves_them(tmp_path):
    """model.eval() after training normalises with the (updated) running statistics, as
    PyTorch's eval(), and a forward leaves them bit for bit."""
    reference = torch_model("resnet", TASK)
    reference.save_pretrained(tmp_path)
    model = flaxauto.AutoModelForImageClassification.from_pretrained(tmp_path)
    batch = task_inputs("resnet", TASK, config=reference.config)
    reference.train()
    run_torch(reference, batch)  # one training-mode forward moves the statistics
    model.train()
    model(**batch)
    reference.eval()
    model.eval()
    updated = _statistics(export_tensors(model))
    forward = nnx.jit(lambda m, x: m(pixel_values=x).logits)
    logits = forward(model, batch["pixel_values"])
    assert max_diff(logits, run_torch(reference, batch).logits) <= TOLERANCE
    for name, value in _statistics(export_tensors(model)).items():
        assert np.array_equal(value, updated[name]), name


def test_checkpoints_without_num_batches_tracked_load_and_count_from_zero(tmp_path, caplog):
    """Older checkpoints carry no counters: nothing is reported missing, the counters start at
    0 and count training batches; a save writes them (int64) for transformers."""
    reference = torch_model("resnet", "base")
    reference.save_pretrained(tmp_path / "full")
    tensors = safetensors.numpy.load_file(tmp_path / "full" / "model.safetensors")
    kept = {k: v for k, v in tensors.items() if not k.endswith("num_batches_tracked")}
    assert len(kept) < len(tensors)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text((tmp_path / "full" / "config.json").read_text())
    safetensors.numpy.save_file(kept, tmp_path / "old" / "model.safetensors", {"format": "pt"})

    model, info = flaxauto.AutoModel.from_pretrained(tmp_path / "old", output_loading_info=True)
    assert not info["missing_keys"] and "newly initialised" not in caplog.text
    batch = task_inputs("resnet", "base", config=reference.config)
    model.train()
    model(**batch)
    model(**batch)
    model.save_pretrained(tmp_path / "saved")
    saved = safetensors.numpy.load_file(tmp_path / "saved" / "model.safetensors")
    counters = [saved[k] for k in tensors if k.endswith("num_batches_tracked")]
    assert counters and all(c.dtype == np.int64 and c == 2 for c in counters)


def test_convnext_drop_path_is_stochastic_in_training_and_off_in_eval(tmp_path):
    reference = torch_model("convnext", "base", drop_path_rate=0.5)
    reference.save_pretrained(tmp_path)
    model = flaxauto.AutoModel.from_pretrained(tmp_path)
    batch = task_inputs("convnext", "base", config=reference.config)
    evaluated = model(**batch).last_hidden_state
    assert max_diff(evaluated, run_torch(reference, batch).last_hidden_state) <= TOLERANCE
    model.train()
    first, second = (model(**batch).last_hidden_state for _ in range(2))
    assert max_diff(first, evaluated) > 1e-2 and max_diff(first, second) > 1e-2


@pytest.mark.parametrize("model_type", ["resnet", "regnet", "convnext"])
def test_refusals(model_type, tmp_path):
    """Layer stacks that differ layer by layer do not scan; a wrong channel count is named."""
    torch_model(model_type, "base").save_pretrained(tmp_path)
    with pytest.raises(NotImplementedError, match="scan_layers=True"):
        flaxauto.AutoModel.from_pretrained(tmp_path, scan_layers=True)
    model = flaxauto.AutoModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="channel dimension"):
        model(pixel_values=np.zeros((1, 4, 16, 16), np.float32))


def test_from_config_draws_conv_kernels_as_transformers():
    """kaiming_normal_(mode="fan_out"): each conv kernel's spread matches a freshly initialised
    PyTorch model's (both N(0, 2 / fan_out), so their sample deviations agree within noise)."""
    config = tiny_config("resnet")
    torch.manual_seed(0)
    fresh = transformers.AutoModel.from_config(config).state_dict()
    ours = dict(export_tensors(flaxauto.AutoModel.from_config(config, seed=0)))
    kernels = [n for n, t in fresh.items() if t.ndim == 4 and t.numel() >= 500]
    assert kernels
    for name in kernels:
        ratio = float(np.std(ours[name])) / float(fresh[name].std())
        assert 0.85 < ratio < 1.15, (name, ratio)


def test_pmap_data_parallel_in_eval_mode(tmp_path):
    """jax.pmap over replicated state: each device normalises its images with the running
    statistics, so the per-device logits are PyTorch's eval logits."""
    reference = torch_model("resnet", TASK)
    reference.save_pretrained(tmp_path)
    model = flaxauto.AutoModelForImageClassification.from_pretrained(tmp_path)
    graphdef, state = nnx.split(model)
    devices = jax.local_devices()[:4]
    pixels = task_inputs("resnet", TASK, config=reference.config)["pixel_values"]  # batch 4
    forward = jax.pmap(lambda state, x: nnx.merge(graphdef, state)(pixel_values=x).logits)
    logits = forward(flaxauto.sharding.replicate(state, devices), pixels[:, None])
    expected = run_torch(reference, {"pixel_values": pixels}).logits
    assert max_diff(np.asarray(logits).reshape(expected.shape), expected) <= TOLERANCE
