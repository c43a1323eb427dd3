"""Compile time: a BERT-base-width encoder, 24 layers vs 2, with scan_layers on and off.

Times trace + lower + XLA compile of the jitted forward (a pure function over nnx.split state,
batch 8 x seq 128). The models are built abstractly (no weights are initialised): compiling
needs only shapes. With scan_layers=True one layer is traced and compiled whatever the depth.

    python benchmarks/compile.py [--quick]
"""

from __future__ import annotations

import inspect
import time

import common

DEPTHS = (2, 24)
TARGET = 1.5  # 24-layer compile time over 2-layer, with scan_layers


def scan_available() -> bool:
    from flaxauto import modeling

    return "scan_layers" in inspect.signature(modeling.from_config).parameters


def compile_seconds(layers: int, scan: bool) -> float:
    """Seconds to trace, lower and compile the forward of a freshly built abstract model."""
    import jax
    import jax.numpy as jnp
    import transformers
    from flax import nnx

    import flaxauto

    config = transformers.BertConfig(num_hidden_layers=layers)
    options = {"scan_layers": True} if scan else {}
    model = nnx.eval_shape(lambda: flaxauto.AutoModel.from_config(config, **options))
    graphdef, state = nnx.split(model)
    inputs = {
        "input_ids": jax.ShapeDtypeStruct((8, 128), jnp.int32),
        "attention_mask": jax.ShapeDtypeStruct((8, 128), jnp.int32),
    }
    # a new function object each time, so nothing is reused from an earlier compile
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(**x).last_hidden_state)
    start = time.perf_counter()
    forward.trace(state, inputs).lower().compile()
    return time.perf_counter() - start


def main(argv=None) -> list[dict]:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    repeats = 1 if args.quick else 3
    modes = (False, True) if scan_available() else (False,)
    compile_seconds(2, False)  # warm-up: first-use costs of jax and flax in this process
    times = {(d, s): [] for d in DEPTHS for s in modes}
    for _ in range(repeats):  # interleaved, so machine load hits every variant alike
        for key in times:
            times[key].append(compile_seconds(*key))
    median = {key: sorted(ts)[len(ts) // 2] for key, ts in times.items()}
    rows = []
    for scan in (True, False):
        case = f"BERT-base width, 24 vs 2 layers, scan_layers={scan}"
        if scan not in modes:
            rows.append(
                common.row("compile", case, "pending", "", target=f"<= {TARGET}",
                           note="pending: option scan_layers not available")
            )  # fmt: skip
            continue
        deep, shallow = median[(24, scan)], median[(2, scan)]
        rows.append(
            common.row(
                "compile", case, f"24 layers {deep:.2f} s", f"2 layers {shallow:.2f} s",
                deep / shallow, f"<= {TARGET}" if scan else None,
                deep / shallow <= TARGET if scan else None,
                "trace + lower + compile of the jitted forward, 8x128",
            )
        )  # fmt: skip
    if True in modes:
        scanned, unrolled = median[(24, True)], median[(24, False)]
        rows.append(
            common.row(
                "compile", "24 layers: scan_layers=True vs False", f"{scanned:.2f} s",
                f"unrolled {unrolled:.2f} s", scanned / unrolled,
            )
        )  # fmt: skip
    return rows


if __name__ == "__main__":
    common.report(main(), "compile")
