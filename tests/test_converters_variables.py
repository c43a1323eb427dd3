"""Every persistent variable is a checkpoint tensor: the vision and speech primitives (conv,
batch norm, group norm, weight-normed conv) against their torch modules; BatchNorm statistics,
buffers, weight-norm spellings, ties declared by a family and an empty base_model_prefix through
from_pretrained / save_pretrained both ways, on test-local toy families (removed afterwards, so
the conformance suite and the README table stay at the built-in families)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx
from torch import nn

import flaxauto
from flaxauto import layers, modeling, registry
from flaxauto.converters.errors import CheckpointError
from flaxauto.converters.files import open_tensors, resolve_checkpoint, save_safetensors
from flaxauto.converters.layout import flax_axes
from flaxauto.heads.base import Head
from flaxauto.outputs import BaseModelOutput, SequenceClassifierOutput
from references import max_diff, save_bin

PRECISION = layers.Precision()


def _abstract(build):
    """Build a module the way models are built: abstract variables, deferred RNG streams."""
    module = build(layers.abstract_rngs())
    for path, variable in nnx.iter_graph(module):
        if isinstance(variable, nnx.Variable) and layers.is_abstract(variable.get_value()):
            assert isinstance(variable, (nnx.Param, nnx.BatchStat)), path
    return module


def _set(variable, tensor: torch.Tensor, layout: str | None = None, dtype=None):
    array = tensor.detach().numpy()
    variable.set_value(jnp.asarray(array.transpose(flax_axes(layout, array.ndim)), dtype))


def _channels_last(x: torch.Tensor) -> jax.Array:
    return jnp.asarray(np.moveaxis(x.numpy(), 1, -1))


def _channels_first(y) -> np.ndarray:
    return np.moveaxis(np.asarray(y), -1, 1)


# --- primitives against torch modules ------------------------------------------------------------

CONVS = [  # (spatial dims, torch Conv keyword arguments)
    (1, dict(kernel_size=5, stride=2, padding=2)),
    (1, dict(kernel_size=4, padding="same", dilation=3, groups=2)),
    (2, dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), bias=False)),
    (2, dict(kernel_size=3, padding="valid", dilation=2, groups=3)),
    (3, dict(kernel_size=(1, 3, 2), stride=(1, 2, 1), padding=(0, 1, 1), groups=6)),
]


@pytest.mark.parametrize(("dims", "options"), CONVS)
def test_conv_matches_torch(dims, options):
    torch.manual_seed(0)
    reference = getattr(nn, f"Conv{dims}d")(6, 12, **options)
    x = torch.randn(2, 6, *[9, 8, 7][:dims])
    conv = _abstract(
        lambda rngs: layers.conv(
            6, 12, options["kernel_size"], (None, None), PRECISION, rngs, spatial_dims=dims,
            stride=options.get("stride", 1), padding=options.get("padding", 0),
            dilation=options.get("dilation", 1), groups=options.get("groups", 1),
            use_bias=options.get("bias", True),
        )
    )  # fmt: skip
    _set(conv.kernel, reference.weight, "conv")
    if reference.bias is not None:
        _set(conv.bias, reference.bias)
    expected = reference(x).detach().numpy()
    assert max_diff(_channels_first(conv(_channels_last(x))), expected) <= 1e-5


def test_conv_refuses_padding_modes_it_does_not_implement():
    with pytest.raises(NotImplementedError, match="padding_mode='reflect'"):
        layers.conv(
            2, 2, (3,), (None, None), PRECISION, layers.abstract_rngs(), padding_mode="reflect"
        )


@pytest.mark.parametrize(
    ("groups", "channels", "spatial"), [(2, 8, (5,)), (3, 6, (4, 3)), (8, 8, (6,))]
)
def test_group_norm_matches_torch(groups, channels, spatial):
    torch.manual_seed(1)
    reference = nn.GroupNorm(groups, channels, eps=1e-5)
    nn.init.normal_(reference.weight), nn.init.normal_(reference.bias)
    x = 3 * torch.randn(2, channels, *spatial) + 1
    norm = _abstract(lambda rngs: layers.group_norm(groups, channels, 1e-5, PRECISION, rngs))
    _set(norm.scale, reference.weight), _set(norm.bias, reference.bias)
    expected = reference(x).detach().numpy()
    assert max_diff(_channels_first(norm(_channels_last(x))), expected) <= 1e-5


@pytest.mark.parametrize("dim", [2, 0])
@pytest.mark.parametrize("spelling", ["parametrizations", "weight_g"])
def test_weight_normed_conv_matches_torch(dim, spelling):
    """wav2vec2's positional convolution: Conv1d under weight_norm(dim=2), both torch APIs."""
    torch.manual_seed(2)
    conv = nn.Conv1d(8, 8, kernel_size=4, padding=2, groups=2)
    if spelling == "parametrizations":
        reference = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=dim)
        g = reference.parametrizations.weight.original0
        v = reference.parametrizations.weight.original1
    else:
        reference = nn.utils.weight_norm(conv, name="weight", dim=dim)
        g, v = reference.weight_g, reference.weight_v
    with torch.no_grad():
        g.mul_(torch.rand_like(g) + 0.5)
    x = torch.randn(2, 8, 11)
    module = layers.weight_norm_conv(
        8, 8, (4,), (None, None), PRECISION, dim=dim, padding=2, groups=2
    )
    _set(module.weight_g, g, "conv"), _set(module.weight_v, v, "conv"), _set(module.bias, conv.bias)
    expected = reference(x).detach().numpy()
    assert max_diff(_channels_first(module(_channels_last(x))), expected) <= 1e-5


