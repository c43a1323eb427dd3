"""Execution options: scan_layers (stacked layers under nnx.scan) and remat give the same
numbers and gradients as the plain model; unsupported requests are refused by name."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import flaxauto
from references import text_inputs, tiny_config, torch_model

#: These tests check execution mechanics (scan/remat against unrolled, a training step), not
#: parity with transformers: they keep transformers' default init, where gradients are O(1) and
#: five steps of adamw reliably lower the loss (at the conformance scale, 0.25, gradients reach
#: ~1e2 and scan vs unrolled differ by float32 rounding, ~1e-6 relative, beyond the 1e-6 atol).
DEFAULT_INIT = {"initializer_range": 0.02}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bert-seqcls")
    torch_model("bert", "sequence-classification", **DEFAULT_INIT).save_pretrained(directory)
    return directory


def _loss_and_grads(model, batch):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest):
        return nnx.merge(graphdef, params, rest)(**batch).loss

    return jax.jit(jax.value_and_grad(loss))(params, rest)


def _flat_by_name(model, grads) -> dict[str, np.ndarray]:
    """Gradients keyed by transformers name, unstacking scanned layers."""
    from flaxauto.converters.layout import parameter_slots

    nnx.update(model, grads)  # borrow the model's structure to name each gradient
    out = {}
    for name, slot in parameter_slots(model).items():
        value = slot.variable.get_value()
        out[name] = np.asarray(value if slot.index is None else value[slot.index])
    return out


@pytest.fixture(scope="module")
def decoder_checkpoint(tmp_path_factory):
    """qwen2's tiny config mixes full and sliding-window layers: scanned layers pick theirs."""
    directory = tmp_path_factory.mktemp("qwen2-lm")
    torch_model("qwen2", "causal-lm", **DEFAULT_INIT).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_scan_and_remat_give_the_same_loss_and_gradients(family, request):
    if family == "encoder":
        directory, auto_class = (
            request.getfixturevalue("checkpoint"),
            flaxauto.AutoModelForSequenceClassification,
        )
        batch = {**text_inputs("bert", "base"), "labels": np.array([0, 1, 2, 1])}
    else:
        directory, auto_class = (
            request.getfixturevalue("decoder_checkpoint"),
            flaxauto.AutoModelForCausalLM,
        )
        inputs = text_inputs("qwen2", "causal-lm")
        batch = {
            **inputs,
            "labels": np.where(inputs["attention_mask"] == 1, inputs["input_ids"], -100),
        }
    results = {}
    for scan_layers, remat in [(False, False), (True, False), (False, True), (True, True)]:
        model = auto_class.from_pretrained(directory, scan_layers=scan_layers, remat=remat)
        loss, grads = _loss_and_grads(model, batch)
        results[scan_layers, remat] = (float(loss), _flat_by_name(model, grads))
    plain_loss, plain_grads = results[False, False]
    for loss, grads in results.values():
        assert abs(loss - plain_loss) <= 1e-6
        for name, grad in plain_grads.items():
            np.testing.assert_allclose(grads[name], grad, atol=1e-6, err_msg=name)
    assert any(np.abs(grad).max() > 0 for grad in plain_grads.values())


def test_a_training_step_with_dropout_under_scan(checkpoint):
    model = flaxauto.AutoModelForSequenceClassification.from_pretrained(
        checkpoint, scan_layers=True, remat=True, seed=3
    )
    model.train()
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    batch = {**text_inputs("bert", "base"), "labels": np.array([0, 1, 2, 1])}

    @nnx.jit
    def step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(lambda m: m(**batch).loss)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, batch)) for _ in range(5)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_scan_layers_compiles_one_layer(checkpoint):
    """The scanned program holds one copy of the layer: its HLO does not grow with depth."""
    sizes = {}
    for layers in (2, 6):
        config = tiny_config("bert", num_hidden_layers=layers)
        model = flaxauto.AutoModel.from_config(config, scan_layers=True)
        graphdef, state = nnx.split(model)
        batch = text_inputs("bert", "base")
        forward = jax.jit(lambda s, b, g=graphdef: nnx.merge(g, s)(**b).last_hidden_state)
        lowered = forward.lower(state, batch)
        sizes[layers] = len(lowered.as_text())
    assert sizes[6] < 1.1 * sizes[2]


def test_unsupported_execution_option_is_refused_by_name(monkeypatch):
    from flaxauto.models.bert import BertModel

    monkeypatch.setattr(BertModel, "supports_scan_layers", False)
    with pytest.raises(NotImplementedError, match="scan_layers"):
        flaxauto.AutoModel.from_config(tiny_config("bert"), scan_layers=True)
