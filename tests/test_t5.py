"""T5, mT5 and UMT5 beyond the conformance suite: the relative position buckets, checkpoints with
their own lm_head (T5 v1.1 / flan-T5), the cached decoder's bias rows, and generation
token-identical to transformers' PyTorch generate on tiny random models."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers.models.t5.modeling_t5 import T5Attention

import flaxauto
from flaxauto.models import t5
from references import max_diff, run_torch, save_bin, task_inputs, torch_model

T5_TYPES = ("t5", "mt5", "umt5")


@pytest.mark.parametrize(
    ("bidirectional", "num_buckets", "max_distance"),
    [(True, 32, 128), (False, 32, 128), (True, 8, 16), (False, 8, 16), (True, 11, 40)],
)
def test_relative_buckets_are_transformers(bidirectional, num_buckets, max_distance):
    """Every relative position (past max_distance too) in transformers' bucket, both directions."""
    table = t5.bucket_table(bidirectional, num_buckets, max_distance)
    queries, keys = np.arange(300), 400
    ours = np.asarray(t5.relative_buckets(jax.numpy.asarray(queries), keys, table))
    relative = torch.arange(keys)[None, :] - torch.as_tensor(queries)[:, None]
    expected = T5Attention._relative_position_bucket(
        relative, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    ).numpy()
    np.testing.assert_array_equal(ours, expected)


def lively_lm(model_type: str):
    """A tiny seq2seq LM whose greedy tokens move: at T5's own init the tied table dominates the
    residual stream and greedy decoding repeats one token, so the table is drawn smaller and the
    sublayers' output projections larger. The decoder is as deep as the encoder here, as
    transformers' generate needs (its cache is sized by num_layers; the conformance suite runs
    the deeper decoder)."""
    reference = torch_model(model_type, "seq2seq-lm", num_decoder_layers=2)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if name.endswith((".o.weight", ".wo.weight")):
                parameter.mul_(4.0)
        reference.shared.weight.mul_(0.3)
    return reference


@pytest.fixture(scope="module", params=T5_TYPES)
def pair(request, tmp_path_factory):
    """(model_type, transformers T5ForConditionalGeneration-like model, flaxauto model)."""
    model_type = request.param
    reference = lively_lm(model_type)
    directory = tmp_path_factory.mktemp(f"{model_type}-lm")
    reference.save_pretrained(directory)
    return model_type, reference, flaxauto.AutoModelForSeq2SeqLM.from_pretrained(directory)


