"""Beam search against transformers' PyTorch generate(num_beams=...), on tiny random decoders."""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import flaxauto
from flaxauto.generation import beam_search
from references import text_inputs, torch_model

NEW_TOKENS = 24


@dataclass
class Pair:
    """A transformers model and the flaxauto model loaded from its checkpoint, a left-padded
    batch of 4 prompts, and eos tokens the model generates early in some rows."""

    model_type: str
    reference: object
    model: object
    ids: np.ndarray
    mask: np.ndarray
    eos: list[int]
    pad: int

    @property
    def settings(self) -> dict:
        """Beam search with eos: the compiled program most tests share."""
        return dict(
            num_beams=4, max_new_tokens=NEW_TOKENS, eos_token_id=self.eos, pad_token_id=self.pad
        )

    @property
    def fill(self) -> int:
        """What transformers writes after a hypothesis' end: pad, but the first eos for pad 0."""
        return self.pad or self.eos[0]

    def expected(self, **settings) -> np.ndarray:
        return torch_generate(self.reference, self.ids, self.mask, **settings)

    def ours(self, **settings) -> np.ndarray:
        return np.asarray(self.model.generate(self.ids, attention_mask=self.mask, **settings))


def torch_generate(model, ids, mask, **settings) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(
            torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False, **settings
        )
    return out.numpy()


@pytest.fixture(scope="module", params=("gpt2", "llama"))
def pair(request, tmp_path_factory) -> Pair:
    model_type = request.param
    # weights 25x the default scale: a model this tiny with the default would repeat one token,
    # and its beams would never differ or end on different steps
    reference = torch_model(model_type, "causal-lm", initializer_range=0.5)
    directory = tmp_path_factory.mktemp(f"{model_type}-beams")
    reference.save_pretrained(directory)
    inputs = text_inputs(model_type, "causal-lm")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    free_run = torch_generate(
        reference, ids, mask, num_beams=4, max_new_tokens=NEW_TOKENS, eos_token_id=None
    )
    # row r's token at step 3 + 2r: rows (and their beams) end on different steps
    eos = sorted({int(free_run[row, ids.shape[1] + 3 + 2 * row]) for row in range(len(ids))})
    model = flaxauto.AutoModelForCausalLM.from_pretrained(directory)
    pad = {"gpt2": 5, "llama": 0}[model_type]  # pad 0: finished hypotheses end with eos instead
    return Pair(model_type, reference, model, ids, mask, eos, pad)


def one_family(model_type: str):
    return pytest.mark.parametrize("pair", [model_type], indirect=True)


def ends_early(tokens: np.ndarray, pair: Pair) -> bool:
    """Whether the search stopped before max_length with some row ended before the others."""
    short = tokens.shape[1] < pair.ids.shape[1] + NEW_TOKENS
    return short and bool((tokens[:, -1] == pair.fill).any())


@one_family("llama")
def test_beam_search_to_max_length_is_token_identical(pair):
    # with a repetition penalty: what each beam has seen follows it through the reorderings
    settings = dict(
        num_beams=2, max_new_tokens=NEW_TOKENS, eos_token_id=None, repetition_penalty=1.3
    )
    expected = pair.expected(**settings)
    assert expected.shape == (len(pair.ids), pair.ids.shape[1] + NEW_TOKENS)
    np.testing.assert_array_equal(pair.ours(**settings), expected)


@pytest.mark.parametrize("early_stopping", [True, False])
def test_eos_ends_hypotheses_as_transformers_does(pair, early_stopping):
    settings = dict(pair.settings, early_stopping=early_stopping)
    expected = pair.expected(**settings)
    assert ends_early(expected, pair), "no hypothesis ended early; pick other eos tokens"
    np.testing.assert_array_equal(pair.ours(**settings), expected)


@one_family("gpt2")
def test_early_stopping_true_stops_sooner(pair):
    """The previous test's settings mean something: here True and False choose differently."""
    eager = pair.ours(**pair.settings, early_stopping=True)
    patient = pair.ours(**pair.settings, early_stopping=False)
    assert eager.shape[1] < patient.shape[1]


@one_family("llama")
@pytest.mark.parametrize(
    "settings",
    [
        dict(length_penalty=-1.0, num_return_sequences=3),
        dict(length_penalty=2.0, early_stopping="never", num_return_sequences=2),
        dict(length_penalty=0.5, num_return_sequences=4),
    ],
    ids=["shorter", "never-longer", "mild"],
)
def test_length_penalty_and_returned_sequences(pair, settings):
    common = pair.settings
    expected = pair.expected(**common, **settings)
    returned = settings["num_return_sequences"]
    unpenalised = pair.expected(**common, num_return_sequences=returned)
    assert expected.shape[0] == len(pair.ids) * returned
    assert not np.array_equal(expected, unpenalised), "length_penalty changed nothing here"
    np.testing.assert_array_equal(pair.ours(**common, **settings), expected)


