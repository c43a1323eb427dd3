"""Layer stacks and encoder backbones: layers stored per index or stacked and scanned, run
unrolled, with jax.lax.scan, or rematerialised, with the same code.
"""

from __future__ import annotations

import jax
from flax import nnx

from flaxauto import layers
from flaxauto.outputs import BaseModelOutput


class ScannedLayers(nnx.Module):
    """`num_layers` identical layers stored stacked (every parameter [L, ...], logical axis
    "layers" first) and run with jax.lax.scan: one layer is traced and compiled, whatever the
    depth. Checkpoints keep transformers' per-layer names (converters.layout unstacks them)."""

    def __init__(self, make_layer, num_layers: int, rngs: nnx.Rngs):
        # Built abstractly (flaxauto.modeling.build_abstract): layer 0 is built once and each of
        # its variables becomes [L, ...], as nnx.vmap would make it, without tracing.
        block = make_layer(0, rngs)
        for path, variable in nnx.iter_graph(block):
            if not isinstance(variable, nnx.Variable):
                continue
            value = variable.get_value()
            if not layers.is_abstract(value):
                raise TypeError(
                    f"ScannedLayers stacks abstract variables only (build the model with "
                    f"flaxauto.modeling.build_abstract); {'.'.join(map(str, path))} has a value"
                )
            variable.set_value(jax.ShapeDtypeStruct((num_layers, *value.shape), value.dtype))
            axes = variable.get_metadata("out_sharding", None)
            if axes is not None:
                variable.set_metadata("out_sharding", ("layers", *axes))
        self.block = block
        self.num_layers = num_layers


def layer_stack(make_layer, num_layers: int, rngs: nnx.Rngs, *, scan: bool = False):
    """`make_layer(index, rngs)` for every layer: an nnx.List (transformers' `layer.0`,
    `layer.1`, ...) or, with scan, one ScannedLayers, which builds layer 0 for all of them (a
    family whose layers differ by index refuses scan_layers for that config)."""
    if scan:
        return ScannedLayers(make_layer, num_layers, rngs)
    return nnx.List([make_layer(index, rngs) for index in range(num_layers)])


class EncoderBackbone(nnx.Module):
    """What BERT-like backbones share: `embeddings.word_embeddings` (tied LM heads read it) and
    the forward from embeddings through the layer stack to the output."""

    def get_input_embeddings(self) -> nnx.Embed:
        return self.embeddings.word_embeddings

    def encode(
        self, stack, embeddings, attention_mask, pooler=None, *,
        output_hidden_states: bool, output_attentions: bool,
    ):  # fmt: skip
        """embeddings [B, T, E] -> BaseModelOutput."""
        hidden, all_hidden, all_probs = stack(
            embeddings, layers.padding_bias(attention_mask), output_hidden_states, output_attentions
        )
        return BaseModelOutput(
            last_hidden_state=hidden,
            pooler_output=None if pooler is None else pooler(hidden),
            hidden_states=all_hidden,
            attentions=all_probs,
        )


class Encoder(nnx.Module):
    """Layers under the attribute `layer` (BERT's `encoder`, DistilBERT's `transformer`)."""

    def __init__(self, make_layer, num_layers: int, rngs, *, scan: bool = False, remat=False):
        self.layer = layer_stack(make_layer, num_layers, rngs, scan=scan)
        self.remat = remat

    def __call__(self, hidden_states, bias, output_hidden_states, output_attentions):
        last, all_hidden, all_probs, _ = run_layers(
            self.layer,
            hidden_states,
            lambda layer, hidden, _: (*layer(hidden, bias, output_attentions), None),
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            remat=self.remat,
        )
        return last, all_hidden, all_probs


