"""The references themselves: the input and label factories of every modality are checked against
transformers' PyTorch models of that type (built from tests/references.py's tiny configs), so
that a family registered later is compared on inputs its transformers model really accepts.

The probed model_types (PROBE_CONFIGS) have no flaxauto family yet; nothing here touches
flaxauto's models.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from references import (
    BATCH,
    DECODER_LENGTH,
    INPUT_FACTORIES,
    LABEL_FACTORIES,
    MODALITIES,
    NO_ATTENTION,
    PROBE_CONFIGS,
    TABLE_COLUMNS,
    TABLE_TOKEN_TYPES,
    TASK_FIELDS,
    TINY_CONFIGS,
    run_torch,
    task_inputs,
    task_labels,
    torch_model,
)

#: The tasks whose factories each not-yet-served model_type checks.
PROBES = {
    "wav2vec2": ("base", "audio-classification"),
    "whisper": ("base", "speech-seq2seq", "audio-classification"),
    "vit": ("base", "image-classification"),
    "videomae": ("base", "video-classification"),
    "detr": ("base", "object-detection"),
    "tapas": ("base", "table-question-answering"),
    "t5": ("base", "seq2seq-lm"),
}
PROBE_PAIRS = [(model_type, task) for model_type, tasks in PROBES.items() for task in tasks]

#: mean total-variation distance of an attention row from uniform (over the keys it may see)
#: below which a reference's attention counts as near uniform (transformers' default 0.02 init
#: gives about 0.01; 0.25 gives 0.2-0.6)
NEAR_UNIFORM = 0.2


@pytest.fixture(scope="module", params=PROBE_PAIRS, ids=[f"{m}-{t}" for m, t in PROBE_PAIRS])
def probe(request):
    model_type, task = request.param
    model = torch_model(model_type, task)
    inputs = task_inputs(model_type, task, config=model.config)
    labels = task_labels(model, task, inputs)
    return model_type, task, model, inputs, labels


def test_every_modality_and_task_has_a_factory_and_a_probe():
    # a probed model_type stays probed when its family registers (its config moves to TINY_CONFIGS)
    assert set(PROBE_CONFIGS) <= set(PROBES) <= set(PROBE_CONFIGS) | set(TINY_CONFIGS)
    assert set(MODALITIES.values()) | {"text"} == set(INPUT_FACTORIES)
    probed = {task for tasks in PROBES.values() for task in tasks} - {"base"}
    assert probed <= set(LABEL_FACTORIES)
    # a modality is probed here until a served family's conformance cases run on it
    covered = {MODALITIES[t] for t in (*PROBES, *TINY_CONFIGS) if t in MODALITIES}
    assert covered == set(INPUT_FACTORIES) - {"text"}


def test_transformers_reads_every_input_and_label_by_name(probe):
    """transformers' forward takes **kwargs, which would swallow a misnamed input silently."""
    model_type, task, model, inputs, labels = probe
    parameters = inspect.signature(type(model).forward).parameters
    assert set(inputs) | set(labels) <= set(parameters)


def test_transformers_runs_on_the_factories(probe):
    model_type, task, model, inputs, labels = probe
    output = run_torch(model, {**inputs, **labels})
    fields = [f for f in TASK_FIELDS.get(task, ("logits",)) if getattr(output, f, None) is not None]
    assert fields, f"none of {TASK_FIELDS.get(task, ('logits',))} in {list(output.keys())}"
    for field in fields:
        assert torch.isfinite(getattr(output, field)).all(), field
        assert getattr(output, field).shape[0] == BATCH, field
    if labels:
        assert torch.isfinite(output.loss) and output.loss > 0


LABELLED_PAIRS = [(model_type, task) for model_type, task in PROBE_PAIRS if task != "base"]


@pytest.mark.parametrize(
    "probe", LABELLED_PAIRS, ids=[f"{m}-{t}" for m, t in LABELLED_PAIRS], indirect=True
)
def test_every_label_moves_the_loss(probe):
    """Each label the factory gives reaches transformers' loss (none is ignored wholesale)."""
    model_type, task, model, inputs, labels = probe
    assert labels
    loss = run_torch(model, {**inputs, **labels}).loss
    other = task_labels(model, task, inputs, seed=7)
    for name in labels:
        if not isinstance(labels[name], list) and np.array_equal(labels[name], other[name]):
            other[name] = labels[name] * 2  # constant by construction (TAPAS' one-token cells)
        changed = run_torch(model, {**inputs, **labels, name: other[name]}).loss
        assert not torch.equal(changed, loss), name


