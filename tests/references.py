"""Live references for the tests: tiny seeded transformers PyTorch models, their checkpoints and
inputs. Every number a test checks is computed here from PyTorch, never typed in."""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers

import flaxauto
from flaxauto.registry import transformers_class_name

#: Kernels drawn this wide make attention far from uniform (mean total-variation distance of an
#: attention row from uniform ~0.3-0.45 at 0.25, ~0.01 at transformers' default 0.02, where a
#: dropped scale or rope setting moves outputs by about 1e-4 and hides inside the tolerance).
INITIALIZER_RANGE = 0.25

#: A tiny config per model_type: small enough to run every head in seconds.
TINY_CONFIGS = {
    "bert": dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        type_vocab_size=3,
        num_labels=3,
        initializer_range=INITIALIZER_RANGE,
    ),
}
TINY_CONFIGS["roberta"] = dict(TINY_CONFIGS["bert"], type_vocab_size=2, pad_token_id=1)
TINY_CONFIGS["xlm-roberta"] = dict(TINY_CONFIGS["roberta"])
TINY_CONFIGS["distilbert"] = dict(
    vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64,
    num_labels=3, initializer_range=INITIALIZER_RANGE,
)  # fmt: skip

_DECODER = dict(
    vocab_size=99, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=3,
    initializer_range=INITIALIZER_RANGE,
)  # fmt: skip
_LLAMA = dict(
    _DECODER, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
    max_position_embeddings=64,
)  # fmt: skip
TINY_CONFIGS["gpt2"] = dict(_DECODER, n_embd=32, n_layer=2, n_head=4, n_inner=37, n_positions=64)
# grouped-query attention, head_dim != hidden / heads, every bias, untied lm_head
TINY_CONFIGS["llama"] = dict(
    _LLAMA, num_key_value_heads=2, head_dim=16, attention_bias=True, mlp_bias=True
)
# multi-query attention, a sliding window shorter than the inputs
TINY_CONFIGS["mistral"] = dict(_LLAMA, num_key_value_heads=1, sliding_window=4)
# a full-attention layer then a sliding one; tied lm_head
TINY_CONFIGS["qwen2"] = dict(
    _LLAMA, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
    max_window_layers=1, tie_word_embeddings=True,
)  # fmt: skip

