"""flaxauto.flax_params / load_flax_params: a model's parameters as transformers 4 Flax's
model.params tree and back, checked against the trees transformers 4's Flax classes saved
(tests/fixtures/flax, see make_flax_fixtures.py) and the PyTorch twins run live."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from flax import serialization
from flax.traverse_util import flatten_dict
from test_flax_checkpoints import FIXTURES, TASKS, _inputs

import flaxauto
from flaxauto import modeling
from flaxauto.converters.errors import CheckpointError

TOLERANCE = 1e-4


@pytest.mark.parametrize("family", list(TASKS))
def test_params_trees_match_transformers_4_flax_both_ways(family):
    task, field = TASKS[family]
    folder = FIXTURES / family / "msgpack"
    saved = serialization.msgpack_restore((folder / "flax_model.msgpack").read_bytes())
    auto_class = getattr(flaxauto, flaxauto.registry.TASK_AUTO_CLASSES[task])
    model = auto_class.from_pretrained(folder)
    ours = flatten_dict(flaxauto.flax_params(model))
    want = flatten_dict(saved)
    assert ours.keys() == want.keys()
    for key, value in want.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        assert ours[key].tobytes() == value.tobytes(), key
    # and back: a model with other weights takes the tree and gives the PyTorch twin's numbers
    config = transformers.AutoConfig.from_pretrained(folder)
    other = modeling.from_config(config, task, seed=123)
    flaxauto.load_flax_params(other, saved)
    name = flaxauto.registry.transformers_class_name(config.model_type, task)
    twin = getattr(transformers, name).from_pretrained(FIXTURES / family / "pytorch").eval()
    batch = _inputs(family)
    with torch.no_grad():
        theirs = twin(**{k: torch.as_tensor(v) for k, v in batch.items()})[field].numpy()
    keep = batch["attention_mask"].astype(bool)
    got = np.asarray(other(**batch)[field])
    if got.ndim == 3:  # token outputs: padded positions may differ
        got, theirs = got[keep], theirs[keep]
    assert np.max(np.abs(got - theirs)) <= TOLERANCE


def test_a_tree_that_does_not_fit_is_refused_naming_the_entries():
    folder = FIXTURES / "bert" / "msgpack"
    saved = serialization.msgpack_restore((folder / "flax_model.msgpack").read_bytes())
    model = flaxauto.AutoModelForMaskedLM.from_pretrained(folder)
    saved["bert"]["extra"] = {"kernel": np.zeros((2, 2), np.float32)}
    with pytest.raises(CheckpointError, match="extra"):
        flaxauto.load_flax_params(model, saved)