def _batch_norm_pair(momentum, dims: int = 2):
    torch.manual_seed(3)
    reference = getattr(nn, f"BatchNorm{dims}d")(5, eps=1e-3, momentum=momentum)
    with torch.no_grad():
        reference.weight.normal_(), reference.bias.normal_()
        reference.running_mean.normal_(), reference.running_var.uniform_(0.5, 2)
        reference.num_batches_tracked.fill_(7)
    norm = layers.batch_norm(5, PRECISION, eps=1e-3, momentum=momentum)
    _set(norm.scale, reference.weight), _set(norm.bias, reference.bias)
    _set(norm.mean, reference.running_mean), _set(norm.var, reference.running_var)
    _set(norm.num_batches_tracked, reference.num_batches_tracked, dtype=jnp.int32)
    return reference, norm


def _assert_same_statistics(norm, reference):
    assert max_diff(norm.mean[...], reference.running_mean.numpy()) <= 1e-6
    assert max_diff(norm.var[...], reference.running_var.numpy()) <= 1e-6
    assert int(norm.num_batches_tracked[...]) == int(reference.num_batches_tracked)


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_batch_norm_trains_and_infers_as_torch(momentum):
    """Training normalises with batch statistics and updates the running ones as torch does
    (torch's momentum, unbiased running variance, None = cumulative average); eval uses them."""
    reference, norm = _batch_norm_pair(momentum)
    reference.train(), norm.train()
    for step in range(3):
        x = 2 * torch.randn(4, 5, 3, 2) + step
        expected = reference(x).detach().numpy()
        assert max_diff(_channels_first(norm(_channels_last(x))), expected) <= 1e-5
        _assert_same_statistics(norm, reference)
    reference.eval(), norm.eval()
    x = torch.randn(3, 5, 2, 2)
    expected = reference(x).detach().numpy()
    assert max_diff(_channels_first(norm(_channels_last(x))), expected) <= 1e-5
    _assert_same_statistics(norm, reference)  # inference leaves the statistics alone


def test_batch_norm_training_updates_statistics_under_jit():
    reference, norm = _batch_norm_pair(0.1, dims=1)
    reference.train(), norm.train()
    graphdef, state = nnx.split(norm)

    @jax.jit
    def forward(state, x):
        module = nnx.merge(graphdef, state)
        return module(x), nnx.state(module)

    x = torch.randn(6, 5)
    out, state = forward(state, jnp.asarray(x.numpy()))
    nnx.update(norm, state)
    assert max_diff(out, reference(x).detach().numpy()) <= 1e-5
    _assert_same_statistics(norm, reference)