_PATCHES = dict(
    image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
    num_attention_heads=4, intermediate_size=37, num_labels=3, initializer_range=INITIALIZER_RANGE,
)  # fmt: skip
TINY_CONFIGS["vit"] = dict(_PATCHES)
TINY_CONFIGS["deit"] = dict(_PATCHES)
# a relative position bias per layer, layer scale, mean pooling; the shared bias and the
# [CLS] path are tested in tests/test_vision_transformers.py
TINY_CONFIGS["beit"] = dict(
    _PATCHES, use_relative_position_bias=True, layer_scale_init_value=0.5, use_mean_pooling=True
)
TINY_CONFIGS["videomae"] = dict(_PATCHES, num_frames=4, tubelet_size=2)
# a non-square patch grid (4 x 6), three layers (two mid position tables), five detection tokens
TINY_CONFIGS["yolos"] = dict(
    _PATCHES, image_size=[16, 24], num_hidden_layers=3, num_detection_tokens=5
)
# convolutional image families: channels divisible by the 4-way FSDP axis; ResNet's and
# RegNet's 16x16 pixels end 2x2 after the stem and two stages
TINY_CONFIGS["resnet"] = dict(
    embedding_size=8, hidden_sizes=[16, 32], depths=[2, 1], layer_type="bottleneck", num_labels=3,
)  # fmt: skip
TINY_CONFIGS["regnet"] = dict(
    embedding_size=8, hidden_sizes=[16, 32], depths=[2, 1], groups_width=8, layer_type="y",
    num_labels=3,
)  # fmt: skip
# layer scale away from its 1e-6 default (which would hide each block's branch); drop path set,
# so eval must turn it off
TINY_CONFIGS["convnext"] = dict(
    hidden_sizes=[8, 16], depths=[2, 1], num_stages=2, patch_size=4, image_size=32,
    layer_scale_init_value=0.5, drop_path_rate=0.1, num_labels=3,
    initializer_range=INITIALIZER_RANGE,
)  # fmt: skip
# T5 scales its init by fan-in: the default already gives attention far from uniform. Heads
# of width d_kv with num_heads * d_kv != d_model, a decoder deeper than the encoder, few buckets
# (the logarithmic ones reached within LENGTH); relu (t5) and gated-gelu (mt5, umt5)
TINY_CONFIGS["t5"] = dict(
    vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=3, num_heads=3,
    relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0,
    eos_token_id=1, decoder_start_token_id=0, num_labels=3,
)  # fmt: skip
TINY_CONFIGS["mt5"] = dict(TINY_CONFIGS["t5"], feed_forward_proj="gated-gelu")
TINY_CONFIGS["umt5"] = dict(TINY_CONFIGS["t5"], feed_forward_proj="gated-gelu")
#: wav2vec2 pre-norm with layer-normed convolutions and a weighted layer sum; HuBERT post-norm
#: with a group-normed first convolution, conv biases off and an odd positional width
TINY_CONFIGS["wav2vec2"] = dict(
    vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=20, conv_dim=(32, 32, 32), conv_stride=(4, 4, 4), conv_kernel=(8, 8, 8),
    conv_bias=True, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
    feat_extract_norm="layer", do_stable_layer_norm=True, classifier_proj_size=12,
    use_weighted_layer_sum=True, num_labels=3, initializer_range=INITIALIZER_RANGE,
)  # fmt: skip
TINY_CONFIGS["hubert"] = dict(
    TINY_CONFIGS["wav2vec2"], conv_bias=False, num_conv_pos_embeddings=15,
    feat_extract_norm="group", do_stable_layer_norm=False, use_weighted_layer_sum=False,
    ctc_loss_reduction="mean",
)  # fmt: skip

TINY_CONFIGS["whisper"] = dict(
    vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, num_mel_bins=8,
    max_source_positions=12, max_target_positions=32, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, decoder_start_token_id=3, suppress_tokens=None, begin_suppress_tokens=None,
    classifier_proj_size=12, num_labels=3, init_std=INITIALIZER_RANGE,
)  # fmt: skip

#: Tiny configs for model_types no family serves yet (TINY_CONFIGS holds the served ones, which
#: other tests iterate as "every family"). The factories below are checked against transformers'
#: PyTorch models built from them (tests/test_references.py); a family that registers one of these
#: model_types moves its entry into TINY_CONFIGS and gets the conformance suite with it.
PROBE_CONFIGS: dict[str, dict] = {}
TINY_CONFIGS["bart"] = dict(
    vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64,
    pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, num_labels=3,
    init_std=INITIALIZER_RANGE,
)  # fmt: skip
# pre-norm with final layer norms; decoder inputs start with each row's last token
TINY_CONFIGS["mbart"] = dict(TINY_CONFIGS["bart"], scale_embedding=True)
# pre-norm, sinusoidal positions, no layernorm_embedding
TINY_CONFIGS["pegasus"] = dict(TINY_CONFIGS["mbart"])
# post-norm, sinusoidal positions computed (not saved), no layernorm_embedding, scaled embeddings,
# opus-mt's ids: pad is the decoder start token, eos 0; swish as opus-mt's configs
TINY_CONFIGS["marian"] = dict(
    TINY_CONFIGS["bart"], scale_embedding=True, activation_function="swish", pad_token_id=1,
    eos_token_id=0, bos_token_id=None, decoder_start_token_id=1, forced_eos_token_id=0,
)  # fmt: skip
# transformers' ResNet backbone (timm-named checkpoints: tests/test_detr.py); 32x40 pixels end
# 4x5 = 20 feature tokens after the stem and two stages
TINY_CONFIGS["detr"] = dict(
    use_timm_backbone=False, use_pretrained_backbone=False, backbone=None,
    backbone_config=dict(
        model_type="resnet", num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
        layer_type="basic", out_features=["stage2"],
    ),
    d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, num_queries=6, num_labels=3,
    init_std=INITIALIZER_RANGE, init_xavier_std=1.0,
)  # fmt: skip
#: TAPAS as fine-tuned on WTQ (weak supervision: aggregation learned from the answer), the setting
#: that reads every table label; position ids restart in every cell.
TINY_CONFIGS["tapas"] = dict(
    TINY_CONFIGS["bert"], type_vocab_sizes=[3, 5, 6, 2, 6, 6, 10], max_position_embeddings=64,
    num_aggregation_labels=4, use_answer_as_supervision=True, answer_loss_cutoff=100.0,
    cell_selection_preference=0.5, huber_loss_delta=25.0, average_logits_per_cell=True,
    select_one_column=True, reset_position_index_per_cell=True,
    init_cell_selection_weights_to_zero=False,
)  # fmt: skip
del TINY_CONFIGS["tapas"]["type_vocab_size"]