def test_encoder_decoders_get_decoder_inputs_from_the_start_token(probe):
    model_type, task, model, inputs, labels = probe
    takes = "decoder_input_ids" in inspect.signature(type(model).forward).parameters
    assert ("decoder_input_ids" in inputs) == takes
    if takes:
        ids = inputs["decoder_input_ids"]
        assert ids.shape == (BATCH, DECODER_LENGTH)
        assert (ids[:, 0] == model.config.decoder_start_token_id).all()
        assert (ids < model.config.vocab_size).all()


@pytest.mark.parametrize("model_type", ["vit", "videomae"])
def test_pixels_are_channels_first(model_type):
    config = torch_model(model_type, "base").config
    pixels = task_inputs(model_type, "base", config=config)["pixel_values"]
    frames = (config.num_frames,) if model_type == "videomae" else ()
    size = (config.image_size, config.image_size)
    assert pixels.shape == (BATCH, *frames, config.num_channels, *size)
    assert pixels.dtype == np.float32 and abs(pixels.mean()) < 0.2 and 0.8 < pixels.std() < 1.2


def test_padded_images_are_zero_outside_their_mask():
    config = torch_model("detr", "base").config
    inputs = task_inputs("detr", "base", config=config)
    pixels, mask = inputs["pixel_values"], inputs["pixel_mask"]
    assert pixels.shape[:2] == (BATCH, config.num_channels) and mask.shape == (
        BATCH,
        *pixels.shape[2:],
    )
    assert set(np.unique(mask)) == {0, 1} and mask[0].all() and not mask[1:].all()
    assert (pixels[np.broadcast_to(mask[:, None] == 0, pixels.shape)] == 0).all()
    # each image is a top-left rectangle, as the image processor pads bottom and right
    for image in mask:
        rows, columns = image.any(1).sum(), image.any(0).sum()
        assert image[:rows, :columns].all() and image.sum() == rows * columns


def test_waveforms_are_zero_padded_on_the_right():
    inputs = task_inputs("wav2vec2", "base")
    values, mask = inputs["input_values"], inputs["attention_mask"]
    assert values.dtype == np.float32 and values.shape == mask.shape and values.shape[0] == BATCH
    assert mask[0].all() and not mask[1:].all()
    assert (np.diff(mask, axis=1) <= 0).all()  # ones, then zeros
    assert (values[mask == 0] == 0).all()


def test_log_mel_features_fill_whispers_window():
    config = torch_model("whisper", "base").config
    features = task_inputs("whisper", "base", config=config)["input_features"]
    assert features.shape == (BATCH, config.num_mel_bins, 2 * config.max_source_positions)
    assert features.dtype == np.float32 and features.min() >= -1 and features.max() <= 1.5


def test_table_token_types_describe_a_table():
    config = torch_model("tapas", "base").config
    inputs = task_inputs("tapas", "base", config=config)
    types = inputs["token_type_ids"]
    assert types.shape == (*inputs["input_ids"].shape, len(TABLE_TOKEN_TYPES))
    assert (types >= 0).all() and (types < np.asarray(config.type_vocab_sizes)).all()
    segment, columns, rows = types[..., 0], types[..., 1], types[..., 2]
    assert ((columns > 0) == (segment == 1)).all()  # every table token has a column
    assert ((types[..., 4] > 0) == (rows > 0)).all()  # body cells are ranked, header is not
    for row in range(BATCH):  # each column's body cells have ranks 1..rows, inverse ranks reversed
        for column in range(1, TABLE_COLUMNS + 1):
            cells = (columns[row] == column) & (rows[row] > 0)
            ranks, inverse = types[row, cells, 4], types[row, cells, 5]
            assert sorted(ranks) == list(range(1, cells.sum() + 1))
            assert (ranks + inverse == cells.sum() + 1).all()