def test_batch_norm_refuses_what_it_does_not_implement():
    with pytest.raises(NotImplementedError, match="track_running_stats=False"):
        layers.batch_norm(3, PRECISION, track_running_stats=False)
    norm = layers.batch_norm(3, PRECISION)
    for variable in (norm.scale, norm.bias, norm.mean, norm.num_batches_tracked):
        variable.set_value(jnp.zeros(variable.get_value().shape, variable.get_value().dtype))
    norm.var.set_value(jnp.ones(3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        norm(jnp.ones((1, 3)))


# --- a toy conv net: statistics, buffers, weight norm through the checkpoint ---------------------


class ToyConvConfig(transformers.PreTrainedConfig):
    model_type = "toy-conv"

    def __init__(self, num_channels=3, hidden_size=8, num_labels=3, **kwargs):
        self.num_channels, self.hidden_size = num_channels, hidden_size
        super().__init__(num_labels=num_labels, **kwargs)


class TorchToyConvModel(transformers.PreTrainedModel):
    config_class = ToyConvConfig
    base_model_prefix = "toy"
    main_input_name = "pixel_values"

    def __init__(self, config):
        super().__init__(config)
        hidden = config.hidden_size
        self._build(config.num_channels, hidden)
        self.post_init()

    def _build(self, channels: int, hidden: int):
        self.embedder = nn.Conv2d(channels, hidden, 3, stride=2, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(hidden, eps=1e-5, momentum=0.1)
        self.mixer = nn.Conv2d(hidden, hidden, 3, padding="same", dilation=2, groups=2)
        self.group_norm = nn.GroupNorm(2, hidden)
        self.pos_conv = nn.utils.parametrizations.weight_norm(
            nn.Conv1d(hidden, hidden, 3, padding=1, groups=2), name="weight", dim=2
        )

    def features(self, pixel_values):  # -> [B, L, C]
        x = torch.relu(self.norm(self.embedder(pixel_values)))
        x = self.group_norm(self.mixer(x)).flatten(2)  # [B, C, L]
        x = x + nn.functional.gelu(self.pos_conv(x))
        return x.transpose(1, 2)

    def forward(self, pixel_values):
        return transformers.modeling_outputs.BaseModelOutput(
            last_hidden_state=self.features(pixel_values)
        )


class _ToyClassifier:
    """The head of both toy task models: mean pool, Linear, plus a persistent buffer."""

    def _build_head(self, config):
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.register_buffer("final_logits_bias", torch.zeros(1, config.num_labels))

    def _logits(self, features):
        logits = self.classifier(features.mean(dim=1)) + self.final_logits_bias
        return transformers.modeling_outputs.SequenceClassifierOutput(logits=logits)


class TorchToyConvForImageClassification(transformers.PreTrainedModel, _ToyClassifier):
    config_class = ToyConvConfig
    base_model_prefix = "toy"
    main_input_name = "pixel_values"

    def __init__(self, config):
        super().__init__(config)
        self.toy = TorchToyConvModel(config)
        self._build_head(config)
        self.post_init()

    def forward(self, pixel_values):
        return self._logits(self.toy.features(pixel_values))


class TorchToyFlatForAudioClassification(TorchToyConvModel, _ToyClassifier):
    """The backbone's modules at the top (base_model_prefix ""), as
    WhisperForAudioClassification keeps `encoder.*`."""

    base_model_prefix = ""

    def __init__(self, config):
        transformers.PreTrainedModel.__init__(self, config)
        self._build(config.num_channels, config.hidden_size)
        self._build_head(config)
        self.post_init()

    def forward(self, pixel_values):
        return self._logits(self.features(pixel_values))


class ToyConvBackbone(nnx.Module):
    def __init__(self, config, precision, rngs):
        hidden = config.hidden_size
        self.embedder = layers.conv(
            config.num_channels, hidden, 3, (None, "embed"), precision, rngs,
            stride=2, padding=1, use_bias=False, spatial_dims=2,
        )  # fmt: skip
        self.norm = layers.batch_norm(hidden, precision, eps=1e-5, momentum=0.1)
        self.mixer = layers.conv(
            hidden, hidden, 3, ("embed", "embed"), precision, rngs,
            padding="same", dilation=2, groups=2, spatial_dims=2,
        )  # fmt: skip
        self.group_norm = layers.group_norm(2, hidden, 1e-5, precision, rngs)
        self.pos_conv = layers.weight_norm_conv(
            hidden, hidden, (3,), ("embed", "embed"), precision, dim=2, padding=1, groups=2
        )

    def __call__(self, *, pixel_values, output_hidden_states=False, output_attentions=False):
        x = jnp.transpose(pixel_values, (0, 2, 3, 1))  # NCHW (transformers) -> NHWC [B, H, W, C]
        x = self.group_norm(self.mixer(jax.nn.relu(self.norm(self.embedder(x)))))
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, L, C], L row-major as torch's flatten
        x = x + jax.nn.gelu(self.pos_conv(x), approximate=False)
        return BaseModelOutput(last_hidden_state=x)


class ToyClassifierHead(Head):
    def __init__(self, config, precision, rngs):
        hidden, labels = config.hidden_size, config.num_labels
        self.classifier = layers.linear(hidden, labels, ("embed", None), precision, rngs)
        self.final_logits_bias = layers.buffer((1, labels), (None, None), precision.param_dtype)

    def __call__(self, features, *, backbone, inputs, labels=None):
        pooled = features.last_hidden_state.mean(axis=1)  # [B, C]
        return SequenceClassifierOutput(
            logits=self.classifier(pooled) + self.final_logits_bias[...]
        )


@pytest.fixture
def toy_conv():
    registry.register(
        model_types=("toy-conv",),
        backbone=ToyConvBackbone,
        base_model_prefix="toy",
        main_input_name="pixel_values",
        heads={
            "base": registry.HeadSpec(None),
            "image-classification": registry.HeadSpec(ToyClassifierHead),
            "audio-classification": registry.HeadSpec(ToyClassifierHead, base_model_prefix=""),
        },
        config_class=ToyConvConfig,
    )
    yield
    registry._FAMILIES.pop("toy-conv", None)  # keep the registry (and README table) to built-ins


def _trained(model_class, seed: int = 0):
    """A toy with random weights, batch statistics from three training batches (so
    num_batches_tracked is 3) and a nonzero buffer, in eval mode."""
    torch.manual_seed(seed)
    model = model_class(ToyConvConfig())
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.normal_(0, 0.5)
        for name, buffer in model.named_buffers():
            if name.endswith("final_logits_bias"):
                buffer.normal_()
        model.train()
        for _ in range(3):
            model(torch.randn(4, 3, 8, 8))
    return model.eval()


PIXELS = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))