#: What a model_type reads: the input factory that feeds it (default "text").
MODALITIES = {
    "vit": "image",
    "deit": "image",
    "beit": "image",
    "videomae": "video",
    "yolos": "image",
    "wav2vec2": "waveform",
    "hubert": "waveform",
    "whisper": "log-mel",
    "detr": "padded-image",
    "tapas": "table",
    "resnet": "image",
    "regnet": "image",
    "convnext": "image",
}

#: Families without attention (convolutional): no attention probabilities to check for spread.
NO_ATTENTION = {"resnet", "regnet", "convnext"}

#: Decoders are fed left-padded batches (as for generation). A padding position is a query with
#: nothing to attend to, so its outputs are undefined: tests compare real tokens only.
DECODERS = {"gpt2", "llama", "mistral", "qwen2"}

#: Encoder-decoders whose tokenizers end every row with one eos token (BART's classifiers pool
#: the decoder output there).
EOS_ENDED = {"bart", "mbart", "marian", "t5", "mt5", "umt5"}

#: Tasks whose encoder-decoder classes build their decoder inputs from input_ids (BART's
#: classifiers pool at input_ids' eos positions): their batches carry no decoder inputs.
DECODER_FROM_INPUT_IDS = {"sequence-classification", "question-answering"}

#: Families whose backbone takes token_type_ids.
USES_TOKEN_TYPES = {"bert", "roberta", "xlm-roberta"}

#: Output fields compared per task (those the reference returns; `loss` too when labels are given).
TASK_FIELDS = {
    "base": ("last_hidden_state", "pooler_output", "encoder_last_hidden_state", "extract_features"),
    "question-answering": ("start_logits", "end_logits"),
    "seq2seq-lm": ("logits", "encoder_last_hidden_state"),
    "speech-seq2seq": ("logits", "encoder_last_hidden_state"),
    "object-detection": ("logits", "pred_boxes"),
    "table-question-answering": ("logits", "logits_aggregation"),
}

BATCH, CHOICES, LENGTH = 4, 2, 9
DECODER_LENGTH = 7
SAMPLES = 1024  # waveform length: 14 frames out of the tiny wav2vec2 feature encoder
CTC_TARGETS = 5  # label length for CTC: fits the 6 frames of the shortest waveform (512 samples)
#: XLA:CPU options for a test's one-off programs (a gradient, a sharded forward): LLVM without
#: its optimisation passes compiles them about 3x faster; the numbers are the same program's
#: (float32 rounding apart, ~1e-7 on tiny models), so no tolerance moves
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run_compiled(fn, *args):
    """fn(*args) under jax.jit, compiled once with FAST_COMPILE."""
    import jax

    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)


def tiny_config(model_type: str, task: str = "base", **overrides):
    kwargs = dict(TINY_CONFIGS.get(model_type) or PROBE_CONFIGS[model_type])
    if task == "question-answering":
        kwargs["num_labels"] = 2  # start and end
    kwargs.update(overrides)
    return transformers.AutoConfig.for_model(model_type, **kwargs)


def torch_class(model_type: str, task: str):
    return getattr(transformers, transformers_class_name(model_type, task))