def test_table_answers_lie_in_one_column_of_the_body():
    model = torch_model("tapas", "table-question-answering")
    inputs = task_inputs("tapas", "table-question-answering", config=model.config)
    labels = task_labels(model, "table-question-answering", inputs)
    columns, rows = inputs["token_type_ids"][..., 1], inputs["token_type_ids"][..., 2]
    for row in range(BATCH):
        picked = labels["labels"][row] == 1
        assert picked.any() and (rows[row][picked] > 0).all()
        assert len(set(columns[row][picked])) == 1
    assert np.isnan(labels["float_answer"]).any() and not np.isnan(labels["float_answer"]).all()


def test_detection_targets_are_normalised_boxes_inside_the_image():
    model = torch_model("detr", "object-detection")
    targets = task_labels(model, "object-detection", task_inputs("detr", "object-detection"))[
        "labels"
    ]
    assert isinstance(targets, list) and len(targets) == BATCH
    for target in targets:
        assert set(target) == {"class_labels", "boxes"}
        boxes, classes = target["boxes"], target["class_labels"]
        assert boxes.dtype == np.float32 and boxes.shape == (len(classes), 4) and len(classes)
        assert ((classes >= 0) & (classes < model.config.num_labels)).all()
        center, size = boxes[:, :2], boxes[:, 2:]
        assert (
            (size > 0).all() and (center - size / 2 >= 0).all() and (center + size / 2 <= 1).all()
        )


def test_seq2seq_labels_ignore_only_a_tail():
    model = torch_model("t5", "seq2seq-lm")
    labels = task_labels(model, "seq2seq-lm", task_inputs("t5", "seq2seq-lm"))["labels"]
    assert labels.shape == (BATCH, DECODER_LENGTH)
    ignored = labels == -100
    assert ignored.any() and not ignored[0].any() and (np.diff(ignored, axis=1) >= 0).all()


def _distance_from_uniform(attentions) -> float:
    """Mean total-variation distance of each attention row from uniform over its visible keys
    (masked keys get exactly 0 in transformers' eager attention)."""
    distances = []
    for layer in attentions:
        probs = layer.float().numpy()  # [B, H, T, S]
        visible = probs > 0
        uniform = 1.0 / visible.sum(-1, keepdims=True)
        distances.append(0.5 * np.abs(np.where(visible, probs - uniform, 0)).sum(-1).mean())
    return float(np.mean(distances))


@pytest.mark.parametrize("model_type", sorted((TINY_CONFIGS | PROBE_CONFIGS).keys() - NO_ATTENTION))
def test_reference_attention_is_far_from_uniform(model_type):
    """The init scale at work: a dropped scale, mask or rope setting must move outputs well past
    the tolerance, which it does not when every attention row is nearly uniform."""
    model = torch_model(model_type, "base")
    inputs = task_inputs(model_type, "base", config=model.config)
    output = run_torch(model, inputs, output_attentions=True)
    attentions = [
        layer
        for name in ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions")
        for layer in (getattr(output, name, None) or ())
    ]
    assert attentions
    assert _distance_from_uniform(attentions) > NEAR_UNIFORM


def test_table_labels_follow_the_supervision_setting():
    """Strongly supervised TAPAS (WikiSQL-supervised) reads the aggregation operator; the weakly
    supervised one (WTQ, the tiny config) reads the answer and the cells' numbers instead."""
    task = "table-question-answering"
    weak = torch_model("tapas", task)
    strong = torch_model("tapas", task, use_answer_as_supervision=False)
    inputs = task_inputs("tapas", task, config=strong.config)
    assert set(task_labels(weak, task, inputs)) == {
        "labels", "float_answer", "numeric_values", "numeric_values_scale",
    }  # fmt: skip
    labels = task_labels(strong, task, inputs)
    assert set(labels) == {"labels", "aggregation_labels"}
    loss = run_torch(strong, {**inputs, **labels}).loss
    operators = (labels["aggregation_labels"] + 1) % strong.config.num_aggregation_labels
    moved = run_torch(strong, {**inputs, **labels, "aggregation_labels": operators}).loss
    assert torch.isfinite(loss) and not torch.equal(moved, loss)