def run_encoder(
    layer_stack, hidden_states, call, final_norm, *,
    output_hidden_states: bool, output_attentions: bool, remat: bool = False,
) -> BaseModelOutput:  # fmt: skip
    """An encoder stack's forward: `call(layer, hidden) -> (hidden, probs)` over the layers, then
    `final_norm`. As in transformers, hidden_states ends with the normed output rather than the
    last layer's own (BART, T5, Whisper encoders)."""
    last, all_hidden, all_probs, _ = run_layers(
        layer_stack,
        hidden_states,
        lambda layer, hidden, _: (*call(layer, hidden), None),
        output_hidden_states=output_hidden_states,
        output_attentions=output_attentions,
        remat=remat,
    )
    last = final_norm(last)
    if all_hidden is not None:
        all_hidden = (*all_hidden[:-1], last)
    return BaseModelOutput(last_hidden_state=last, hidden_states=all_hidden, attentions=all_probs)


def run_layers(
    layer_stack,
    hidden_states,
    call,
    per_layer=None,
    *,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
    remat: bool = False,
):
    """Run `call(layer, hidden, item) -> (hidden, probs, new_item)` over the layers in order.

    `per_layer` is a tuple whose entries are indexed by layer (per-layer tuples for a plain stack,
    [L, ...] arrays for ScannedLayers), e.g. a KV cache; `item` is layer i's (x[i] for each x),
    or None. remat recomputes each layer's activations in the backward pass instead of storing
    them (jax.checkpoint per layer).

    Returns (last hidden state, all hidden states incl. the input or None, all probs or None,
    the new per_layer in the same form, or None).
    """

    def step(hidden, layer_state, item, graphdef):
        # A pure function of the layer's state (jax.lax.scan / jax.checkpoint, not their nnx
        # wrappers): it composes with plain jax.grad over nnx.split state, not only nnx.grad.
        layer = nnx.merge(graphdef, layer_state)
        hidden, probs, new_item = call(layer, hidden, item)
        hidden = layers.constrain(hidden, layers.HIDDEN_AXES)
        kept = (hidden if output_hidden_states else None, probs if output_attentions else None)
        # in training, dropout advanced its RNG streams and batch norms their statistics: hand
        # them back to the real layer
        training = nnx.Any(nnx.RngState, nnx.BatchStat)
        streams = nnx.state(layer, training) if _training(layer) else None
        return hidden, (kept, new_item, streams)

    if remat:
        step = jax.checkpoint(step, static_argnums=(3,))
    if isinstance(layer_stack, ScannedLayers):
        graphdef, stacked = nnx.split(layer_stack.block)
        last, ((stacked_hidden, stacked_probs), new_per_layer, new_state) = jax.lax.scan(
            lambda h, xs: step(h, *xs, graphdef), hidden_states, (stacked, per_layer)
        )
        if new_state is not None:
            nnx.update(layer_stack.block, new_state)
        all_hidden = None if stacked_hidden is None else [hidden_states, *stacked_hidden]
        # per layer, whatever a layer returns as its probabilities (an array, or a decoder's
        # (self, cross) pair)
        all_probs = None
        if stacked_probs is not None:
            all_probs = [
                jax.tree.map(lambda x, i=i: x[i], stacked_probs)
                for i in range(layer_stack.num_layers)
            ]
    else:
        last, all_hidden, all_probs, new_items = hidden_states, [hidden_states], [], []
        for index, layer in enumerate(layer_stack):
            graphdef, layer_state = nnx.split(layer)
            item = None if per_layer is None else tuple(x[index] for x in per_layer)
            last, ((hidden, probs), new_item, new_state) = step(last, layer_state, item, graphdef)
            if new_state is not None:
                nnx.update(layer, new_state)
            all_hidden.append(hidden)
            all_probs.append(probs)
            new_items.append(new_item)
        no_items = not new_items or new_items[0] is None
        new_per_layer = None if no_items else tuple(zip(*new_items, strict=True))
    return (
        last,
        tuple(all_hidden) if output_hidden_states else None,
        tuple(all_probs) if output_attentions else None,
        new_per_layer,
    )


def _training(module: nnx.Module) -> bool:
    """Whether any dropout or batch norm in `module` is in training mode (model.train())."""
    return any(
        (isinstance(m, nnx.Dropout) and not m.deterministic and m.rate > 0)
        or (isinstance(m, layers.BatchNorm) and not m.use_running_average)
        for _, m in nnx.iter_modules(module)
    )
