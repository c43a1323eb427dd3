"""Gradient parity: for every (model_type, task) of the conformance suite that takes labels, the
loss and the gradient of every parameter equal transformers PyTorch autograd's on the same
weights, inputs and labels (fp32, dropout off: both models in eval mode, so batch norms use their
running statistics on both sides).

flaxauto's gradients are mapped to PyTorch names through the converters' protocol
(converters.layout.parameter_slots), the same table save_pretrained writes with, so a stacked,
tied or transposed parameter is compared in transformers' layout. A new family joins by
registering: the cases come from tests/references.py's task pairs and factories.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from flaxauto.converters.layout import parameter_slots
from references import (
    LABEL_FACTORIES,
    max_diff,
    run_compiled,
    task_inputs,
    task_labels,
    task_pairs,
    to_torch,
    torch_model,
)

#: relative tolerance on each gradient's norm, and on its max |diff| against its largest entry
RELATIVE = 1e-4
#: A gradient that is zero in exact arithmetic (a key projection's bias: softmax ignores a constant
#: added to every score) is float noise on both sides (~1e-8 here); such gradients are compared
#: against this share of the model's largest gradient instead of their own size (float32
#: noise on such a gradient reached 1e-7 of the largest).
NOISE_FLOOR = 1e-2
LABELLED = [(m, t) for m, t in task_pairs() if t in LABEL_FACTORIES]


def torch_gradients(model, batch) -> tuple[float, dict[tuple[str, ...], np.ndarray]]:
    """PyTorch's loss and d loss / d parameter: {checkpoint names of one parameter (several
    where tied): gradient}.

    transformers 5 holds some families' parameters under other names than their checkpoints
    carry (ViT's `layers.0.attention.q_proj` is the hub's `encoder.layer.0.attention.attention
    .query`), and flaxauto names tensors as checkpoints do. The gradients are therefore renamed
    (and, for a converter, re-laid-out) by transformers' own save-time conversion,
    `revert_weight_conversion`, exactly as save_pretrained turns the weights into the files
    flaxauto loaded."""
    from transformers.core_model_loading import revert_weight_conversion

    model.zero_grad()
    loss = model(**to_torch(batch)).loss
    loss.backward()
    by_name = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad:  # frozen by torch (Whisper's encoder positions): flaxauto trains
            continue  # them, a documented difference, so there is nothing to compare
        # aliases of one tied parameter share one gradient tensor, which groups them below
        by_name[name] = torch.zeros_like(p) if p.grad is None else p.grad
    names: dict[int, list[str]] = {}
    grads = {}
    for name, grad in revert_weight_conversion(model, by_name).items():
        names.setdefault(id(grad), []).append(name)
        grads[id(grad)] = grad
    return float(loss.detach()), {
        tuple(names[key]): g.detach().numpy().copy() for key, g in grads.items()
    }


def flaxauto_gradients(model, batch) -> tuple[float, dict[str, np.ndarray]]:
    """flaxauto's loss and gradients (one compiled value_and_grad over the split parameters),
    by transformers' names and in transformers' layouts."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, rest, batch):
        return nnx.merge(graphdef, params, rest, copy=True)(**batch).loss

    loss, grads = run_compiled(jax.value_and_grad(loss_fn), params, rest, batch)
    # the gradients take the parameters' places in a copy of the model, so the converters'
    # table names them (and unstacks scanned layers, transposes kernels) as it names weights
    shadow = nnx.merge(graphdef, grads, rest, copy=True)
    named = {}
    for name, slot in parameter_slots(shadow).items():
        if not isinstance(slot.variable, nnx.Param):
            continue  # batch statistics and buffers are not trained
        value = np.asarray(slot.variable.get_value())
        named[name] = slot.to_torch(value if slot.index is None else value[slot.index])
    return float(loss), named


CASES = [pytest.param(m, t, id=f"{m}-{t}") for m, t in LABELLED]


@pytest.mark.parametrize("model_type,task", CASES)
def test_loss_and_every_gradient_equal_pytorch_autograd(model_type, task, tmp_path):
    import flaxauto

    reference = torch_model(model_type, task)  # eval(): dropout off
    reference.save_pretrained(tmp_path)
    inputs = task_inputs(model_type, task, config=reference.config)
    batch = {**inputs, **task_labels(reference, task, inputs)}
    auto_class = getattr(flaxauto, flaxauto.registry.TASK_AUTO_CLASSES[task])
    model = auto_class.from_pretrained(tmp_path)

    torch_loss, theirs = torch_gradients(reference, batch)
    loss, ours = flaxauto_gradients(model, batch)

    assert abs(loss - torch_loss) <= RELATIVE * max(1.0, abs(torch_loss))
    # a tied table has one gradient under whichever of its names flaxauto saves it
    theirs = {next((n for n in names if n in ours), names[0]): g for names, g in theirs.items()}
    missing = sorted(set(theirs) - set(ours))
    assert not missing, f"PyTorch parameters without a flaxauto gradient: {missing}"
    trained = [n for n, g in theirs.items() if np.any(g)]
    assert len(trained) > len(theirs) // 2, "most parameters must get a gradient"
    floor = NOISE_FLOOR * max(float(np.max(np.abs(g))) for g in theirs.values())
    for name, expected in theirs.items():
        got = ours[name]
        assert got.shape == expected.shape, name
        scale = max(float(np.max(np.abs(expected))), floor)
        norm, norm_expected = float(np.linalg.norm(got)), float(np.linalg.norm(expected))
        assert abs(norm - norm_expected) <= RELATIVE * max(norm_expected, floor), (name, "norm")
        diff = max_diff(got, expected)
        assert diff <= RELATIVE * scale, f"{name}: max |diff| {diff:.2e}, scale {scale:.2e}"
