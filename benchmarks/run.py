"""Run the benchmark suite: print one markdown table and write it to benchmarks/results/latest.md.

    python benchmarks/run.py [--quick] [--only NAME ...]

Each benchmark is a module here with main(argv) -> rows (see common.py); they run one after
another in this process, except loading, which starts a fresh process per load. A benchmark
that fails (or is missing) gets a row saying so, and the others still run.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

BENCHMARKS = (
    "encoder",
    "vit",
    "convnet",
    "detection",
    "table",
    "seq2seq",
    "t5_decode",
    "speech",
    "pipelines",
    "loading",
    "compile",
    "training",
    "decode",
    "gpu",
)


def run_one(name: str, quick: bool) -> list[dict]:
    try:
        module = importlib.import_module(name)
    except ImportError as error:
        return [common.row(name, "skipped", "", "", note=f"not run: cannot import ({error})")]
    try:
        return list(module.main(["--quick"] if quick else []))
    except Exception as error:  # one broken benchmark must not hide the others' results
        traceback.print_exc()
        line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return [common.row(name, "failed", "", "", note=f"{type(error).__name__}: {line}")]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, metavar="NAME",
                   help=f"run only these, of {', '.join(BENCHMARKS)}")  # fmt: skip
    args = p.parse_args(argv)
    rows = []
    for name in args.only or BENCHMARKS:
        start = time.perf_counter()
        print(f"-- {name} ...", file=sys.stderr, flush=True)
        rows += run_one(name, args.quick)
        print(f"-- {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    text = common.table(rows)
    header = f"Machine: {common.machine()}. Medians of interleaved runs after warm-up."
    print(text)
    common.RESULTS.mkdir(exist_ok=True)
    (common.RESULTS / "latest.md").write_text(f"{header}\n\n{text}\n")
    print(f"\n{header}\nwritten to {common.RESULTS / 'latest.md'}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
