"""Encoder-decoders: encode / decode apart, the cached decoder, and generation token-identical to
transformers' PyTorch generate on tiny random models (references.TINY_CONFIGS' init scale)."""

from __future__ import annotations

import numpy as np
import optax
import pytest
import torch
from flax import nnx
from test_execution import DEFAULT_INIT, _flat_by_name, _loss_and_grads
from transformers import GenerationConfig

import flaxauto
from flaxauto.generation import greedy
from flaxauto.heads.seq2seq import shift_tokens_right
from references import max_diff, run_torch, task_inputs, torch_model

#: model_types served by heads.seq2seq.Seq2SeqLMHead in this file's checks
SEQ2SEQ = ("bart", "mbart", "pegasus", "marian")


@pytest.fixture(scope="module", params=SEQ2SEQ)
def pair(request, tmp_path_factory):
    """(model_type, transformers model, flaxauto model) sharing one tiny checkpoint."""
    model_type = request.param
    reference = torch_model(model_type, "seq2seq-lm")
    directory = tmp_path_factory.mktemp(f"{model_type}-seq2seq")
    reference.save_pretrained(directory)
    return model_type, reference, flaxauto.AutoModelForSeq2SeqLM.from_pretrained(directory)


def encoder_batch(model_type: str, seed: int = 0):
    """A right-padded batch of 4 encoder inputs (one unpadded), as a tokenizer pads them."""
    inputs = task_inputs(model_type, "seq2seq-lm", seed=seed)
    return inputs["input_ids"], inputs["attention_mask"]


def torch_generate(model, ids, mask, **kwargs) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), **kwargs)
    return out.numpy()


def test_shift_tokens_right_is_transformers():
    from transformers.models.bart.modeling_bart import shift_tokens_right as reference

    labels = np.array([[5, 6, -100, -100], [7, -100, 8, 9]])
    expected = reference(torch.as_tensor(labels), 1, 2).numpy()
    np.testing.assert_array_equal(np.asarray(shift_tokens_right(labels, 1, 2)), expected)


def test_encode_then_decode_with_encoder_outputs(pair):
    """Users who run the encoder once themselves: encoder_outputs= skips it, same numbers."""
    model_type, reference, model = pair
    inputs = task_inputs(model_type, "seq2seq-lm")
    encoded = model.backbone.encode(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
    )
    out = model(**inputs, encoder_outputs=encoded)
    expected = run_torch(reference, inputs)
    assert max_diff(out.logits, expected.logits) <= 1e-4
    as_tuple = model(**inputs, encoder_outputs=(encoded.last_hidden_state,))
    assert max_diff(as_tuple.logits, expected.logits) <= 1e-4


def test_cached_decoding_equals_the_full_forward(pair):
    """The decoder fed one token at a time through the cache (cross part filled by the first
    call) gives the full forward's logits; the cache's cross part is computed once."""
    model_type, _, model = pair
    inputs = task_inputs(model_type, "seq2seq-lm")
    full = model(**inputs).logits
    decoder_ids = inputs["decoder_input_ids"]
    batch, length = decoder_ids.shape
    encoded = model.backbone.encode(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
    )
    cache = model.init_cache(batch, length)
    assert cache.cross_attention is None
    steps = []
    for t in range(length):
        out = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
            decoder_input_ids=decoder_ids[:, t : t + 1], encoder_outputs=encoded, cache=cache,
        )  # fmt: skip
        if t == 0:
            cross = out.cache.cross_attention
            assert cross is not None
        else:  # reused, not recomputed
            assert out.cache.cross_attention.keys[0] is cross.keys[0] or np.array_equal(
                out.cache.cross_attention.keys[0], cross.keys[0]
            )
        cache = out.cache
        steps.append(np.asarray(out.logits))
    assert max_diff(np.concatenate(steps, axis=1), full) <= 1e-4


NEW_TOKENS = 12