def _logits(model) -> np.ndarray:
    return np.asarray(model(pixel_values=PIXELS.numpy()).logits)


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _write(directory, config, tensors: dict):
    save_safetensors(directory, tensors, extra_files={"config.json": config.to_json_string()})
    return directory


@pytest.mark.parametrize("checkpoint", ["safetensors", "bin"])
def test_conv_net_loads_statistics_buffers_and_weight_norm(toy_conv, checkpoint, tmp_path):
    reference = _trained(TorchToyConvForImageClassification)
    if checkpoint == "bin":
        save_bin(reference, tmp_path)
    else:
        reference.save_pretrained(tmp_path)
    model, info = flaxauto.AutoModelForImageClassification.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    assert int(model.backbone.norm.num_batches_tracked[...]) == 3
    assert max_diff(model.backbone.norm.var[...], reference.toy.norm.running_var.numpy()) == 0
    bias = reference.final_logits_bias.numpy()
    assert max_diff(model.head.final_logits_bias[...], bias) == 0
    expected = reference(PIXELS).logits.detach().numpy()
    assert max_diff(_logits(model), expected) <= 1e-4
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda s, x: nnx.merge(graphdef, s)(pixel_values=x).logits)
    assert max_diff(jitted(state, PIXELS.numpy()), expected) <= 1e-4


def test_conv_net_saves_bit_exact_into_transformers(toy_conv, tmp_path):
    reference = _trained(TorchToyConvForImageClassification)
    reference.save_pretrained(tmp_path / "torch")
    model = flaxauto.AutoModelForImageClassification.from_pretrained(tmp_path / "torch")
    model.save_pretrained(tmp_path / "flax")
    reloaded, info = TorchToyConvForImageClassification.from_pretrained(
        tmp_path / "flax", output_loading_info=True
    )
    assert not any(info.values()), info
    original = reference.state_dict()
    assert reloaded.state_dict().keys() == original.keys()
    for name, tensor in reloaded.state_dict().items():
        assert tensor.dtype == original[name].dtype and torch.equal(tensor, original[name]), name
    assert "toy.pos_conv.parametrizations.weight.original0" in original  # the current spelling


