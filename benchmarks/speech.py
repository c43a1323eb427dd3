"""Speech: Whisper-tiny and Whisper-base shapes transcribing 30 s (64 new tokens, greedy, batch 1
and 4) and Wav2Vec2-base forward on 10 s at batch 4, flaxauto vs transformers PyTorch on the same
random weights (saved by transformers, loaded by flaxauto), in one run.

flaxauto's generate is one compiled program (encoder once, decoder loop inside); its first call
compiles and is not timed. PyTorch runs eagerly under inference_mode with as many threads as JAX
has cores; its Whisper generate is asked for one call over the window
(force_unique_generate_call) and both sides must emit all 64 tokens (min_new_tokens): random
weights would otherwise stop at different lengths. Medians of interleaved runs.

    python benchmarks/speech.py [--quick] [--only whisper-tiny ...]
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


#: openai/whisper-tiny and openai/whisper-base shapes
WHISPER_SHAPES = {
    "whisper-tiny": dict(d_model=384, encoder_layers=4, decoder_layers=4, encoder_attention_heads=6,
                         decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536),
    "whisper-base": dict(d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                         decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048),
}  # fmt: skip
#: openai/whisper-*'s generation_config.json, the parts greedy transcription reads
WHISPER_GENERATION = dict(
    decoder_start_token_id=50258, pad_token_id=50257, eos_token_id=50257, bos_token_id=50257,
    lang_to_id={"<|en|>": 50259}, task_to_id={"transcribe": 50359, "translate": 50358},
    no_timestamps_token_id=50363, is_multilingual=True, max_length=448,
    # random weights emit timestamp ids (50364 on), which transformers' Whisper then parses into
    # segments and decodes again; both sides suppress them, so each runs one 64-token decode
    suppress_tokens=list(range(50364, 51865)),
)  # fmt: skip
NEW_TOKENS = 64


def whisper_greedy(name: str, batch: int, repeats: int) -> dict:
    import torch
    import transformers

    import flaxauto

    config = transformers.WhisperConfig(
        vocab_size=51865, num_mel_bins=80, max_source_positions=1500, max_target_positions=448,
        **WHISPER_SHAPES[name],
    )  # fmt: skip
    rng = np.random.default_rng(0)
    features = rng.uniform(-1.0, 1.5, (batch, 80, 3000)).astype(np.float32)  # 30 s of log-mel
    settings = dict(language="en", max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        reference = transformers.WhisperForConditionalGeneration(config).eval()
        reference.generation_config = transformers.GenerationConfig(**WHISPER_GENERATION)
        reference.save_pretrained(directory)
        model = flaxauto.AutoModelForSpeechSeq2Seq.from_pretrained(directory)
    tensor = torch.as_tensor(features)

    def ours():
        return np.asarray(model.generate(None, input_features=features, **settings))

    def theirs():
        with torch.inference_mode():
            return reference.generate(tensor, force_unique_generate_call=True, **settings).numpy()

    same = np.array_equal(ours()[:, 4:], theirs())  # flaxauto returns the 4 prompt tokens too
    times = common.interleaved({"ours": ours, "theirs": theirs}, repeats, warmup=1)
    return common.row(
        "speech",
        f"{name} greedy, 30 s, {NEW_TOKENS} new tokens, batch {batch}",
        f"{times['ours']:.2f} s",
        f"torch eager {times['theirs']:.2f} s",
        times["ours"] / times["theirs"],
        target="<= 0.8" if (name, batch) == ("whisper-tiny", 1) else None,
        met=times["ours"] / times["theirs"] <= 0.8
        if (name, batch) == ("whisper-tiny", 1)
        else None,
        note=f"tokens identical: {same}; {common.cores()} threads each; seconds per batch",
    )


CASES = {
    "whisper-tiny": lambda repeats, batches: [
        whisper_greedy("whisper-tiny", b, repeats) for b in batches
    ],
    "whisper-base": lambda repeats, batches: [
        whisper_greedy("whisper-base", b, repeats) for b in batches
    ],
    "wav2vec2": lambda repeats, batches: wav2vec2_forward(repeats),
}


def main(argv=None) -> list[dict]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=sorted(CASES), help="run only these cases")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(common.cores())
    repeats = 2 if args.quick else 5
    batches = (1,) if args.quick else (1, 4)  # --quick: Whisper at batch 1 only
    rows = []
    for name in args.only or CASES:
        rows += CASES[name](repeats, batches)
    return rows


if __name__ == "__main__":
    common.report(main(), "speech")