def hub_checkpoint_with_own_lm_head(reference, directory) -> torch.Tensor:
    """Write `reference` as hub T5 v1.1 / mT5 files are: config.json with
    tie_word_embeddings=false (no scale_decoder_outputs, which transformers 5 adds) and a
    model.safetensors whose lm_head.weight differs from shared.weight. -> that lm_head."""
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    state.pop("encoder.embed_tokens.weight"), state.pop("decoder.embed_tokens.weight")
    generator = torch.Generator().manual_seed(5)
    state["lm_head.weight"] = torch.randn(state["shared.weight"].shape, generator=generator)
    reference.config.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config.pop("scale_decoder_outputs", None)
    (directory / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": False}))
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    return state["lm_head.weight"]


@pytest.mark.parametrize("model_type", ["t5", "umt5"])
def test_own_lm_head_checkpoint_as_t5_v1_1(model_type, tmp_path):
    """T5 v1.1 / flan-T5 / UMT5 hub checkpoints: config.json says tie_word_embeddings=false and
    the file holds an lm_head.weight of its own; transformers then neither ties nor rescales the
    decoder output. Loaded here with the same logits, and saved back with the lm_head."""
    reference = torch_model(model_type, "seq2seq-lm")
    lm_head = hub_checkpoint_with_own_lm_head(reference, tmp_path)
    hub_like = type(reference).from_pretrained(tmp_path).eval()
    assert not hub_like.config.scale_decoder_outputs
    assert not torch.equal(hub_like.lm_head.weight, hub_like.shared.weight)
    inputs = task_inputs(model_type, "seq2seq-lm")
    model = flaxauto.AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    assert max_diff(model(**inputs).logits, run_torch(hub_like, inputs).logits) <= 1e-4
    model.save_pretrained(tmp_path / "saved")
    reloaded = type(reference).from_pretrained(tmp_path / "saved")
    assert torch.equal(reloaded.lm_head.weight, lm_head)


def test_mt5_hub_checkpoint_with_its_own_lm_head_loads_it_as_transformers_5(
    tmp_path, caplog, monkeypatch
):
    """Hub mT5 files carry an lm_head.weight apart from shared.weight. MT5Config forces
    tie_word_embeddings=True, yet transformers 5 leaves tables whose files differ untied and
    loads the file's lm_head: flaxauto builds the head untied for such a file, gives the same
    logits, warns once naming the tensor, and saves it back; a file without one, or with an
    equal copy, stays tied."""
    from flaxauto import modeling

    monkeypatch.setattr(modeling, "_WARNED", set())  # another test may have warned already
    reference = torch_model("mt5", "seq2seq-lm")
    lm_head = hub_checkpoint_with_own_lm_head(reference, tmp_path)
    hub_like = type(reference).from_pretrained(tmp_path).eval()
    assert hub_like.config.tie_word_embeddings  # forced by MT5Config
    assert torch.equal(hub_like.lm_head.weight, lm_head)  # yet the file's
    inputs = task_inputs("mt5", "seq2seq-lm")
    with caplog.at_level("WARNING", logger="flaxauto"):
        model = flaxauto.AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
        flaxauto.AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    warned = [
        r for r in caplog.records if r.name == "flaxauto" and "lm_head.weight" in r.getMessage()
    ]
    assert len(warned) == 1, "warned once, naming the tensor"
    assert not model.head.tied
    assert max_diff(model(**inputs).logits, run_torch(hub_like, inputs).logits) <= 1e-4
    model.save_pretrained(tmp_path / "saved")
    reloaded = type(reference).from_pretrained(tmp_path / "saved")
    assert torch.equal(reloaded.lm_head.weight, lm_head)
    # transformers 5's own files (tied, no lm_head.weight) load tied, and so does a file with
    # an equal copy (torch.save of the tied state_dict)
    reference.save_pretrained(tmp_path / "tied")
    assert flaxauto.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "tied").head.tied
    save_bin(reference, tmp_path / "copy")
    assert flaxauto.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "copy").head.tied


def test_cached_decoding_follows_the_query_slots(pair):
    """The decoder fed one token at a time through the cache (its relative bias rows at the
    new tokens' slots) gives the full forward's logits; the cross part is computed once."""
    model_type, _, model = pair
    inputs = task_inputs(model_type, "seq2seq-lm")
    full = np.asarray(model(**inputs).logits)
    decoder_ids = inputs["decoder_input_ids"]
    encoder = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    encoded = model.backbone.encode(**encoder)
    cache = model.init_cache(len(decoder_ids), decoder_ids.shape[1] + 3)  # spare slots
    steps = []
    for start, stop in ((0, 3), (3, 4), (4, 5), (5, 7)):  # a prompt, then tokens one by one
        out = model(
            **encoder, decoder_input_ids=decoder_ids[:, start:stop], encoder_outputs=encoded,
            cache=cache,
        )  # fmt: skip
        cache = out.cache
        steps.append(np.asarray(out.logits))
    assert max_diff(np.concatenate(steps, axis=1), full) <= 1e-4


def _encoder_batch(model_type: str, seed: int):
    inputs = task_inputs(model_type, "seq2seq-lm", seed=seed)
    return inputs["input_ids"], inputs["attention_mask"]


def _torch_generate(model, ids, mask, **settings) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), **settings)
    return out.numpy()


NEW_TOKENS = 12


def test_greedy_is_token_identical_to_transformers(pair):
    model_type, reference, model = pair
    ids, mask = _encoder_batch(model_type, seed=0)
    settings = dict(do_sample=False, num_beams=1, max_new_tokens=NEW_TOKENS)
    expected = _torch_generate(reference, ids, mask, **settings)
    assert expected.shape[1] >= NEW_TOKENS // 2, "the reference stopped early; pick a new seed"
    assert max(len(set(row)) for row in expected) >= 3, "greedy repeats one token"
    np.testing.assert_array_equal(np.asarray(model.generate(ids, attention_mask=mask, **settings)),
                                  expected)  # fmt: skip