def test_greedy_is_token_identical_to_transformers(pair):
    model_type, reference, model = pair
    ids, mask = encoder_batch(model_type)
    settings = dict(do_sample=False, num_beams=1, max_new_tokens=NEW_TOKENS, min_new_tokens=0)
    expected = torch_generate(reference, ids, mask, **settings)
    ours = np.asarray(model.generate(ids, attention_mask=mask, **settings))
    assert expected.shape[1] >= NEW_TOKENS // 2, "the reference stopped early; pick a new seed"
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("pair", ["bart"], indirect=True)
def test_sources_of_nearby_lengths_share_one_compiled_program(pair):
    """generate pads the encoder's ids and mask to a bucket (masked padding; BART's learned
    positions allow it): sources of 9 to 16 tokens run one program, each answer transformers'."""
    model_type, reference, model = pair
    settings = dict(do_sample=False, num_beams=1, max_new_tokens=6, min_new_tokens=0)
    rng = np.random.default_rng(3)
    compiled = None
    for length in (9, 12, 16):
        ids = rng.integers(3, reference.config.vocab_size, (2, length))
        mask = np.ones_like(ids)
        mask[1, length // 2 :] = 0  # a right-padded row, as a tokenizer pads
        ours = np.asarray(model.generate(ids, attention_mask=mask, **settings))
        np.testing.assert_array_equal(ours, torch_generate(reference, ids, mask, **settings))
        compiled = compiled or greedy.decode._cache_size()
    assert greedy.decode._cache_size() == compiled


#: What summarisation / translation checkpoints on the hub carry (bart-large-cnn: 4 beams,
#: length_penalty 2, min_length 56, max_length 142, no_repeat_ngram_size 3, early stopping,
#: forced bos / eos), scaled to a tiny model.
HUB_BEAM_SETTINGS = dict(
    num_beams=4, length_penalty=2.0, min_length=6, max_length=16, no_repeat_ngram_size=3,
    early_stopping=True, forced_bos_token_id=0, forced_eos_token_id=2, do_sample=False,
)  # fmt: skip


@pytest.mark.parametrize(
    "settings",
    [
        HUB_BEAM_SETTINGS,
        dict(HUB_BEAM_SETTINGS, num_return_sequences=2, early_stopping=False, length_penalty=0.5),
    ],
    ids=["hub", "two-returned"],
)
def test_beam_search_is_token_identical_to_transformers(pair, settings):
    model_type, reference, model = pair
    if model_type == "marian":  # opus-mt forces no bos, and its eos is 0 (BART's bos)
        settings = dict(settings, forced_bos_token_id=None, forced_eos_token_id=0)
    ids, mask = encoder_batch(model_type, seed=1)
    expected = torch_generate(reference, ids, mask, **settings)
    ours = np.asarray(model.generate(ids, attention_mask=mask, **settings))
    np.testing.assert_array_equal(ours, expected)


def test_decoder_input_ids_continue_after_the_start_token(pair):
    """A caller's decoder prompt: the start token goes in front when no row begins with it."""
    model_type, reference, model = pair
    ids, mask = encoder_batch(model_type)
    prompt = np.full((len(ids), 2), 7, np.int64)
    prompt[:, 1] = 9
    settings = dict(do_sample=False, num_beams=1, max_new_tokens=6)
    expected = torch_generate(reference, ids, mask, decoder_input_ids=torch.as_tensor(prompt),
                              **settings)  # fmt: skip
    ours = np.asarray(
        model.generate(ids, attention_mask=mask, decoder_input_ids=prompt, **settings)
    )
    assert ours.shape[1] == 3 + 6 or (ours[:, -1] == reference.config.pad_token_id).any()
    np.testing.assert_array_equal(ours, expected)


def test_generation_config_json_sets_the_defaults(tmp_path):
    """model.generate(input_ids) reproduces transformers' default behaviour for the checkpoint:
    its generation_config.json (beam search here) decides."""
    reference = torch_model("bart", "seq2seq-lm")
    reference.generation_config = GenerationConfig(
        **HUB_BEAM_SETTINGS, decoder_start_token_id=2, eos_token_id=2, pad_token_id=1,
        bos_token_id=0,
    )  # fmt: skip
    reference.save_pretrained(tmp_path)
    model = flaxauto.AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    assert model.generation_config.num_beams == 4
    ids, mask = encoder_batch("bart", seed=2)
    expected = torch_generate(reference, ids, mask)
    np.testing.assert_array_equal(np.asarray(model.generate(ids, attention_mask=mask)), expected)
    model.save_pretrained(tmp_path / "again")  # written back beside the weights
    assert GenerationConfig.from_pretrained(tmp_path / "again").num_beams == 4


def test_scanned_layers_generate_like_transformers(tmp_path):
    """scan_layers + remat on both stacks: the stacked cache [L, ...] and its cross part."""
    reference = torch_model("bart", "seq2seq-lm")
    reference.save_pretrained(tmp_path)
    model = flaxauto.AutoModelForSeq2SeqLM.from_pretrained(tmp_path, scan_layers=True, remat=True)
    ids, mask = encoder_batch("bart")
    settings = dict(HUB_BEAM_SETTINGS, num_beams=2)
    expected = torch_generate(reference, ids, mask, **settings)
    np.testing.assert_array_equal(
        np.asarray(model.generate(ids, attention_mask=mask, **settings)), expected
    )


def test_seq2seq_training_step_gradients_equal_with_scan_layers_and_remat(tmp_path):
    """Both stacks scanned and rematerialised: loss and every gradient (keyed by transformers
    name) equal the plain model's; then adamw steps with dropout on lower the loss."""
    init = {"init_std": DEFAULT_INIT["initializer_range"], "dropout": 0.1}
    torch_model("bart", "seq2seq-lm", **init).save_pretrained(tmp_path)
    inputs = task_inputs("bart", "seq2seq-lm")
    labels = np.where(np.arange(inputs["decoder_input_ids"].shape[1]) < 5, 7, -100)
    batch = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    batch["labels"] = np.broadcast_to(labels, inputs["decoder_input_ids"].shape)
    results = {}
    for scan_layers, remat in [(False, False), (True, True)]:
        model = flaxauto.AutoModelForSeq2SeqLM.from_pretrained(
            tmp_path, scan_layers=scan_layers, remat=remat
        )
        loss, grads = _loss_and_grads(model, batch)
        results[scan_layers, remat] = (float(loss), _flat_by_name(model, grads))
    (plain_loss, plain), (loss, scanned) = results[False, False], results[True, True]
    assert abs(loss - plain_loss) <= 1e-6
    for name, grad in plain.items():
        np.testing.assert_allclose(scanned[name], grad, atol=1e-6, err_msg=name)
    assert np.abs(plain["model.shared.weight"]).max() > 0  # the tied table: both stacks + lm_head

    model.train()
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(lambda m: m(**batch).loss)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, batch)) for _ in range(5)]
    assert losses[-1] < losses[0]


def test_the_readme_example_runs(tmp_path, monkeypatch):
    """README's encoder-decoder example (tokenizer built locally) runs as written."""
    import re

    from test_api import README

    text = README.read_text()
    block = re.search(
        r"<!-- seq2seq-example:start -->\n```python\n(.*?)```\n<!-- seq2seq-example:end -->",
        text,
        re.S,
    )
    assert block, "README.md lost its encoder-decoder example markers"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)  # noqa: S102
    summary, out = namespace["summary"], namespace["out"]
    assert summary.shape[0] == 2 and summary.shape[1] <= 12
    assert out.logits.shape[:2] == summary.shape