def torch_model(model_type: str, task: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(model_type, task, **overrides)
    # eager attention: the reference may be asked for attention probabilities
    config._attn_implementation = "eager"
    model = torch_class(model_type, task)(config).eval()
    _randomize_zero_initialised(model, every_zero=model_type in ZERO_TABLES)
    return model


#: Families whose tokens and position tables transformers initialises to zeros (YOLOS: [CLS],
#: detection tokens, initial and mid positions; DeiT: [CLS], distillation token, positions;
#: BEiT: [CLS] and the relative position bias tables): with them all zero, every such token
#: would give the same output and the positions would go untested.
ZERO_TABLES = {"yolos", "deit", "beit"}


def _randomize_zero_initialised(model, every_zero: bool = False) -> None:
    """transformers initialises biases to 0, norms to 1 and batch-norm statistics to 0 / 1; a
    parity test must see them move (frozen batch norms keep their weights as buffers too).
    every_zero: also every parameter that is all zeros."""
    generator = torch.Generator().manual_seed(1234)

    def noise(tensor):
        return 0.1 * torch.randn(tensor.shape, generator=generator)

    with torch.no_grad():
        for name, param in model.named_parameters():
            norm = "norm" in name.lower() or name.startswith("ln_") or ".ln_" in name
            if name.endswith("bias") or norm or (every_zero and not param.any()):
                param.add_(noise(param))
        for name, buffer in model.named_buffers():
            if not buffer.is_floating_point():
                continue
            frozen_norm = "norm" in name.lower() and name.endswith(("weight", "bias"))
            if frozen_norm or name.endswith("running_mean"):
                buffer.add_(noise(buffer))
            elif name.endswith("running_var"):
                buffer.mul_(torch.exp(noise(buffer)))


# -- input factories: one per modality, (model_type, task, config, rng, batch) -> arrays --------


def _text(model_type: str, task: str, config, rng, batch: int) -> dict[str, np.ndarray]:
    """A right-padded batch (padding is the pad token, as tokenizers pad) with token types;
    multiple choice gets [B, C, T]; decoders are left-padded."""
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    shape = (batch, CHOICES, LENGTH) if task == "multiple-choice" else (batch, LENGTH)
    mask = _padding_mask(shape, rng)
    if model_type in DECODERS:
        mask = mask[..., ::-1].copy()  # left padding
    ids = np.where(mask == 1, rng.integers(2, config.vocab_size, size=shape), pad)
    if model_type in EOS_ENDED:  # eos at each row's end, nowhere else
        eos = config.eos_token_id
        ids = np.where(ids == eos, eos + 1, ids)
        np.put_along_axis(ids, mask.sum(axis=-1, keepdims=True) - 1, eos, axis=-1)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if model_type in USES_TOKEN_TYPES:
        inputs["token_type_ids"] = rng.integers(0, config.type_vocab_size, size=shape) * mask
    return inputs


def _padding_mask(shape, rng) -> np.ndarray:
    """1 for real positions, right-padded to random lengths >= 3; the first row is full."""
    length = shape[-1]
    lengths = rng.integers(3, length + 1, size=shape[:-1])
    lengths.flat[0] = length
    return (np.arange(length) < lengths[..., None]).astype(np.int64)


def _image_size(config) -> tuple[int, int]:
    size = getattr(config, "image_size", 16)
    return (size, size) if isinstance(size, int) else tuple(size)


def _image(model_type: str, task: str, config, rng, batch: int) -> dict[str, np.ndarray]:
    """pixel_values [B, C, H, W], normalised as image processors leave them (about N(0, 1))."""
    shape = (batch, config.num_channels, *_image_size(config))
    return {"pixel_values": rng.standard_normal(shape).astype(np.float32)}


def _padded_image(model_type: str, task: str, config, rng, batch: int) -> dict[str, np.ndarray]:
    """Images of different sizes padded bottom-right into one batch, as DETR's image processor
    does: pixel_values [B, 3, H, W] zero outside each image, pixel_mask [B, H, W] 1 inside it."""
    height, width = 32, 40
    pixels = rng.standard_normal((batch, config.num_channels, height, width)).astype(np.float32)
    mask = np.zeros((batch, height, width), dtype=np.int64)
    for row in range(batch):
        h = height if row == 0 else int(rng.integers(height // 2, height + 1))
        w = width if row == 0 else int(rng.integers(width // 2, width + 1))
        mask[row, :h, :w] = 1
    return {"pixel_values": pixels * mask[:, None].astype(np.float32), "pixel_mask": mask}


def _video(model_type: str, task: str, config, rng, batch: int) -> dict[str, np.ndarray]:
    """pixel_values [B, T, C, H, W]: frames first, as VideoMAE's processor returns them."""
    shape = (batch, config.num_frames, config.num_channels, *_image_size(config))
    return {"pixel_values": rng.standard_normal(shape).astype(np.float32)}


def _waveform(model_type: str, task: str, config, rng, batch: int) -> dict[str, np.ndarray]:
    """input_values [B, samples] zero-mean unit-variance (the feature extractor normalises),
    zero-padded on the right; attention_mask [B, samples] 1 on real samples."""
    lengths = rng.integers(SAMPLES // 2, SAMPLES + 1, size=(batch, 1))
    lengths[0] = SAMPLES
    mask = (np.arange(SAMPLES) < lengths).astype(np.int64)
    values = rng.standard_normal((batch, SAMPLES)).astype(np.float32)
    return {"input_values": values * mask.astype(np.float32), "attention_mask": mask}


def _log_mel(model_type: str, task: str, config, rng, batch: int) -> dict[str, np.ndarray]:
    """input_features [B, mel bins, frames]: Whisper's encoder takes exactly 2 x
    max_source_positions frames (its processor pads 30 s); values in the log-mel range [-1, 1.5]."""
    shape = (batch, config.num_mel_bins, 2 * config.max_source_positions)
    return {"input_features": rng.uniform(-1.0, 1.5, size=shape).astype(np.float32)}


#: the 7 token-type channels of a TAPAS token, in transformers' order
TABLE_TOKEN_TYPES = (
    "segment_ids", "column_ids", "row_ids", "prev_labels", "column_ranks", "inv_column_ranks",
    "numeric_relations",
)  # fmt: skip
TABLE_ROWS, TABLE_COLUMNS, QUESTION_LENGTH = 3, 3, 4  # rows below the header


def _table(model_type: str, task: str, config, rng, batch: int) -> dict[str, np.ndarray]:
    """What TapasTokenizer gives for a question and a small table, one token per cell:
    [CLS] question [SEP] header cells, then the body row by row, then padding.
    token_type_ids [B, T, 7] carry segment, column (1-based), row (header 0), previous answer,
    column rank and inverse rank of numeric cells, and the numeric relation to the question."""
    # + 3 padding: 21 tokens, a multiple of the config checks' chunk_size_feed_forward
    length = 2 + QUESTION_LENGTH + (TABLE_ROWS + 1) * TABLE_COLUMNS + 3
    ids = np.full((batch, length), config.pad_token_id or 0)
    types = np.zeros((batch, length, len(TABLE_TOKEN_TYPES)), dtype=np.int64)
    mask = np.zeros((batch, length), dtype=np.int64)
    start = 2 + QUESTION_LENGTH
    used = start + (TABLE_ROWS + 1) * TABLE_COLUMNS
    ids[:, :used] = rng.integers(5, config.vocab_size, size=(batch, used))
    mask[:, :used] = 1
    mask[0, :] = 1  # the first row runs to the end, padding cells included as in a full table
    rows = np.repeat(np.arange(TABLE_ROWS + 1), TABLE_COLUMNS)  # header row 0
    columns = np.tile(np.arange(1, TABLE_COLUMNS + 1), TABLE_ROWS + 1)
    types[:, start:used, 0] = 1
    types[:, start:used, 1] = columns
    types[:, start:used, 2] = rows
    body = rows > 0
    for row in range(batch):
        ranks = np.zeros(rows.shape, dtype=np.int64)
        for column in range(1, TABLE_COLUMNS + 1):
            cells = body & (columns == column)
            ranks[cells] = rng.permutation(TABLE_ROWS) + 1
        types[row, start:used, 3] = rng.integers(0, 2, size=rows.shape) * body
        types[row, start:used, 4] = ranks
        types[row, start:used, 5] = np.where(body, TABLE_ROWS + 1 - ranks, 0)
        types[row, start:used, 6] = rng.integers(0, config.type_vocab_sizes[6], size=rows.shape)
    types[..., 6] *= types[..., 0]
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


INPUT_FACTORIES = {
    "text": _text,
    "image": _image,
    "padded-image": _padded_image,
    "video": _video,
    "waveform": _waveform,
    "log-mel": _log_mel,
    "table": _table,
}


def decoder_inputs(config, rng, batch: int) -> dict[str, np.ndarray]:
    """decoder_input_ids [B, T_dec], starting with the decoder start token as generation does."""
    ids = rng.integers(4, target_vocab_size(config), size=(batch, DECODER_LENGTH))
    ids[:, 0] = config.decoder_start_token_id
    return {"decoder_input_ids": ids}


def target_vocab_size(config) -> int:
    """The decoder's vocabulary: Marian's decoder_vocab_size where it has one."""
    return getattr(config, "decoder_vocab_size", None) or config.vocab_size


def takes_decoder_inputs(model_type: str, task: str) -> bool:
    """Whether transformers' class for (model_type, task) reads decoder_input_ids."""
    forward = inspect.signature(torch_class(model_type, task).forward)
    return "decoder_input_ids" in forward.parameters


def task_inputs(
    model_type: str, task: str, seed: int = 0, config=None, batch: int = BATCH
) -> dict[str, np.ndarray]:
    """The inputs a (model_type, task) reads: its modality's, plus decoder inputs for an
    encoder-decoder (whose decoder transformers otherwise builds from labels only)."""
    rng = np.random.default_rng(seed)
    config = config if config is not None else tiny_config(model_type, task)
    factory = INPUT_FACTORIES[MODALITIES.get(model_type, "text")]
    inputs = factory(model_type, task, config, rng, batch)
    if takes_decoder_inputs(model_type, task) and task not in DECODER_FROM_INPUT_IDS:
        inputs.update(decoder_inputs(config, rng, batch))
    return inputs


def text_inputs(model_type: str, task: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A text batch for a text family (see _text)."""
    assert MODALITIES.get(model_type, "text") == "text", model_type
    return task_inputs(model_type, task, seed)


# -- label factories: one per task, (config, inputs, rng) -> labels ---------------------------


def _batch_size(inputs) -> int:
    return len(next(iter(inputs.values())))


def _one_per_example(config, inputs, rng):
    return {"labels": rng.integers(0, config.num_labels, size=_batch_size(inputs))}


def _per_token(config, inputs, rng, high: int):
    labels = rng.integers(0, high, size=inputs["input_ids"].shape)
    labels[inputs["attention_mask"] == 0] = -100
    return {"labels": labels}


def _causal_lm(config, inputs, rng):
    """Shifted inside the model: no target at or just after padding."""
    mask = inputs["attention_mask"]
    labels = rng.integers(0, config.vocab_size, size=mask.shape)
    labels[mask == 0] = -100
    labels[:, 1:][mask[:, :-1] == 0] = -100
    return {"labels": labels}


def _question_answering(config, inputs, rng):
    # one position past the end: transformers clamps it and ignores it
    batch, length = inputs["input_ids"].shape
    starts = rng.integers(0, length, size=batch)
    starts[0] = length + 3
    return {"start_positions": starts, "end_positions": rng.integers(0, length, size=batch)}


def _seq2seq(config, inputs, rng):
    """Target ids [B, T_dec], the tail of some rows ignored (-100) as a padded collator leaves it."""
    labels = rng.integers(0, target_vocab_size(config), size=(_batch_size(inputs), DECODER_LENGTH))
    return {"labels": np.where(_padding_mask(labels.shape, rng) == 1, labels, -100)}


def _object_detection(config, inputs, rng):
    """One dict per image, as DETR's image processor gives them: class_labels [n] and boxes
    [n, 4] as (center x, center y, width, height) normalised by the image size, inside it."""
    targets = []
    for _ in range(_batch_size(inputs)):
        count = int(rng.integers(1, 4))
        size = rng.uniform(0.05, 0.5, size=(count, 2))
        center = size / 2 + rng.uniform(0, 1, size=(count, 2)) * (1 - size)
        boxes = np.concatenate([center, size], axis=1).astype(np.float32)
        classes = rng.integers(0, config.num_labels, size=count)
        targets.append({"class_labels": classes, "boxes": boxes})
    return {"labels": targets}


def _table_question_answering(config, inputs, rng):
    """What TapasTokenizer encodes for an answer: the answer cells (labels [B, T], 1 on the
    answer's tokens, all in one column of the body); with weak supervision (WTQ) the float answer
    (NaN when the answer is the cells themselves) and each token's numeric value and scale (NaN /
    1 where a cell is not a number; one token per cell here, so scale 1); with strong supervision
    (WikiSQL-supervised) the aggregation operator instead."""
    types = inputs["token_type_ids"]
    columns, rows = types[..., 1], types[..., 2]
    labels = np.zeros(columns.shape, dtype=np.int64)
    batch = len(labels)
    for row in range(batch):
        column = int(rng.integers(1, TABLE_COLUMNS + 1))
        picked = rng.integers(0, 2, size=TABLE_ROWS + 1)
        picked[int(rng.integers(1, TABLE_ROWS + 1))] = 1
        labels[row] = (columns[row] == column) & (rows[row] > 0) & (picked[rows[row]] == 1)
    targets = {"labels": labels}
    if config.num_aggregation_labels > 0 and not config.use_answer_as_supervision:
        targets["aggregation_labels"] = rng.integers(0, config.num_aggregation_labels, size=batch)
    if config.use_answer_as_supervision:
        numeric = (rows > 0) & (types[..., 4] > 0)
        values = np.where(numeric, rng.uniform(0, 20, size=labels.shape), np.nan)
        answers = rng.uniform(0, 40, size=batch)
        answers[::2] = np.nan  # cell selection questions
        targets["float_answer"] = answers.astype(np.float32)
        targets["numeric_values"] = values.astype(np.float32)
        targets["numeric_values_scale"] = np.ones(labels.shape, dtype=np.float32)
    return targets


def _ctc(config, inputs, rng):
    """Character ids [B, U] (never the blank, pad_token_id), padded with -100 as a CTC collator
    pads them; no label repeats its neighbour, so every row's targets fit in its frames."""
    labels = rng.integers(0, config.vocab_size, size=(_batch_size(inputs), CTC_TARGETS))
    for position in range(CTC_TARGETS):
        while True:
            clash = labels[:, position] == config.pad_token_id
            if position:
                clash |= labels[:, position] == labels[:, position - 1]
            if not clash.any():
                break
            labels[clash, position] = rng.integers(0, config.vocab_size, size=int(clash.sum()))
    return {"labels": np.where(_padding_mask(labels.shape, rng) == 1, labels, -100)}


LABEL_FACTORIES = {
    "sequence-classification": _one_per_example,
    "image-classification": _one_per_example,
    "audio-classification": _one_per_example,
    "video-classification": _one_per_example,
    "token-classification": lambda c, x, r: _per_token(c, x, r, c.num_labels),
    "masked-lm": lambda c, x, r: _per_token(c, x, r, c.vocab_size),
    "causal-lm": _causal_lm,
    "multiple-choice": lambda c, x, r: {"labels": r.integers(0, CHOICES, size=_batch_size(x))},
    "next-sentence-prediction": lambda c, x, r: {"labels": r.integers(0, 2, size=_batch_size(x))},
    "question-answering": _question_answering,
    "seq2seq-lm": _seq2seq,
    "speech-seq2seq": _seq2seq,
    "object-detection": _object_detection,
    "table-question-answering": _table_question_answering,
    "ctc": _ctc,
}


def task_labels(model, task: str, inputs, seed: int = 0) -> dict:
    """Labels of the right kind for a task (some ignored with -100 where the task allows it)."""
    factory = LABEL_FACTORIES.get(task)
    return {} if factory is None else factory(model.config, inputs, np.random.default_rng(seed + 1))


def to_torch(value, float_dtype=None):
    """Arrays -> tensors through dicts and lists (detection labels); floats cast if asked."""
    if isinstance(value, dict):
        return {k: to_torch(v, float_dtype) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_torch(v, float_dtype) for v in value]
    tensor = torch.as_tensor(np.asarray(value))
    if float_dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(float_dtype)
    return tensor


def run_torch(model, inputs, float_dtype=None, **kwargs):
    """The PyTorch model's output on numpy inputs (floats cast to float_dtype when given)."""
    with torch.no_grad():
        return model(**to_torch(inputs, float_dtype), **kwargs)


def to_numpy(value):
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(to_numpy(v) for v in value)
    if isinstance(value, torch.Tensor):
        return value.detach().float().numpy()
    return np.asarray(value, dtype=np.float32)


def max_diff(a, b) -> float:
    return float(np.max(np.abs(to_numpy(a) - to_numpy(b))))


def save_bin(model, directory: Path) -> Path:
    """A pytorch_model.bin checkpoint (transformers 5 writes only safetensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    return directory


def task_pairs() -> list[tuple[str, str]]:
    """Every (model_type, task) the registry serves."""
    return [(mt, task) for mt, tasks in flaxauto.supported().items() for task in tasks]


def output_diff(model_type: str, inputs, field: str, ours, theirs) -> float:
    """max |ours - theirs| of one output field, over real tokens only for decoders."""
    ours, theirs = to_numpy(ours), to_numpy(theirs)
    if model_type in DECODERS:
        keep = _real_tokens(inputs["attention_mask"].astype(bool), field, theirs.shape)
        if keep is not None:
            ours, theirs = np.where(keep, ours, 0), np.where(keep, theirs, 0)
    return float(np.max(np.abs(ours - theirs)))


def _real_tokens(mask, field: str, shape) -> np.ndarray | None:
    """The attention mask [B, T] shaped to broadcast over a per-token output, or None."""
    if field == "attentions":
        return mask[:, None, :, None]  # [B, H, T (queries), S]
    if tuple(shape[:2]) == mask.shape:
        return mask.reshape(mask.shape + (1,) * (len(shape) - 2))
    return None  # one value per sequence


@dataclass
class Case:
    """One (model_type, task): the PyTorch model, its checkpoints and reference outputs."""

    model_type: str
    task: str
    torch_model: object
    safetensors_dir: Path
    bin_dir: Path
    inputs: dict
    labels: dict
    reference: object  # the PyTorch output, with labels where the task has them

    @property
    def fields(self) -> tuple[str, ...]:
        fields = TASK_FIELDS.get(self.task, ("logits",))
        return tuple(f for f in fields if getattr(self.reference, f, None) is not None)

    def diff(self, field: str, ours, theirs) -> float:
        """max |ours - theirs|, over real tokens only for decoders (see DECODERS)."""
        return output_diff(self.model_type, self.inputs, field, ours, theirs)

    @functools.cached_property
    def auto_class(self):
        return getattr(flaxauto, flaxauto.registry.TASK_AUTO_CLASSES[self.task])


def make_case(model_type: str, task: str, root: Path) -> Case:
    model = torch_model(model_type, task)
    safetensors_dir = root / "safetensors"
    model.save_pretrained(safetensors_dir)
    bin_dir = save_bin(model, root / "bin")
    inputs = task_inputs(model_type, task, config=model.config)
    labels = task_labels(model, task, inputs)
    reference = run_torch(model, {**inputs, **labels})
    return Case(model_type, task, model, safetensors_dir, bin_dir, inputs, labels, reference)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def unsupported_model_type() -> str:
    """A model_type transformers knows and flaxauto does not (yet) implement."""
    known = set(flaxauto.supported())
    return next(t for t in ("xlnet", "ctrl", "fsmt", "reformer", "funnel") if t not in known)
