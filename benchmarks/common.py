"""Shared pieces of the benchmarks: interleaved median timing, process memory, the results table.

A benchmark module `benchmarks/<name>.py` has `main(argv=None) -> list[dict]`; each dict is one
row of the table. Known keys (any may be absent; other keys become extra columns):

    benchmark   the module's name
    case        what was measured (model, shape, dtype, option)
    flaxauto    flaxauto's figure, formatted ("412 ms", "1.21 GiB")
    alternative what it is compared with, and its figure ("torch eager 840 ms")
    ratio       flaxauto / alternative (float), lower is better unless the target says otherwise
    target      the goal, as text ("<= 0.45")
    met         True / False / None (no target)
    note        anything a reader needs to interpret the row
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

# Quiet transformers and the Hub (set before either is imported): the tables are the output.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# On a GPU, JAX would otherwise take 75% of its memory at start, starving PyTorch beside it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

COLUMNS = ("benchmark", "case", "flaxauto", "alternative", "ratio", "target", "met", "note")
RESULTS = Path(__file__).resolve().parent / "results"
TF32_ERROR = 3e-5  # fp32 matmul relative error above this means TF32 inputs (2^-11 rounding)


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    return p


def cores() -> int:
    """The CPU cores this process may use (what XLA's thread pool sizes itself by)."""
    return len(os.sched_getaffinity(0))


def on_gpu() -> bool:
    """Whether JAX's default backend is a GPU and PyTorch sees CUDA: the side-by-side benchmarks
    then run both frameworks there (on CPU they run exactly as before)."""
    import jax

    if jax.default_backend() != "gpu":
        return False
    import torch

    return torch.cuda.is_available()


def torch_device() -> str:
    """Where the PyTorch side of a comparison runs: "cuda" beside JAX on a GPU, else "cpu"."""
    return "cuda" if on_gpu() else "cpu"


def synchronize(device: str) -> None:
    """Wait for PyTorch's queued work: CUDA kernels run asynchronously, and a timed function must
    block until its work is done."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def devices_label() -> str:
    """Which devices ran a GPU row: JAX's default device and PyTorch's CUDA device."""
    import jax
    import torch

    ours = jax.devices()[0]
    return f"jax {ours.platform} {ours.device_kind}; torch cuda {torch.cuda.get_device_name()}"


def precision_scope(precision: str | None):
    """JAX's default matmul precision for what is traced inside (None: JAX's own default)."""
    import jax

    return jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()


def jax_fp32_matmul_error(precision: str | None) -> float:
    """Relative error of a [512, 512] fp32 product at `precision` against float64 on the host:
    ~1e-6 for IEEE fp32, ~3e-4 for TF32 (inputs rounded to 10 mantissa bits)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 512, 512))
    exact = a @ b
    with precision_scope(precision):
        product = jax.jit(jnp.matmul).lower(a.astype(np.float32), b.astype(np.float32)).compile()
    got = np.asarray(product(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
    return float(np.linalg.norm(got - exact) / np.linalg.norm(exact))


def arithmetic(error: float) -> str:
    return f"{'TF32' if error > TF32_ERROR else 'IEEE fp32'} (rel. err {error:.0e})"


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2):
    """Median seconds per function; the functions take turns, so load on a shared machine hits
    all of them alike. Each must block until its work is done."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes.

    Linux's VmHWM, not getrusage's ru_maxrss: a child started by fork + exec inherits its
    parent's peak in ru_maxrss, so a small child of a big benchmark would report the parent's.
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds >= 0.1 else f"{seconds * 1e3:.1f} ms"


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def row(benchmark, case, flaxauto, alternative, ratio=None, target=None, met=None, note=""):
    return dict(
        benchmark=benchmark, case=case, flaxauto=flaxauto, alternative=alternative,
        ratio=ratio, target=target, met=met, note=note,
    )  # fmt: skip


def machine() -> str:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    accelerator = "" if jax.default_backend() == "cpu" else f", {jax.devices()[0].device_kind}"
    return (
        f"{cpu}, {cores()} cores{accelerator}, jax {jax.__version__} ({jax.default_backend()}), "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )


def _cell(key: str, value) -> str:
    if value is None:
        return ""
    if key == "met":
        return "yes" if value is True else "no" if value is False else str(value)
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value).replace("|", "\\|")


def table(rows: list[dict]) -> str:
    """A markdown table; COLUMNS first, then any other keys in order of appearance."""
    keys = [c for c in COLUMNS if any(c in r for r in rows)]
    keys += [k for r in rows for k in r if k not in keys]
    keys = list(dict.fromkeys(keys))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(k, r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def report(rows: list[dict], name: str | None = None) -> None:
    """Print the table; with `name`, also write it to benchmarks/results/<name>.md."""
    text = table(rows)
    print(text)
    if name:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{name}.md").write_text(text + "\n")