#: t5-small's task_specific_params (summarize: 4 beams, length_penalty 2, min_length 30,
#: max_length 200, no_repeat_ngram_size 3, early stopping), lengths scaled to a tiny model.
HUB_BEAM_SETTINGS = dict(
    num_beams=4, length_penalty=2.0, min_length=6, max_length=14, no_repeat_ngram_size=3,
    early_stopping=True, do_sample=False,
)  # fmt: skip


@pytest.mark.parametrize(
    "settings",
    [HUB_BEAM_SETTINGS, dict(HUB_BEAM_SETTINGS, num_return_sequences=2, early_stopping=False)],
    ids=["summarize", "two-returned"],
)
def test_beam_search_is_token_identical_to_transformers(pair, settings):
    model_type, reference, model = pair
    ids, mask = _encoder_batch(model_type, seed=1)
    expected = _torch_generate(reference, ids, mask, **settings)
    np.testing.assert_array_equal(np.asarray(model.generate(ids, attention_mask=mask, **settings)),
                                  expected)  # fmt: skip


def test_sampling_is_reproducible_compiled_and_top_k_1_is_greedy(pair):
    """Sampling with a fixed key gives the same tokens every time (one compiled program, the
    key its only source of randomness), another key others; top_k=1 samples the greedy tokens."""
    model_type, _, model = pair
    ids, mask = _encoder_batch(model_type, seed=2)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    top1 = model.generate(
        ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=1,
        key=jax.random.key(3),
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))
    settings = dict(max_new_tokens=NEW_TOKENS, do_sample=True, temperature=1.5, top_k=0, top_p=0.95)
    first = model.generate(ids, attention_mask=mask, key=jax.random.key(7), **settings)
    again = model.generate(ids, attention_mask=mask, key=jax.random.key(7), **settings)
    other = model.generate(ids, attention_mask=mask, key=jax.random.key(8), **settings)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other))


@pytest.mark.parametrize("model_type", ["t5", "umt5"])
def test_scanned_layers_generate_like_transformers(model_type, tmp_path):
    """Both stacks scanned (the encoder shallower than the decoder), beam search as the hub's."""
    reference = lively_lm(model_type)
    reference.save_pretrained(tmp_path)
    model = flaxauto.AutoModelForSeq2SeqLM.from_pretrained(tmp_path, scan_layers=True)
    ids, mask = _encoder_batch(model_type, seed=1)
    expected = _torch_generate(reference, ids, mask, **HUB_BEAM_SETTINGS)
    ours = model.generate(ids, attention_mask=mask, **HUB_BEAM_SETTINGS)
    np.testing.assert_array_equal(np.asarray(ours), expected)


def test_training_step_gradients_equal_with_scan_layers_and_remat(tmp_path):
    """One seq2seq training step's loss and every parameter's gradient (by transformers' names)
    are the plain model's with both stacks scanned and rematerialised."""
    from flax import nnx

    from flaxauto.converters.layout import export_tensors
    from references import task_labels

    reference = torch_model("t5", "seq2seq-lm")
    reference.save_pretrained(tmp_path)
    inputs = task_inputs("t5", "seq2seq-lm")
    batch = {**inputs, **task_labels(reference, "seq2seq-lm", inputs)}

    def loss_and_grads(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params):
            return nnx.merge(graphdef, params, rest)(**batch).loss

        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        nnx.update(model, grads)  # the gradients in the parameters' places, to name them
        return value, dict(export_tensors(model))

    plain = loss_and_grads(flaxauto.AutoModelForSeq2SeqLM.from_pretrained(tmp_path))
    scanned = loss_and_grads(
        flaxauto.AutoModelForSeq2SeqLM.from_pretrained(tmp_path, scan_layers=True, remat=True)
    )
    assert max_diff(plain[0], scanned[0]) <= 1e-6
    assert plain[1].keys() == scanned[1].keys()
    for name, grad in plain[1].items():
        assert np.abs(grad).max() > 0, name  # every parameter is trained
        assert max_diff(grad, scanned[1][name]) <= 1e-5, name