def test_statistics_and_buffers_load_into_a_mesh_and_shard(toy_conv, tmp_path):
    reference = _trained(TorchToyConvForImageClassification)
    reference.save_pretrained(tmp_path)
    mesh = flaxauto.make_mesh(data=2, fsdp=4)
    model = flaxauto.AutoModelForImageClassification.from_pretrained(
        tmp_path, mesh=mesh, rules="fsdp"
    )
    for variable in (model.backbone.norm.var, model.backbone.norm.num_batches_tracked):
        assert variable[...].sharding.mesh == mesh
    assert model.head.final_logits_bias[...].sharding.mesh == mesh
    assert max_diff(_logits(model), reference(PIXELS).logits.detach().numpy()) <= 1e-4
    unsharded = flaxauto.AutoModelForImageClassification.from_pretrained(tmp_path)
    flaxauto.shard_model(unsharded, mesh, "fsdp")
    assert unsharded.backbone.norm.mean[...].sharding.mesh == mesh
    assert unsharded.head.final_logits_bias[...].sharding.mesh == mesh


def test_old_weight_norm_spelling_loads(toy_conv, tmp_path):
    reference = _trained(TorchToyConvForImageClassification)
    state = _state(reference)
    for new, old in (("original0", "weight_g"), ("original1", "weight_v")):
        state[f"toy.pos_conv.{old}"] = state.pop(f"toy.pos_conv.parametrizations.weight.{new}")
    _write(tmp_path, reference.config, state)
    model, info = flaxauto.AutoModelForImageClassification.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    assert max_diff(_logits(model), reference(PIXELS).logits.detach().numpy()) <= 1e-4


def test_checkpoint_without_batch_counter_loads_it_as_zero(toy_conv, tmp_path):
    reference = _trained(TorchToyConvForImageClassification)
    state = _state(reference)
    del state["toy.norm.num_batches_tracked"]
    _write(tmp_path, reference.config, state)
    model, info = flaxauto.AutoModelForImageClassification.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert info["missing_keys"] == []
    assert int(model.backbone.norm.num_batches_tracked[...]) == 0
    assert max_diff(_logits(model), reference(PIXELS).logits.detach().numpy()) <= 1e-4


def test_missing_statistics_and_buffers_are_reported(toy_conv, tmp_path):
    reference = _trained(TorchToyConvForImageClassification)
    state = _state(reference)
    del state["toy.norm.running_var"], state["final_logits_bias"]
    _write(tmp_path, reference.config, state)
    with pytest.raises(CheckpointError, match="missing: toy.norm.running_var"):
        flaxauto.AutoModelForImageClassification.from_pretrained(tmp_path)
    del state["toy.norm.num_batches_tracked"]
    _write(tmp_path, reference.config, {**state, "toy.norm.running_var": np.ones(8, np.float32)})
    _, info = flaxauto.AutoModelForImageClassification.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert info["missing_keys"] == ["final_logits_bias"]  # a head buffer: initialised, reported


def test_batch_norm_trains_through_the_model_as_torch(toy_conv, tmp_path):
    reference = _trained(TorchToyConvForImageClassification)
    reference.save_pretrained(tmp_path)
    model = flaxauto.AutoModelForImageClassification.from_pretrained(tmp_path)
    reference.train(), model.train()
    expected = reference(PIXELS).logits.detach().numpy()
    assert max_diff(_logits(model), expected) <= 1e-4
    statistics = reference.toy.norm
    assert max_diff(model.backbone.norm.mean[...], statistics.running_mean.numpy()) <= 1e-6
    assert max_diff(model.backbone.norm.var[...], statistics.running_var.numpy()) <= 1e-6
    assert int(model.backbone.norm.num_batches_tracked[...]) == 4


