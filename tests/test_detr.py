"""DETR beyond the conformance suite: timm-named checkpoints (built here from transformers' own
model and the family's name table; timm is not installed), timm's dilation (DC5), auxiliary
decoder outputs, learned positions, and the name table itself."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from safetensors.torch import save_file

import flaxauto
from flaxauto.converters.layout import parameter_slots
from flaxauto.models import detr
from references import (
    INITIALIZER_RANGE,
    max_diff,
    run_torch,
    task_inputs,
    task_labels,
    to_numpy,
    to_torch,
    torch_model,
)

TOLERANCE = 1e-4

#: the tiny transformer of every model here (the backbone varies)
TRANSFORMER = dict(
    d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, num_queries=5, num_labels=3,
    init_std=INITIALIZER_RANGE,
)  # fmt: skip


def timm_twin(layer_type: str, depths, **overrides):
    """transformers' DETR on its own ResNet shaped as a timm ResNet (stem 64, stage widths
    64..512 basic / 256..2048 bottleneck, all four stages)."""
    widths = [64, 128, 256, 512] if layer_type == "basic" else [256, 512, 1024, 2048]
    backbone = dict(
        model_type="resnet", embedding_size=64, hidden_sizes=widths, depths=list(depths),
        layer_type=layer_type, out_features=["stage4"],
    )  # fmt: skip
    return torch_model(
        "detr", "object-detection", use_timm_backbone=False, backbone=None,
        backbone_config=backbone, **{**TRANSFORMER, **overrides},
    )  # fmt: skip


def write_timm_checkpoint(model, directory, timm_backbone: str, **config) -> dict:
    """model's tensors with its backbone renamed into timm's names (by the family's table) and
    a config with use_timm_backbone=True, as hub DETR checkpoints are. -> the tensors."""
    prefix = "model.backbone.conv_encoder."
    tensors = {}
    for name, tensor in model.state_dict().items():
        name = detr.hub_name(name)
        if name.startswith(prefix):
            name = prefix + detr.timm_name(name[len(prefix) :])
        tensors[name] = tensor.contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    settings = {k: v for k, v in model.config.to_dict().items() if k != "backbone_config"}
    settings.update(use_timm_backbone=True, backbone=timm_backbone, backbone_config=None, **config)
    (directory / "config.json").write_text(json.dumps(settings))
    return tensors


def jitted(model, inputs):
    """One compiled program: eager dispatch compiles each of a ResNet's many convolutions alone."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda state, batch: nnx.merge(graphdef, state)(**batch))(state, inputs)


def assert_same_detections(ours, theirs):
    for field in ("logits", "pred_boxes", "last_hidden_state", "encoder_last_hidden_state"):
        diff = max_diff(getattr(ours, field), getattr(theirs, field))
        assert diff <= TOLERANCE, f"{field}: {diff:.2e}"


def test_timm_names_invert_transformers_names():
    names = [
        "model.embedder.embedder.convolution.weight",
        "model.embedder.embedder.normalization.running_var",
        "model.encoder.stages.0.layers.0.layer.2.normalization.bias",
        "model.encoder.stages.3.layers.1.layer.0.convolution.weight",
        "model.encoder.stages.1.layers.0.shortcut.convolution.weight",
        "model.encoder.stages.2.layers.0.shortcut.normalization.running_mean",
    ]
    timm = [detr.timm_name(n) for n in names]
    assert timm == [
        "model.conv1.weight",
        "model.bn1.running_var",
        "model.layer1.0.bn3.bias",
        "model.layer4.1.conv1.weight",
        "model.layer2.0.downsample.0.weight",
        "model.layer3.0.downsample.1.running_mean",
    ]
    assert [detr.transformers_resnet_name(n) for n in timm] == names


def test_timm_named_checkpoint_loads_and_saves_back_bit_exactly(tmp_path):
    """resnet18 (basic blocks, the stem's and every stage's names) in timm's names."""
    reference = timm_twin("basic", (2, 2, 2, 2))
    tensors = write_timm_checkpoint(reference, tmp_path / "timm", "resnet18")
    # names as facebook/detr-resnet-50 spells them
    for name in ("conv1.weight", "bn1.running_mean", "layer1.0.bn2.weight",
                 "layer2.0.downsample.0.weight", "layer4.1.conv2.weight"):  # fmt: skip
        assert f"model.backbone.conv_encoder.model.{name}" in tensors
    model = flaxauto.AutoModelForObjectDetection.from_pretrained(tmp_path / "timm")
    assert model.backbone.backbone.conv_encoder.timm
    inputs = task_inputs("detr", "object-detection", config=reference.config)
    assert_same_detections(jitted(model, inputs), run_torch(reference, inputs))

    model.save_pretrained(tmp_path / "saved")
    with safe_open(tmp_path / "saved" / "model.safetensors", "pt") as saved:
        assert set(saved.keys()) == set(tensors)
        for name in saved.keys():
            assert torch.equal(saved.get_tensor(name), tensors[name]), name
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["backbone_config"]["model_type"] == "timm_backbone"
    assert config["backbone_config"]["backbone"] == "resnet18"


def dilate_like_timm(resnet, layer_type: str, output_stride: int) -> None:
    """timm's output_stride on transformers' torch ResNet (what create_model(...,
    output_stride=16) builds): past that stride a stage keeps stride 1 and dilates its 3x3
    convolutions, the stage's first block with the previous dilation."""
    net_stride, dilation, previous = 4, 1, 1
    for index, stage in enumerate(resnet.encoder.stages):
        stride = 1 if index == 0 else 2
        if net_stride >= output_stride:
            dilation, stride = dilation * stride, 1
        else:
            net_stride *= stride
        if dilation == 1:
            continue
        for block_index, block in enumerate(stage.layers):
            convs = [layer.convolution for layer in block.layer]
            # bottleneck: the 3x3 between two 1x1; basic: two 3x3
            targets = (
                [(convs[1], previous)]
                if layer_type == "bottleneck"
                else [(convs[0], previous), (convs[1], dilation)]
            )
            for conv, conv_dilation in targets:
                conv.stride = (1, 1)
                conv.dilation = conv.padding = (conv_dilation, conv_dilation)
            if block_index == 0 and not isinstance(block.shortcut, torch.nn.Identity):
                block.shortcut.convolution.stride = (1, 1)
            previous = dilation


@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_timm_dilation_replaces_the_last_stride(tmp_path, monkeypatch, layer_type):
    """DETR's dilation=True (timm output_stride=16, DC5): stage 4 keeps the stride of 16."""
    depths = (1, 1, 1, 2)  # a second block in stage 4: the dilation of blocks after the first
    monkeypatch.setitem(detr.TIMM_RESNETS, "resnet50", (layer_type, depths))
    reference = timm_twin(layer_type, depths)
    dilate_like_timm(reference.model.backbone.model, layer_type, 16)
    write_timm_checkpoint(reference, tmp_path, "resnet50", dilation=True)
    model = flaxauto.AutoModelForObjectDetection.from_pretrained(tmp_path)
    assert model.config.backbone_config.output_stride == 16
    inputs = task_inputs("detr", "object-detection", config=reference.config)
    theirs = run_torch(reference, inputs)
    assert theirs.encoder_last_hidden_state.shape[1] == 2 * 3  # 32x40 pixels at stride 16
    assert_same_detections(jitted(model, inputs), theirs)


def test_auxiliary_decoder_outputs(tmp_path):
    """auxiliary_loss=True: every decoder layer's output through the shared layernorm (fed on,
    as transformers does), stacked as intermediate_hidden_states."""
    reference = torch_model("detr", "base", auxiliary_loss=True)
    reference.save_pretrained(tmp_path)
    model = flaxauto.AutoModel.from_pretrained(tmp_path)
    inputs = task_inputs("detr", "base", config=reference.config)
    ours, theirs = model(**inputs), run_torch(reference, inputs)
    assert ours.intermediate_hidden_states.shape == tuple(theirs.intermediate_hidden_states.shape)
    for field in ("intermediate_hidden_states", "last_hidden_state"):
        assert max_diff(getattr(ours, field), getattr(theirs, field)) <= TOLERANCE, field


def test_learned_positions(tmp_path):
    """Also under transformers 4's names (the tables then sat in `backbone.position_embedding`)."""
    reference = torch_model("detr", "object-detection", position_embedding_type="learned")
    reference.save_pretrained(tmp_path / "new")
    with safe_open(tmp_path / "new" / "model.safetensors", "pt") as new:
        tensors = {
            name.replace("model.position_embedding.", "model.backbone.position_embedding."): (
                new.get_tensor(name)
            )
            for name in new.keys()
        }
    assert "model.backbone.position_embedding.row_embeddings.weight" in tensors
    (tmp_path / "old").mkdir()
    save_file(tensors, tmp_path / "old" / "model.safetensors", metadata={"format": "pt"})
    reference.config.save_pretrained(tmp_path / "old")
    inputs = task_inputs("detr", "object-detection", config=reference.config)
    theirs = run_torch(reference, inputs)
    for spelling in ("new", "old"):
        model = flaxauto.AutoModelForObjectDetection.from_pretrained(tmp_path / spelling)
        assert_same_detections(model(**inputs), theirs)


def test_refuses_what_it_does_not_compute(tmp_path):
    reference = torch_model("detr", "base")
    reference.save_pretrained(tmp_path)
    with pytest.raises(NotImplementedError, match="resnet50d"):
        detr.timm_resnet("resnet50d")
    model = flaxauto.AutoModel.from_pretrained(tmp_path)
    inputs = task_inputs("detr", "base", config=reference.config)
    with pytest.raises(NotImplementedError, match="inputs_embeds"):
        model(**inputs, inputs_embeds=np.zeros((4, 20, 32), np.float32))


def test_nearest_rows_follow_torch_float32_scale():
    for size_in, size_out in [(10, 6), (40, 5), (37, 3), (7, 14), (800, 25), (13, 13)]:
        mask = torch.arange(size_in, dtype=torch.float32)[None, None, :, None]
        rows = torch.nn.functional.interpolate(mask, size=(size_out, 1))[0, 0, :, 0]
        assert np.array_equal(detr.nearest_rows(size_in, size_out), to_numpy(rows)), (
            size_in,
            size_out,
        )


def test_loss_with_auxiliary_outputs_and_its_gradients(tmp_path):
    """labels -> transformers' loss: the final and every earlier decoder layer matched and scored
    (loss_dict's _0, _1, ...), and d loss / d parameter for every parameter torch trains (torch
    freezes the ResNet: transformers' DetrConvEncoder sets requires_grad=False on it), by the
    checkpoint's names."""
    reference = torch_model("detr", "object-detection", auxiliary_loss=True, decoder_layers=3)
    reference.save_pretrained(tmp_path)
    model = flaxauto.AutoModelForObjectDetection.from_pretrained(tmp_path)
    inputs = task_inputs("detr", "object-detection", config=reference.config)
    batch = {**inputs, **task_labels(reference, "object-detection", inputs)}

    reference.zero_grad()
    theirs = reference(**to_torch(batch))
    theirs.loss.backward()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, batch):
        output = nnx.merge(graphdef, params, rest, copy=True)(**batch)
        return output.loss, output

    (loss, ours), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch)
    assert max_diff(loss, theirs.loss) <= TOLERANCE
    assert set(ours.loss_dict) == set(theirs.loss_dict) and "loss_giou_1" in ours.loss_dict
    for name, value in theirs.loss_dict.items():
        assert max_diff(ours.loss_dict[name], value) <= TOLERANCE, name
    assert len(ours.auxiliary_outputs) == len(theirs.auxiliary_outputs) == 2
    for mine, other in zip(ours.auxiliary_outputs, theirs.auxiliary_outputs, strict=True):
        for field in ("logits", "pred_boxes"):
            assert max_diff(mine[field], other[field]) <= TOLERANCE, field

    shadow = nnx.merge(graphdef, grads, rest, copy=True)
    named = {
        name: slot.to_torch(np.asarray(slot.variable.get_value()))
        for name, slot in parameter_slots(shadow).items()
        if isinstance(slot.variable, nnx.Param)
    }
    trained = [(n, p) for n, p in reference.named_parameters() if p.requires_grad]
    assert len(trained) > 50
    # a key bias's gradient is zero in exact arithmetic (softmax ignores a constant per row):
    # float noise on both sides, compared against a share of the largest gradient
    floor = 1e-2 * max(float(p.grad.abs().max()) for _, p in trained)
    for name, parameter in trained:
        expected = parameter.grad.numpy()
        scale = max(float(np.abs(expected).max()), floor)
        diff = max_diff(named[detr.hub_name(name)], expected)
        assert diff <= 1e-4 * scale, f"{name}: {diff:.2e} (scale {scale:.2e})"
