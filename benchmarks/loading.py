"""Loading: a 124M-parameter checkpoint (about 500 MB in fp32) into a ready flaxauto model.

Every load runs in a fresh subprocess, which reports the wall time of the load (after the
imports it needs: jax's runtime, transformers' config classes) and its peak RSS over its RSS
right after `import flaxauto`. flaxauto needs no torch, and the flaxauto and safetensors
children run where torch cannot be imported (with torch installed, transformers' config module
imports it: 230 MiB and 2 s before any loading). The alternative is a raw
`safetensors.numpy.load_file` of the same file (`torch.load` for the .bin). The checkpoint files
are freshly written, so they are read from the page cache.

    python benchmarks/loading.py [--quick] [--model gpt2|bert]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

TIME_TARGET = 1.0  # seconds
MEMORY_TARGET = 1.2  # peak RSS over the import baseline, in checkpoint sizes


def _child(kind: str, path: str, dtype: str) -> None:
    """Runs in the subprocess: one load, then a JSON line with its figures."""
    if kind != "torch":
        # as where flaxauto is installed without torch; with torch installed, transformers'
        # config module imports it (about 230 MiB and 2 s more, before any loading starts)
        sys.modules["torch"] = None
    import flaxauto

    after_import = common.current_rss()
    start = time.perf_counter()
    import jax
    import transformers

    jax.devices()
    transformers.AutoConfig  # noqa: B018 (the lazy import is the point)
    imports = time.perf_counter() - start
    if kind == "build":  # the model's abstract build alone, as the first one in a process
        from flaxauto import modeling

        config = transformers.AutoConfig.from_pretrained(path)
    start = time.perf_counter()
    if kind == "build":
        modeling.build_abstract(config, "base", modeling._precision(None, None))
    elif kind == "flaxauto":
        import jax.numpy as jnp
        from flax import nnx

        dtypes = {"fp32": None, "bf16": jnp.bfloat16}
        model = flaxauto.AutoModel.from_pretrained(path, param_dtype=dtypes[dtype])
        jax.block_until_ready(nnx.state(model))
    elif kind == "safetensors":
        import safetensors.numpy

        safetensors.numpy.load_file(Path(path) / "model.safetensors")
    elif kind == "torch":
        import torch

        torch.load(Path(path) / "pytorch_model.bin", weights_only=True)
    seconds = time.perf_counter() - start
    stats = dict(seconds=seconds, peak=common.peak_rss(), after_import=after_import)
    print(json.dumps(stats | {"imports": imports}))


def measure(kind: str, path: Path, dtype: str, repeats: int) -> dict:
    """Median figures over `repeats` fresh processes."""
    runs = []
    for _ in range(repeats):
        command = [sys.executable, __file__, "--child", kind, str(path), dtype]
        env = dict(os.environ, JAX_PLATFORMS="cpu", TRANSFORMERS_VERBOSITY="error")
        out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if out.returncode:
            raise RuntimeError(f"{kind} load of {path} failed:\n{out.stderr[-3000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def write_checkpoints(model_type: str, root: Path) -> dict[str, Path]:
    """The same random weights as single safetensors, sharded safetensors and pytorch_model.bin."""
    import torch
    import transformers

    if model_type == "gpt2":
        config = transformers.GPT2Config()  # the 124M "gpt2"
        model = transformers.GPT2Model(config)
    else:  # BERT-base with GPT-2's vocabulary: the same size
        config = transformers.BertConfig(vocab_size=50257)
        model = transformers.BertModel(config)
    paths = {name: root / name for name in ("safetensors", "sharded", "bin")}
    model.save_pretrained(paths["safetensors"])
    model.save_pretrained(paths["sharded"], max_shard_size="200MB")
    paths["bin"].mkdir()
    config.save_pretrained(paths["bin"])
    torch.save(model.state_dict(), paths["bin"] / "pytorch_model.bin")
    return paths


def _size(directory: Path, pattern: str) -> tuple[int, int]:
    """(total bytes, largest file) of the weight files."""
    sizes = [p.stat().st_size for p in directory.glob(pattern)]
    return sum(sizes), max(sizes)


def main(argv=None) -> list[dict]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--model", choices=("gpt2", "bert"), default=None)
    args = p.parse_args(argv)
    import flaxauto

    model_type = args.model or ("gpt2" if "gpt2" in flaxauto.supported() else "bert")
    repeats = 2 if args.quick else 5
    rows = []
    with tempfile.TemporaryDirectory() as root:
        paths = write_checkpoints(model_type, Path(root))
        size, _ = _size(paths["safetensors"], "*.safetensors")
        _, shard = _size(paths["sharded"], "*.safetensors")
        raw = measure("safetensors", paths["safetensors"], "fp32", repeats)
        raw_torch = measure("torch", paths["bin"], "fp32", repeats)
        cases = [  # (case, checkpoint, dtype, alternative, memory budget in bytes)
            ("safetensors fp32", "safetensors", "fp32", raw, MEMORY_TARGET * size),
            (".bin fp32", "bin", "fp32", raw_torch, MEMORY_TARGET * size),
            ("sharded safetensors fp32", "sharded", "fp32", raw, size + shard),
            ("safetensors -> bf16", "safetensors", "bf16", raw, MEMORY_TARGET * size),
        ]
        for case, checkpoint, dtype, alternative, budget in cases:
            got = measure("flaxauto", paths[checkpoint], dtype, repeats)
            memory = got["peak"] - got["after_import"]
            alt_memory = alternative["peak"] - alternative["after_import"]
            alt_name = "torch.load" if checkpoint == "bin" else "safetensors load_file"
            met = got["seconds"] <= TIME_TARGET and memory <= budget
            rows.append(
                common.row(
                    "loading", f"{model_type} {size / 1e6:.0f} MB {case}",
                    f"{got['seconds']:.2f} s, +{common.mib(memory)}",
                    f"{alt_name} {alternative['seconds']:.2f} s, +{common.mib(alt_memory)}",
                    got["seconds"] / alternative["seconds"],
                    f"<= {TIME_TARGET:.1f} s, +{common.mib(budget)}", met,
                    f"peak RSS {common.mib(got['peak'])} over {common.mib(got['after_import'])}"
                    f" after import flaxauto; jax runtime + transformers config imports "
                    f"{got['imports']:.2f} s, not in the time",
                )
            )  # fmt: skip
            if case == "safetensors fp32":
                load = got["seconds"]
        build = measure("build", paths["safetensors"], "fp32", repeats)
        rows.append(
            common.row(
                "loading", f"{model_type} abstract build (in the load above)",
                f"{build['seconds']:.2f} s", f"the safetensors fp32 load {load:.2f} s",
                build["seconds"] / load,
                note="placeholder initialisers return shape/dtype structures and RNG streams "
                "are deferred: nothing is traced, no private jax",
            )
        )  # fmt: skip
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(*sys.argv[2:5])
    else:
        common.report(main(), "loading")