def test_from_config_initialises_statistics_and_buffers_as_transformers(toy_conv):
    torch.manual_seed(0)
    fresh = TorchToyConvForImageClassification(ToyConvConfig()).state_dict()
    model = flaxauto.AutoModelForImageClassification.from_config(ToyConvConfig(), seed=0)
    norm = model.backbone.norm
    for ours, name in (
        (norm.scale, "toy.norm.weight"),
        (norm.bias, "toy.norm.bias"),
        (norm.mean, "toy.norm.running_mean"),
        (norm.var, "toy.norm.running_var"),
        (norm.num_batches_tracked, "toy.norm.num_batches_tracked"),
        (model.backbone.group_norm.scale, "toy.group_norm.weight"),
        (model.head.final_logits_bias, "final_logits_bias"),
    ):
        assert np.array_equal(np.asarray(ours[...]), fresh[name].numpy()), name


def test_an_optimizer_over_params_trains_neither_statistics_nor_buffers(toy_conv):
    model = flaxauto.AutoModelForImageClassification.from_config(ToyConvConfig(), seed=1)
    model.head.final_logits_bias.set_value(jnp.ones((1, 3)))
    model.train()
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    before = nnx.clone(model)
    labels = jnp.array([0, 2])

    def loss(model):
        logits = model(pixel_values=PIXELS.numpy()).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads = nnx.grad(loss)(model)
    params = nnx.state(model, nnx.Param)
    assert {p for p, _ in nnx.to_flat_state(grads)} == {p for p, _ in nnx.to_flat_state(params)}
    optimizer.update(model, grads)
    assert not np.array_equal(model.head.classifier.kernel[...], before.head.classifier.kernel[...])
    assert np.array_equal(model.head.final_logits_bias[...], before.head.final_logits_bias[...])
    # the statistics moved by the forward pass in training mode only, never by the optimiser
    forward_only = nnx.clone(before)
    loss(forward_only)
    for ours, theirs in ((model.backbone.norm, forward_only.backbone.norm),):
        assert np.array_equal(ours.mean[...], theirs.mean[...])
        assert np.array_equal(ours.var[...], theirs.var[...])


def test_empty_base_model_prefix_keeps_backbone_names_at_the_top(toy_conv, tmp_path):
    reference = _trained(TorchToyFlatForAudioClassification)
    reference.save_pretrained(tmp_path / "torch")
    assert "embedder.weight" in _state(reference)  # no prefix in the checkpoint
    model, info = flaxauto.AutoModelForAudioClassification.from_pretrained(
        tmp_path / "torch", output_loading_info=True
    )
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    assert max_diff(_logits(model), reference(PIXELS).logits.detach().numpy()) <= 1e-4
    model.save_pretrained(tmp_path / "flax")
    reloaded, info = TorchToyFlatForAudioClassification.from_pretrained(
        tmp_path / "flax", output_loading_info=True
    )
    assert not any(info.values()), info
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, reference.state_dict()[name]), name
    # a base checkpoint (also unprefixed) into the task model: the head is new and reported
    _trained(TorchToyConvModel).save_pretrained(tmp_path / "base")
    _, info = flaxauto.AutoModelForAudioClassification.from_pretrained(
        tmp_path / "base", output_loading_info=True
    )
    assert sorted(info["missing_keys"]) == [
        "classifier.bias", "classifier.weight", "final_logits_bias"
    ]  # fmt: skip
    # and the task checkpoint into the base model: the head is dropped and reported
    _, info = flaxauto.AutoModel.from_pretrained(tmp_path / "torch", output_loading_info=True)
    assert sorted(info["unexpected_keys"]) == [
        "classifier.bias", "classifier.weight", "final_logits_bias"
    ]  # fmt: skip


# --- ties declared by the family inside the backbone ---------------------------------------------