@one_family("gpt2")
def test_min_new_tokens_with_beams(pair):
    settings = dict(pair.settings, min_new_tokens=6)
    expected = pair.expected(**settings)
    assert not np.array_equal(expected, pair.expected(**pair.settings)), "no effect here"
    np.testing.assert_array_equal(pair.ours(**settings), expected)


@one_family("gpt2")
def test_other_prompt_lengths_reuse_the_beam_program(pair):
    settings = dict(pair.settings)
    pair.ours(**settings)  # the program of the eos tests: prompt bucket 16, cache bucket 64
    compiled = beam_search._search._cache_size()
    for length, new in ((10, 24), (13, 20), (16, 17)):
        more = ((0, 0), (length - pair.ids.shape[1], 0))  # more left padding
        ids, mask = np.pad(pair.ids, more), np.pad(pair.mask, more)
        settings["max_new_tokens"] = new
        expected = torch_generate(pair.reference, ids, mask, **settings)
        ours = pair.model.generate(ids, attention_mask=mask, **settings)
        np.testing.assert_array_equal(np.asarray(ours), expected)
    # length_penalty and early_stopping are read at run time
    pair.ours(**pair.settings, length_penalty=0.3, early_stopping="never")
    assert beam_search._search._cache_size() == compiled


@one_family("gpt2")
def test_reorder_cache_takes_rows_in_either_layout(pair):
    rng = np.random.default_rng(0)
    cache = pair.model.init_cache(3, 8)
    # per layer [B, S, K, D] (iterating a stacked [L, B, S, K, D] array yields the same)
    keys, values = (
        [rng.normal(size=x.shape).astype(np.float32) for x in layers]
        for layers in (cache.keys, cache.values)
    )
    mask = rng.integers(0, 2, size=cache.mask.shape).astype(np.int32)
    rows = np.array([2, 2, 0])
    per_layer = cache.replace(keys=tuple(keys), values=tuple(values), mask=mask)
    stacked = cache.replace(keys=np.stack(keys), values=np.stack(values), mask=mask)
    for layout in (per_layer, stacked):
        moved = layout.reorder(jnp.asarray(rows))
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            np.testing.assert_array_equal(moved.keys[layer], k[rows])
            np.testing.assert_array_equal(moved.values[layer], v[rows])
        np.testing.assert_array_equal(moved.mask, mask[rows])


@one_family("llama")
def test_unsupported_beam_settings_are_named(pair):
    model, ids, mask = pair.model, pair.ids, pair.mask
    with pytest.raises(NotImplementedError, match="do_sample"):
        model.generate(ids, attention_mask=mask, num_beams=2, do_sample=True)
    with pytest.raises(NotImplementedError, match="num_return_sequences"):
        model.generate(ids, attention_mask=mask, do_sample=True, num_return_sequences=2)
    with pytest.raises(NotImplementedError, match="num_beam_groups"):
        model.generate(ids, attention_mask=mask, num_beams=4, num_beam_groups=2)
    with pytest.raises(NotImplementedError, match="low_memory"):
        model.generate(ids, attention_mask=mask, num_beams=2, low_memory=True)
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate(ids, attention_mask=mask, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="early_stopping"):  # transformers' own check
        model.generate(ids, attention_mask=mask, num_beams=2, early_stopping="sometimes")


@one_family("llama")
def test_return_dict_in_generate_with_beam_scores(pair):
    """Each step's processed log-probabilities and raw logits of every running beam, the
    returned hypotheses' scores and beam indices, as transformers returns them."""
    settings = dict(
        pair.settings, num_return_sequences=2, length_penalty=0.7, no_repeat_ngram_size=3,
        return_dict_in_generate=True, output_scores=True, output_logits=True,
    )  # fmt: skip
    with torch.no_grad():
        theirs = pair.reference.generate(
            torch.as_tensor(pair.ids), attention_mask=torch.as_tensor(pair.mask),
            do_sample=False, **settings,
        )  # fmt: skip
    ours = pair.model.generate(pair.ids, attention_mask=pair.mask, **settings)
    np.testing.assert_array_equal(np.asarray(ours.sequences), theirs.sequences.numpy())
    np.testing.assert_allclose(
        np.asarray(ours.sequences_scores), theirs.sequences_scores.numpy(), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(np.asarray(ours.beam_indices), theirs.beam_indices.numpy())
    assert len(ours.scores) == len(ours.logits) == len(theirs.scores)
    for step_ours, step_theirs in zip(ours.logits, theirs.logits, strict=True):
        np.testing.assert_allclose(np.asarray(step_ours), step_theirs.numpy(), atol=1e-4)
    for step_ours, step_theirs in zip(ours.scores, theirs.scores, strict=True):
        assert step_ours.shape == (len(pair.ids) * 4, pair.model.config.vocab_size)
        step_theirs = step_theirs.numpy()
        np.testing.assert_array_equal(np.isneginf(step_ours), np.isneginf(step_theirs))
        finite = np.isfinite(step_theirs)
        np.testing.assert_allclose(
            np.asarray(step_ours)[finite], step_theirs[finite], rtol=1e-4, atol=1e-4
        )
