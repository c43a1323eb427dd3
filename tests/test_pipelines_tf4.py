"""The pipelines transformers 5 removed, kept with transformers 4.x's behaviour: flaxauto's
answers equal those transformers 4.x's PyTorch pipeline gave on the same checkpoint and inputs
(recorded by tests/fixtures/make_pipeline_fixtures.py, which says how to rerun it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import flaxauto
from flaxauto.cli import main

QA_DIR = Path(__file__).parent / "fixtures" / "qa-tiny"
RECORD = json.loads((QA_DIR / "answers.json").read_text())
#: the spans' scores are products of two softmaxes over a window (about 1e-3): compared relatively
RELATIVE = 1e-4


def assert_same_answers(ours, theirs, path="answer"):
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and set(ours) == set(theirs), f"{path}: {ours} vs {theirs}"
        for key in theirs:
            assert_same_answers(ours[key], theirs[key], f"{path}.{key}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), f"{path}: {ours} vs {theirs}"
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_same_answers(a, b, f"{path}[{i}]")
    elif isinstance(theirs, float):
        assert abs(ours - theirs) <= RELATIVE * abs(theirs), f"{path}: {ours} vs {theirs}"
    else:
        assert ours == theirs, f"{path}: {ours!r} vs {theirs!r}"


@pytest.fixture(scope="module")
def qa():
    return flaxauto.pipeline("question-answering", model=str(QA_DIR), batch_size=3)


@pytest.mark.parametrize("case", RECORD["cases"], ids=lambda case: json.dumps(case["params"]))
def test_question_answering_matches_transformers_4(qa, case):
    assert_same_answers(qa(**case["inputs"], **case["params"]), case["answers"])


def test_question_answering_takes_transformers_4_call_forms(qa):
    question, context = RECORD["cases"][0]["inputs"].values()
    expected = RECORD["cases"][0]["answers"]
    assert_same_answers(qa(question, context), expected)
    assert_same_answers(qa({"question": question, "context": context}), expected)
    assert_same_answers(qa([{"question": question, "context": context}] * 2), [expected] * 2)


def test_question_answering_refuses_bad_input(qa):
    with pytest.raises(ValueError, match="context` cannot be empty"):
        qa(question="Why?", context="")
    with pytest.raises(ValueError, match="same lengths"):
        qa(question=["a?", "b?"], context=["only one"])
    with pytest.raises(ValueError, match="doc_stride"):
        qa(question="a?", context="b", max_seq_len=16, doc_stride=32)


def test_the_run_command_answers_json_lines(capsys):
    case = RECORD["cases"][1]
    assert main(["run", "question-answering", str(QA_DIR), json.dumps(case["inputs"]),
                 "--param", "top_k=3"]) == 0  # fmt: skip
    (line,) = capsys.readouterr().out.splitlines()
    assert_same_answers(json.loads(line), case["answers"])


SEQ2SEQ_DIR = Path(__file__).parent / "fixtures" / "seq2seq-tiny"
SEQ2SEQ = json.loads((SEQ2SEQ_DIR / "answers.json").read_text())


@pytest.fixture(scope="module")
def bart():
    return flaxauto.AutoModelForSeq2SeqLM.from_pretrained(str(SEQ2SEQ_DIR))


@pytest.mark.parametrize(
    "case", SEQ2SEQ["cases"], ids=lambda case: f"{case['task']}-{json.dumps(case['params'])}"
)
def test_text2text_pipelines_match_transformers_4(case, bart):
    """summarization / text2text-generation / translation_xx_to_yy with the checkpoint's
    task_specific_params (prefix and generation settings), greedy and beam search."""
    pipe = flaxauto.pipeline(case["task"], model=bart, tokenizer=str(SEQ2SEQ_DIR), batch_size=2)
    assert_same_answers(pipe(case["inputs"], **case["params"]), case["answers"])