class ToyTiedConfig(transformers.PreTrainedConfig):
    model_type = "toy-tied"

    def __init__(self, vocab_size=11, hidden_size=6, tie_word_embeddings=True, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class _TorchStack(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)


class TorchToyTiedModel(transformers.PreTrainedModel):
    """BART's layout: `shared` and each stack's `embed_tokens` are one table."""

    config_class = ToyTiedConfig
    base_model_prefix = "model"
    _tied_weights_keys = {
        "encoder.embed_tokens.weight": "shared.weight",
        "decoder.embed_tokens.weight": "shared.weight",
    }

    def __init__(self, config):
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.hidden_size)
        self.encoder, self.decoder = _TorchStack(config), _TorchStack(config)
        self.post_init()

    def forward(self, input_ids):
        encoded = self.encoder.proj(self.encoder.embed_tokens(input_ids))
        decoded = self.decoder.proj(self.decoder.embed_tokens(input_ids)) + encoded
        return transformers.modeling_outputs.BaseModelOutput(last_hidden_state=decoded)


class _Stack(nnx.Module):
    def __init__(self, config, precision, rngs):
        self.proj = layers.linear(
            config.hidden_size, config.hidden_size, ("embed", "embed"), precision, rngs
        )


class ToyTiedBackbone(nnx.Module):
    def __init__(self, config, precision, rngs):
        self.shared = layers.embedding(
            config.vocab_size, config.hidden_size, ("vocab", "embed"), precision, rngs
        )
        self.encoder, self.decoder = (
            _Stack(config, precision, rngs),
            _Stack(config, precision, rngs),
        )

    def __call__(self, *, input_ids, output_hidden_states=False, output_attentions=False):
        embedded = self.shared(input_ids)  # the stacks' embed_tokens are this table
        decoded = self.decoder.proj(embedded) + self.encoder.proj(embedded)
        return BaseModelOutput(last_hidden_state=decoded)


@pytest.fixture
def toy_tied():
    registry.register(
        model_types=("toy-tied",),
        backbone=ToyTiedBackbone,
        base_model_prefix="model",
        heads={"base": registry.HeadSpec(None)},
        ties={"shared": ("encoder.embed_tokens", "decoder.embed_tokens")},
        config_class=ToyTiedConfig,
    )
    yield
    registry._FAMILIES.pop("toy-tied", None)


IDS = np.array([[1, 4, 9, 2], [3, 3, 0, 10]])


@pytest.fixture
def tied_reference():
    torch.manual_seed(4)
    return TorchToyTiedModel(ToyTiedConfig()).eval()


@pytest.mark.parametrize(
    "carried",
    [
        ("shared",),
        ("encoder.embed_tokens",),
        ("decoder.embed_tokens",),
        ("shared", "encoder.embed_tokens", "decoder.embed_tokens"),
    ],
)
def test_a_checkpoint_with_any_of_the_tied_names_loads(toy_tied, tied_reference, carried, tmp_path):
    state = {
        k: v for k, v in _state(tied_reference).items() if "embed" not in k and k != "shared.weight"
    }
    table = tied_reference.shared.weight.detach().numpy()
    state |= {f"{name}.weight": table for name in carried}
    _write(tmp_path, tied_reference.config, state)
    model, info = flaxauto.AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    expected = tied_reference(torch.as_tensor(IDS)).last_hidden_state.detach().numpy()
    assert max_diff(model(input_ids=IDS).last_hidden_state, expected) <= 1e-5


def test_tied_names_with_different_values_are_refused(toy_tied, tied_reference, tmp_path):
    state = _state(tied_reference)
    state["encoder.embed_tokens.weight"] = state["shared.weight"] + 1
    state["decoder.embed_tokens.weight"] = state["shared.weight"]
    _write(tmp_path, tied_reference.config, state)
    with pytest.raises(CheckpointError, match=r"encoder\.embed_tokens\.weight .*tied.* differ"):
        flaxauto.AutoModel.from_pretrained(tmp_path)


def test_tied_table_saves_as_transformers_saves_it(toy_tied, tied_reference, tmp_path):
    tied_reference.save_pretrained(tmp_path / "torch")
    model = flaxauto.AutoModel.from_pretrained(tmp_path / "torch")
    model.save_pretrained(tmp_path / "flax")
    with open_tensors(resolve_checkpoint(tmp_path / "flax")) as ours:
        written = sorted(ours.keys())
    with open_tensors(resolve_checkpoint(tmp_path / "torch")) as theirs:
        assert written == sorted(theirs.keys())
    assert "shared.weight" in written and "encoder.embed_tokens.weight" not in written
    reloaded = TorchToyTiedModel.from_pretrained(tmp_path / "flax")
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, tied_reference.state_dict()[name]), name


