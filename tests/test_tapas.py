"""TAPAS beyond the conformance suite: the segment operations against transformers' own, the
table QA losses and their gradients in every supervision mode, the position reset, and answer
decoding against TapasTokenizer.convert_logits_to_predictions.

Every reference is computed here by transformers.models.tapas (PyTorch) on the same weights and
inputs."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.models.tapas import modeling_tapas as torch_tapas

import flaxauto
from flaxauto import segments
from flaxauto.converters.layout import export_tensors
from flaxauto.heads.table import answers_as_text, convert_logits_to_predictions
from references import max_diff, task_inputs, task_labels, to_torch, torch_model

TASK = "table-question-answering"
README = Path(__file__).parents[1] / "README.md"

# -- segment operations ------------------------------------------------------------------------


def _random_index(rng, shape, num_segments, batch_dims):
    indices = rng.integers(0, num_segments, size=shape)
    ours = segments.index_map(indices, num_segments, batch_dims)
    theirs = torch_tapas.IndexMap(torch.as_tensor(indices), num_segments, batch_dims)
    return ours, theirs


@pytest.mark.parametrize("batch_dims", [1, 2])
@pytest.mark.parametrize("vector", [(), (3,)])
@pytest.mark.parametrize("reduce", ["reduce_sum", "reduce_mean", "reduce_max", "reduce_min"])
def test_segment_reductions_equal_transformers(reduce, vector, batch_dims):
    rng = np.random.default_rng(0)
    # 7 segments over 6 entries: some segments are empty (transformers gives them 0)
    shape = (2, 3, 6)[-(batch_dims + 1) :]
    ours_index, their_index = _random_index(rng, shape, 7, batch_dims)
    values = rng.standard_normal(shape + vector).astype(np.float32)
    ours, ours_out_index = jax.jit(getattr(segments, reduce))(jnp.asarray(values), ours_index)
    # transformers' reductions take scalars per entry only: vectors are compared per component
    components = [values] if not vector else [values[..., k] for k in range(vector[0])]
    results = [getattr(torch_tapas, reduce)(torch.as_tensor(c), their_index) for c in components]
    theirs = np.stack([r[0].numpy() for r in results], axis=-1) if vector else results[0][0]
    their_out_index = results[0][1]
    assert ours.shape == tuple(theirs.shape)
    assert max_diff(ours, theirs) <= 1e-6
    assert np.array_equal(ours_out_index.indices, their_out_index.indices.numpy())
    assert ours_out_index.num_segments == their_out_index.num_segments
    assert ours_out_index.batch_dims == their_out_index.batch_dims


def test_segment_reductions_of_integers_keep_their_dtype():
    rng = np.random.default_rng(1)
    ours_index, their_index = _random_index(rng, (3, 8), 5, 1)
    values = rng.integers(0, 2, size=(3, 8))
    ours, _ = segments.reduce_max(jnp.asarray(values), ours_index)
    theirs, _ = torch_tapas.reduce_max(torch.as_tensor(values), their_index)
    assert jnp.issubdtype(ours.dtype, jnp.integer)
    assert np.array_equal(ours, theirs.numpy())


def test_gather_flatten_and_range_index_equal_transformers():
    rng = np.random.default_rng(2)
    ours_index, their_index = _random_index(rng, (3, 10), 6, 1)
    values = rng.standard_normal((3, 6)).astype(np.float32)
    gathered = jax.jit(segments.gather)(jnp.asarray(values), ours_index)
    assert np.array_equal(gathered, torch_tapas.gather(torch.as_tensor(values), their_index))
    flat, their_flat = segments.flatten(ours_index), torch_tapas.flatten(their_index)
    assert np.array_equal(flat.indices, their_flat.indices.numpy())
    assert (flat.num_segments, flat.batch_dims) == (their_flat.num_segments, 0)
    ours_range = segments.range_index_map((3,), 6)
    theirs_range = torch_tapas.range_index_map(torch.Size([3]), 6)
    assert np.array_equal(ours_range.indices, theirs_range.indices.numpy())


def test_gather_of_vectors_per_segment():
    """values [B, S, V] at index [B, S]: transformers' only vector case (index shaped as the
    segments); flaxauto gathers vectors for any index shape."""
    rng = np.random.default_rng(3)
    ours_index, their_index = _random_index(rng, (2, 5), 5, 1)
    values = rng.standard_normal((2, 5, 4)).astype(np.float32)
    ours = segments.gather(jnp.asarray(values), ours_index)
    assert np.array_equal(ours, torch_tapas.gather(torch.as_tensor(values), their_index).numpy())


def test_product_index_and_projections_equal_transformers():
    rng = np.random.default_rng(4)
    rows, their_rows = _random_index(rng, (2, 12), 4, 1)
    columns, their_columns = _random_index(rng, (2, 12), 3, 1)
    cells = segments.product_index(rows, columns)
    their_cells = torch_tapas.ProductIndexMap(their_rows, their_columns)
    assert np.array_equal(cells.indices, their_cells.indices.numpy())
    assert cells.num_segments == their_cells.num_segments
    values = rng.standard_normal((2, 12)).astype(np.float32)
    _, per_cell = segments.reduce_mean(jnp.asarray(values), cells)
    _, their_per_cell = torch_tapas.reduce_mean(torch.as_tensor(values), their_cells)
    for projection in ("project_outer", "project_inner"):
        ours = getattr(cells, projection)(per_cell)
        theirs = getattr(their_cells, projection)(their_per_cell)
        assert np.array_equal(ours.indices, theirs.indices.numpy())
        assert ours.num_segments == theirs.num_segments
    # an index map crosses jit boundaries as a pytree (segment counts static)
    doubled = jax.jit(lambda index: segments.index_map(index.indices * 2, 8, 1))(cells)
    assert np.array_equal(doubled.indices, 2 * np.asarray(cells.indices))


# -- losses and gradients ----------------------------------------------------------------------

#: Supervision modes (transformers' fine-tuning setups), each with settings that change the loss.
#: Dropout is off so that PyTorch's and flaxauto's losses see the same network.
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
STRONG = dict(
    num_aggregation_labels=0, use_answer_as_supervision=None, average_logits_per_cell=False
)
MODES = {
    # SQA: cells only, one column
    "strong-cells": dict(STRONG, temperature=0.7),
    # cells anywhere, weighted per token; allow_empty_column_selection is irrelevant there
    "strong-cells-any-column": dict(STRONG, select_one_column=False, positive_label_weight=3.0),
    # WikiSQL-supervised: the aggregation operator is given
    "strong-aggregation": dict(
        STRONG,
        num_aggregation_labels=4,
        aggregation_loss_weight=0.8,
        allow_empty_column_selection=True,
    ),  # fmt: skip
    # WTQ: learnt from the answer (the tiny config's setting), ratio average
    "weak": dict(),
    "weak-first-order-normalized": dict(
        average_approximation_function="first_order",
        use_normalized_answer_loss=True,
        aggregation_temperature=0.5,
        answer_loss_importance=0.3,
    ),  # fmt: skip
    # a cutoff small enough to drop some examples' answer loss; no cell averaging
    "weak-second-order-cutoff": dict(
        average_approximation_function="second_order",
        answer_loss_cutoff=0.5,
        average_logits_per_cell=False,
        cell_selection_preference=0.9,
    ),  # fmt: skip
    "weak-no-per-token-loss": dict(disable_per_token_loss=True),
}


def _labels(model, inputs) -> dict:
    labels = task_labels(model, TASK, inputs)
    if not model.config.select_one_column:
        # transformers' per-token loss takes Bernoulli log-probabilities of the labels, which
        # must be floats there (int labels fail in torch); flaxauto takes either
        labels["labels"] = labels["labels"].astype(np.float32)
    return labels


def _pair(tmp_path, overrides, seed=0):
    reference = torch_model("tapas", TASK, seed=seed, **NO_DROPOUT, **overrides)
    reference.save_pretrained(tmp_path)
    ours = flaxauto.AutoModelForTableQuestionAnswering.from_pretrained(tmp_path)
    return reference, ours


def _torch_grads(reference, batch) -> tuple[float, dict[str, np.ndarray]]:
    reference.zero_grad()
    out = reference(**to_torch(batch))
    out.loss.backward()
    grads = {
        n: p.grad.numpy().copy() for n, p in reference.named_parameters() if p.grad is not None
    }
    return out, grads


def _flax_grads(model, batch) -> tuple[object, dict[str, np.ndarray]]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        out = nnx.merge(graphdef, params, rest)(**batch)
        return out.loss, out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    holder = nnx.merge(graphdef, grads, rest)  # gradients in the parameters' places: torch names
    return out, dict(export_tensors(holder))


@pytest.mark.parametrize("mode", MODES)
def test_table_qa_loss_and_gradients_equal_transformers(mode, tmp_path):
    reference, ours = _pair(tmp_path, MODES[mode])
    inputs = task_inputs("tapas", TASK, config=reference.config)
    batch = {**inputs, **_labels(reference, inputs)}
    their_out, their_grads = _torch_grads(reference, batch)
    our_out, our_grads = _flax_grads(ours, batch)
    assert their_out.loss.item() > 0
    assert max_diff(our_out.loss, their_out.loss) <= 1e-4
    assert max_diff(our_out.logits, their_out.logits) <= 1e-4
    pad = reference.config.pad_token_id
    for name, grad in their_grads.items():
        ours_grad = our_grads[name]
        if name.endswith("word_embeddings.weight"):
            # torch's Embedding(padding_idx) never updates the padding row; flaxauto does not
            # single it out (as its BERT), so only the other rows are compared
            ours_grad, grad = np.delete(ours_grad, pad, 0), np.delete(grad, pad, 0)
        scale = max(1.0, float(np.max(np.abs(grad))))
        assert np.max(np.abs(ours_grad - grad)) <= 1e-4 * scale, name
    assert any(np.any(g != 0) for g in their_grads.values())
    # every torch gradient has its flaxauto counterpart and no flaxauto parameter is extra
    assert set(their_grads) <= set(our_grads)


def test_weak_supervision_asks_for_its_labels(tmp_path):
    _, ours = _pair(tmp_path, {})
    inputs = task_inputs("tapas", TASK, config=ours.config)
    labels = task_labels(ours, TASK, inputs)
    with pytest.raises(ValueError, match="float_answer"):
        ours(**inputs, labels=labels["labels"])
    with pytest.raises(ValueError, match="numeric_values"):
        ours(**inputs, labels=labels["labels"], float_answer=labels["float_answer"])


def test_gumbel_sampling_in_the_answer_loss_is_refused(tmp_path):
    _, ours = _pair(tmp_path, dict(use_gumbel_for_cells=True))
    inputs = task_inputs("tapas", TASK, config=ours.config)
    assert ours(**inputs).logits.shape == inputs["input_ids"].shape  # inference is unaffected
    with pytest.raises(NotImplementedError, match="use_gumbel_for_cells"):
        ours(**inputs, **task_labels(ours, TASK, inputs))


@pytest.mark.parametrize("reset", [True, False])
def test_position_ids_restart_per_cell_as_transformers(reset, tmp_path):
    reference = torch_model("tapas", "base", reset_position_index_per_cell=reset)
    reference.save_pretrained(tmp_path)
    ours = flaxauto.AutoModel.from_pretrained(tmp_path)
    inputs = task_inputs("tapas", "base", config=reference.config)
    with torch.no_grad():
        theirs = reference.embeddings(
            input_ids=torch.as_tensor(inputs["input_ids"]),
            token_type_ids=torch.as_tensor(inputs["token_type_ids"]),
        )
    embeddings = ours.backbone.embeddings(
        jnp.asarray(inputs["input_ids"]), jnp.asarray(inputs["token_type_ids"]), None, None
    )
    assert max_diff(embeddings, theirs) <= 1e-5
    positions = ours.backbone.embeddings.default_position_ids(
        jnp.asarray(inputs["token_type_ids"]), inputs["input_ids"].shape
    )
    # the table's cells are one token each: with the reset every body token is at position 0
    assert bool(jnp.all((positions == 0) | (inputs["token_type_ids"][..., 2] == 0))) == reset


def test_inference_without_select_one_column_returns_token_logits(tmp_path):
    """transformers' forward fails here without labels (it builds a column distribution from no
    column logits); flaxauto returns the per-token cell logits it computes with labels."""
    overrides = dict(STRONG, select_one_column=False)
    reference, ours = _pair(tmp_path, overrides)
    inputs = task_inputs("tapas", TASK, config=reference.config)
    batch = {**inputs, **_labels(reference, inputs)}
    with torch.no_grad():
        expected = reference(**to_torch(batch)).logits
    assert max_diff(ours(**inputs).logits, expected) <= 1e-4


# -- answer decoding ---------------------------------------------------------------------------


def test_answer_decoding_equals_the_tokenizers(tapas_example):
    tokenizer, table, inputs, ours, _ = tapas_example
    out = ours(**inputs)
    raw = np.array(out.logits)  # a writable copy: torch refuses read-only arrays
    centred = raw - np.median(raw[raw > -5000])  # half the selectable tokens above 0.5
    selected = []
    for logits in (raw, 30 * raw, 30 * centred):  # near 0.5, spread out, around the threshold
        expected = tokenizer.convert_logits_to_predictions(
            to_torch(inputs),
            torch.as_tensor(logits),
            torch.as_tensor(np.array(out.logits_aggregation)),
        )
        got = convert_logits_to_predictions(inputs, logits, out.logits_aggregation)
        assert got == expected
        assert convert_logits_to_predictions(inputs, logits) == expected[:1]
        selected.append(any(expected[0]))
    assert any(selected)  # some cells are selected


# -- an end-to-end example: TapasTokenizer and a pandas table --------------------------------

TABLE = {
    "Actors": ["Brad Pitt", "Leonardo Di Caprio", "George Clooney"],
    "Age": ["56", "45", "59"],
    "Number of movies": ["87", "53", "69"],
}
QUERIES = ["How many movies has George Clooney played in?", "What is the total number of movies?"]
AGGREGATIONS = {0: "NONE", 1: "SUM", 2: "AVERAGE", 3: "COUNT"}


def write_tiny_tapas(directory):
    """A seeded tiny WTQ-style TapasForQuestionAnswering and its TapasTokenizer, over a vocabulary
    built from TABLE and QUERIES (no hub)."""
    from transformers import TapasTokenizer

    words = {
        w for text in [*QUERIES, *TABLE, *sum(TABLE.values(), [])] for w in text.lower().split()
    }
    words = sorted({w.strip("?") for w in words} | {"?"})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[EMPTY]"]
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(specials + words) + "\n")
    tokenizer = TapasTokenizer(str(vocab))
    tokenizer.save_pretrained(directory)
    reference = torch_model(
        "tapas", TASK, vocab_size=len(specials) + len(words), aggregation_labels=AGGREGATIONS,
        no_aggregation_label_index=0,
    )  # fmt: skip
    reference.save_pretrained(directory)
    return tokenizer, reference


@pytest.fixture(scope="module")
def tapas_example(tmp_path_factory):
    import pandas as pd

    directory = tmp_path_factory.mktemp("tiny-tapas")
    tokenizer, reference = write_tiny_tapas(directory)
    table = pd.DataFrame.from_dict(TABLE)
    inputs = dict(tokenizer(table=table, queries=QUERIES, padding="longest", return_tensors="np"))
    ours = flaxauto.AutoModelForTableQuestionAnswering.from_pretrained(directory)
    return tokenizer, table, inputs, ours, (directory, reference)


def test_answers_as_text_equal_the_pytorch_models(tapas_example):
    """The same table and questions through transformers' model and tokenizer decoding, answers
    written as transformers' table QA pipeline writes them ("SUM > 87, 53")."""
    tokenizer, table, inputs, ours, (_, reference) = tapas_example
    with torch.no_grad():
        their_out = reference(**to_torch(inputs))
    coordinates, operators = tokenizer.convert_logits_to_predictions(
        to_torch(inputs), their_out.logits, their_out.logits_aggregation
    )
    expected = []
    for cells, operator in zip(coordinates, operators, strict=True):
        text = ", ".join(table.iat[cell] for cell in cells)
        expected.append(
            text if AGGREGATIONS[operator] == "NONE" else f"{AGGREGATIONS[operator]} > {text}"
        )
    out = ours(**inputs)
    coordinates, operators = convert_logits_to_predictions(
        inputs, out.logits, out.logits_aggregation
    )
    assert (
        answers_as_text(table, coordinates, operators, ours.config.aggregation_labels) == expected
    )


def test_readme_table_question_answering_example_runs(tapas_example):
    """The README's example, executed on the tiny checkpoint in place of the hub's."""
    _, _, inputs, ours, (directory, _) = tapas_example
    text = README.read_text()
    found = re.search(r"<!-- table-qa-example:start -->\n```python\n(.*?)```", text, re.S)
    assert found, "README.md lost its table QA example markers"
    code = found.group(1).replace('"google/tapas-base-finetuned-wtq"', repr(str(directory)))
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    out = ours(**inputs)
    coordinates, operators = convert_logits_to_predictions(
        inputs, out.logits, out.logits_aggregation
    )
    table = namespace["table"]
    assert namespace["answers"] == answers_as_text(
        table, coordinates, operators, ours.config.aggregation_labels
    )
    assert len(namespace["answers"]) == len(QUERIES)
