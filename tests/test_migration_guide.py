"""The README's "Coming from transformers 4 Flax" guide runs as written: its Python blocks are
executed in order, in one namespace, against tiny checkpoints (with tokenizers) made here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from references import torch_model

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "## Coming from transformers 4 Flax\n"


def guide_blocks() -> list[str]:
    text = README.read_text()
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def _tokenizer(vocab_size: int):
    words = ["a", "first", "sentence", "another", "once", "upon", "time"]
    vocab = {word: i + 3 for i, word in enumerate(words)} | {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab |= {f"w{i}": i for i in range(len(vocab), vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    paths = {}
    for name, model_type, task in [
        ("path", "bert", "sequence-classification"),
        ("lm_path", "gpt2", "causal-lm"),
    ]:
        reference = torch_model(model_type, task, num_labels=2)
        directory = tmp_path_factory.mktemp(name)
        reference.save_pretrained(directory)
        _tokenizer(reference.config.vocab_size).save_pretrained(directory)
        paths[name] = str(directory)
    paths["saved_path"] = str(tmp_path_factory.mktemp("saved"))
    return paths


def test_every_snippet_of_the_migration_guide_runs(checkpoints):
    blocks = guide_blocks()
    assert len(blocks) == 5
    namespace = dict(checkpoints)
    for number, block in enumerate(blocks, 1):
        code = compile(block, f"README migration guide, block {number}", "exec")
        exec(code, namespace)  # noqa: S102 (the README's own code)
    assert namespace["text"] and namespace["loss"] > 0