# --- the abstract build --------------------------------------------------------------------------


def test_abstract_build_traces_nothing_and_runs_no_jax_program(monkeypatch):
    """Shapes only: no tracing (jax.eval_shape, nnx.eval_shape) and no jax computation."""
    from references import tiny_config

    layers.key_data_shape()  # the key type: learnt once per process, before the guard below

    def refuse(*args, **kwargs):
        raise AssertionError("the abstract build traced")

    monkeypatch.setattr(jax, "eval_shape", refuse)
    monkeypatch.setattr(nnx, "eval_shape", refuse)
    for model_type, scan in (("bert", True), ("gpt2", False), ("llama", True)):
        config = tiny_config(model_type, "causal-lm" if model_type != "bert" else "masked-lm")
        task = "masked-lm" if model_type == "bert" else "causal-lm"
        with jax.transfer_guard("disallow"):
            model = modeling.build_abstract(config, task, PRECISION, scan_layers=scan)
        values = [v.get_value() for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)]
        assert values and all(layers.is_abstract(v) for v in values)


def test_scanned_layers_stack_as_the_checkpoint_names_them(tmp_path):
    from references import tiny_config, torch_model

    reference = torch_model("bert", "base")
    reference.save_pretrained(tmp_path)
    config = tiny_config("bert", "base")
    model = modeling.build_abstract(config, "base", PRECISION, scan_layers=True)
    kernel = model.backbone.encoder.layer.block.attention.self.query.kernel
    layers_count = config.num_hidden_layers
    assert kernel.get_value().shape == (layers_count, config.hidden_size, config.hidden_size)
    assert kernel.get_metadata("out_sharding") == ("layers", "embed", "heads")
    loaded = flaxauto.AutoModel.from_pretrained(tmp_path, scan_layers=True)
    inputs = {"input_ids": IDS}
    expected = reference(torch.as_tensor(IDS)).last_hidden_state.detach().numpy()
    assert max_diff(loaded(**inputs).last_hidden_state, expected) <= 1e-4


def test_the_library_uses_no_private_jax():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sources = [p for d in ("flaxauto", "heads", "converters") for p in (root / d).rglob("*.py")]
    assert sources
    offenders = [str(p) for p in sources if "jax._src" in p.read_text()]
    assert offenders == []


@pytest.mark.parametrize("scan", [False, True])
def test_layer_stacks_keep_batch_statistics_updated_in_training(scan):
    """run_layers calls each layer on a split copy; the statistics it updates come back."""
    from flaxauto import stacks

    class Layer(nnx.Module):
        def __init__(self, index, rngs):
            self.norm = layers.batch_norm(4, PRECISION, momentum=0.1)

    stack = stacks.layer_stack(Layer, 2, layers.abstract_rngs(), scan=scan)
    for path, variable in nnx.iter_graph(stack):
        if isinstance(variable, nnx.Variable):
            abstract = variable.get_value()
            fill = np.ones if path[-1] in ("scale", "mean", "var") else np.zeros
            variable.set_value(jnp.asarray(fill(abstract.shape, abstract.dtype)))
    stack.train()
    torch_norms = [nn.BatchNorm1d(4, momentum=0.1) for _ in range(2)]
    x = torch.randn(3, 5, 4)
    hidden = x
    for norm in torch_norms:
        with torch.no_grad():
            nn.init.ones_(norm.running_mean)  # as filled above
            hidden = norm(hidden.transpose(1, 2)).transpose(1, 2)
    last, *_ = stacks.run_layers(
        stack, jnp.asarray(x.numpy()), lambda layer, h, _: (layer.norm(h), None, None)
    )
    assert max_diff(last, hidden.numpy()) <= 1e-5
    for index, norm in enumerate(torch_norms):
        layer = stack.block.norm if scan else stack[index].norm
        mean, var, count = layer.mean[...], layer.var[...], layer.num_batches_tracked[...]
        if scan:  # stacked [L, ...]
            mean, var, count = mean[index], var[index], count[index]
        assert max_diff(mean, norm.running_mean.numpy()) <= 1e-6
        assert max_diff(var, norm.running_var.numpy()) <= 1e-6
        assert int(count) == 1
