"""Speech: Wav2Vec2-base forward on 10 s of audio at batch 4, flaxauto under jit vs transformers
PyTorch on the same random weights (saved by transformers, loaded by flaxauto), in one run.

flaxauto runs a jitted pure function over nnx.split state; PyTorch runs eagerly under
inference_mode with as many threads as JAX has cores. Medians of interleaved runs.

    python benchmarks/speech.py [--quick]
"""

from __future__ import annotations

import tempfile

import common
import jax
import numpy as np

SAMPLING_RATE = 16000


def wav2vec2_forward(repeats: int) -> list[dict]:
    import torch
    import transformers
    from flax import nnx

    import flaxauto

    batch, seconds = 4, 10
    config = transformers.Wav2Vec2Config()  # facebook/wav2vec2-base's shape
    rng = np.random.default_rng(0)
    values = rng.standard_normal((batch, seconds * SAMPLING_RATE)).astype(np.float32)
    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        reference = transformers.Wav2Vec2Model(config).eval()
        reference.save_pretrained(directory)
        model = flaxauto.AutoModel.from_pretrained(directory)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(input_values=x).last_hidden_state)
    inputs = jax.numpy.asarray(values)
    tensor = torch.as_tensor(values)

    def ours():
        return forward(state, inputs).block_until_ready()

    def theirs():
        with torch.inference_mode():
            return reference(tensor).last_hidden_state

    diff = float(np.max(np.abs(np.asarray(ours()) - theirs().numpy())))
    times = common.interleaved({"ours": ours, "theirs": theirs}, repeats, warmup=1)
    return [
        common.row(
            "speech",
            f"Wav2Vec2-base fp32 forward, {batch} x {seconds} s",
            common.ms(times["ours"]),
            f"torch eager {common.ms(times['theirs'])}",
            times["ours"] / times["theirs"],
            note=f"max abs diff {diff:.1e}; {common.cores()} threads each",
        )
    ]


def main(argv=None) -> list[dict]:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    import torch

    torch.set_num_threads(common.cores())
    repeats = 2 if args.quick else 5
    return wav2vec2_forward(repeats)


if __name__ == "__main__":
    common.report(main(), "speech")
