"""What a DagNN comparison (``compare_dag``) feeds both sides: the inputs it is handed,
checked against the net's input vars; the Loss layers whose outputs it seeds (softmaxlog,
as ``cnn_train_dag``; classerror/topkerror are metrics) and how each normalises; which of
the Keras model's inputs takes which data var (``feed_order``: by name when the model's
inputs are named after the data vars, as ``to_keras_dag`` names them, else by order with
the shapes checked).
"""

from __future__ import annotations

import weakref

import numpy as np

from harness.mcn.dagnn import DagLayer, DagNet
from harness.mcn.options import McnError, check_budget
from harness.translate.build import keras_name

__all__ = [
    "LOSS",
    "METRIC_LOSSES",
    "ACTIVATION_COPIES",
    "activation_bytes",
    "var_shapes",
    "check_activation_budget",
    "check_inputs",
    "check_output_count",
    "declared_shapes",
    "feed_order",
    "loss_type",
    "model_tensors",
    "normalised",
    "seeded_losses",
]

LOSS = "dagnn.Loss"
# A comparison holds each var's value and derivative on both sides, in float64, and again
# in the float64 copy of a float32 model: 2 x 4 times the float64 values of one pass.
ACTIVATION_COPIES = 8
_SIZES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Loss types that are metrics, never seeded (cnn_train_dag reports them, derives nothing)
METRIC_LOSSES = ("classerror", "topkerror")


def loss_type(layer: DagLayer) -> str:
    """The loss a ``dagnn.Loss`` layer computes, lower case (softmaxlog by default)."""
    loss = layer.block.get("loss", "softmaxlog")
    return loss.lower() if isinstance(loss, str) else repr(loss)


def seeded_losses(net: DagNet) -> list[DagLayer]:
    """The Loss layers whose output is seeded (softmaxlog), in execution order; metrics
    (classerror, topkerror) are left out; any other loss type raises McnError naming the
    layer."""
    out = []
    for i in net.execution_order():
        layer = net.layers[i]
        if layer.type != LOSS:
            continue
        kind = loss_type(layer)
        if kind in METRIC_LOSSES:
            continue
        if kind != "softmaxlog":
            raise McnError(
                f"layer '{layer.name}' (dagnn.Loss): loss {kind!r} is not supported by compare_dag yet "
                "(softmaxlog only; classerror/topkerror are skipped as metrics): remove it with "
                f"net.remove_layer({layer.name!r}) to compare the rest"
            )
        if len(layer.inputs) != 2:
            raise McnError(
                f"layer '{layer.name}' (dagnn.Loss): Expected 2 inputs (scores, labels). Received "
                f"{layer.inputs} (instance weights are not supported by compare_dag)"
            )
        opts = [o.lower() if isinstance(o, str) else o for o in list(layer.block.get("opts") or [])]
        if any(o in ("instanceweights", "classweights") for o in opts):
            raise McnError(
                f"layer '{layer.name}' (dagnn.Loss): instance or class weights are not supported "
                "by compare_dag"
            )
        out.append(layer)
    return out


def normalised(layer: DagLayer) -> bool:
    """Whether a Loss layer divides by the batch size (its opts' ``normalise``, default
    true)."""
    opts = list(layer.block.get("opts") or [])
    for k in range(0, len(opts) - 1, 2):
        if isinstance(opts[k], str) and opts[k].lower() == "normalise":
            return bool(np.asarray(opts[k + 1]).ravel()[0])
    return True


def check_inputs(net: DagNet, inputs: dict, data_vars: list[str]) -> None:
    """Raise McnError unless ``inputs`` is a dict naming input vars of ``net`` only, with a
    value for every data var and every label a Loss layer reads."""
    if not isinstance(inputs, dict):
        raise McnError(f"Expected inputs as a dict of var name -> array. Received {type(inputs).__name__}")
    unknown = [k for k in inputs if k not in net.get_inputs()]
    if unknown:
        raise McnError(
            f"Expected inputs to name input vars of the net ({', '.join(net.get_inputs())}). "
            f"Received {', '.join(map(str, unknown))}"
        )
    needed = set(data_vars) | {l.inputs[1] for l in net.layers if l.type == LOSS and len(l.inputs) > 1}
    needed &= set(net.get_inputs())
    missing = [v for v in net.get_inputs() if v in needed and v not in inputs]
    if missing:
        raise McnError(f"Expected a value for input var(s) {', '.join(missing)} (labels included)")


def model_tensors(model, which: str = "inputs") -> list:
    """The input tensors the Keras ``model`` declares (``which="outputs"``: its output
    tensors); none for a subclassed model that was never called."""
    try:
        return list(getattr(model, which, None) or [])
    except (AttributeError, ValueError):  # pragma: no cover - a Keras version without them
        return []


def check_output_count(outputs: list[str], count: int) -> None:
    """McnError unless a model returning ``count`` outputs returns one per output var."""
    if count != len(outputs):
        raise McnError(
            f"Expected a model returning the net's {len(outputs)} outputs ({', '.join(outputs)}), in that "
            f"order. Received {count}"
        )


def _named(declared: list, data_vars: list[str]) -> list[str | None]:
    """For each declared model input, the data var it is named after (``keras_name`` of
    the var, as ``to_keras_dag`` names its inputs, or the var's own name), else None."""
    names: dict[str, str] = {}
    for v in data_vars:
        names.setdefault(keras_name(v), v)
        names.setdefault(v, v)
    return [names.get(str(getattr(t, "name", ""))) for t in declared]


def declared_shapes(model, data_vars: list[str]) -> dict[str, tuple]:
    """Data var -> the input shape (H, W, C; None where free) the model declares for it:
    matched by name when every input is named after a data var, else by order."""
    declared = model_tensors(model)
    named = _named(declared, data_vars)
    if None in named or len(set(named)) != len(named) or len(declared) != len(data_vars):
        named = list(data_vars)
    return {v: tuple(t.shape[1:]) for v, t in zip(named, declared, strict=False)}


def feed_order(model, data_vars: list[str], sizes: dict[str, tuple]) -> tuple[list[str], str]:
    """The data vars in the order the model takes its inputs, and how they were matched
    (a note; "" for a net of one data input, which is fed as it is): by name when each of
    the model's inputs is named after a data var, else by order; each input's declared
    shape checked against the var's ``sizes`` (H, W, C). McnError when the model takes
    another number of inputs, when its input names put the vars in another order than
    the position would, or when a shape does not fit: never a silent misfeed."""
    if len(data_vars) == 1:
        return list(data_vars), ""
    declared = model_tensors(model)
    if not declared:
        return list(data_vars), (
            f"the model declares no inputs: it is called with the net's data vars in the net's order "
            f"({', '.join(data_vars)})"
        )
    names = [str(getattr(t, "name", f"input {k + 1}")) for k, t in enumerate(declared)]
    if len(declared) != len(data_vars):
        raise McnError(
            f"Expected a model taking the net's {len(data_vars)} data inputs ({', '.join(data_vars)}). "
            f"Received a model of {len(declared)} input(s): {', '.join(names)}"
        )
    named = _named(declared, data_vars)
    if None not in named and len(set(named)) == len(named):
        order, how = [str(v) for v in named], "by name"
    elif any(v is not None and v != data_vars[k] for k, v in enumerate(named)):
        raise McnError(
            f"The model's inputs ({', '.join(names)}) are named after some of the net's data vars "
            f"({', '.join(data_vars)}) in other places: name each input after the data var it takes "
            "(all of them, to be fed by name) or none (to be fed in the net's order)"
        )
    else:
        order, how = list(data_vars), "by order"
    for k, (t, v) in enumerate(zip(declared, order, strict=True)):
        want, got = tuple(t.shape[1:]), tuple(int(d) for d in sizes[v])
        if len(want) != len(got) or any(
            w is not None and int(w) != g for w, g in zip(want, got, strict=False)
        ):
            advice = (
                ""
                if how == "by name"
                else "; name the model's inputs after the data vars to feed them by name"
            )
            raise McnError(
                f"The model's input {k + 1} ('{names[k]}') takes {_dims(want)}; the net's data var '{v}', "
                f"fed to it {how}, is {_dims(got)} (H x W x C){advice}"
            )
    pairs = ", ".join(f"'{v}' -> '{n}'" for n, v in zip(names, order, strict=True))
    why = "" if how == "by name" else " (the model's input names are not the net's data vars; shapes checked)"
    return order, f"data inputs fed to the model {how}: {pairs}{why}"


def _dims(shape: tuple) -> str:
    return " x ".join("?" if d is None else str(d) for d in shape)


def var_shapes(net: DagNet, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[tuple[int, ...], int]]:
    """``{var: (H x W x C x 1 shape, bytes)}`` of every var the net computes for ONE image
    with data inputs of ``shapes`` (``{var: (H, W, C)}``), in float64: measured by running a
    copy of the net forward in mode test on one random image (a DagNN's sizes depend on
    every block's options, Crop's on two inputs; the reference knows them all). Remembered
    per net and shapes: the probe's labels and the memory budget read the same pass."""
    key = tuple(sorted((k, tuple(int(d) for d in v[:3])) for k, v in shapes.items()))
    memo = _SIZES.setdefault(net, {})
    if key not in memo:
        probe = net.without_values()  # shares the params: a forward pass in mode test reads them only
        rng = np.random.RandomState(0)
        probe.eval({k: rng.randn(*v, 1) for k, v in key}, mode="test")
        memo[key] = {
            v.name: ((*np.shape(v.value), 1, 1, 1, 1)[:4], np.asarray(v.value).nbytes)
            for v in probe.vars
            if v.value is not None
        }
    return memo[key]


def activation_bytes(net: DagNet, shapes: dict[str, tuple[int, ...]]) -> tuple[int, str]:
    """Bytes of the float64 values of every var for ONE image (``var_shapes``), and the
    largest var as ``"'name' (H x W x C)"``."""
    sized = [(nbytes, name, shape) for name, (shape, nbytes) in var_shapes(net, shapes).items()]
    total = sum(b for b, _, _ in sized)
    _, name, shape = max(sized) if sized else (0, "", ())
    return total, f"'{name}' ({' x '.join(str(d) for d in shape[:3])})"


def check_activation_budget(net: DagNet, shapes: dict[str, tuple[int, ...]], n: int) -> None:
    """Refuse up front (McnError) a batch of ``n`` images whose vars, with derivatives, on
    both sides and in a float64 copy, would not fit the memory budget (instead of
    exhausting the machine inside TensorFlow)."""
    per_image, largest = activation_bytes(net, shapes)
    check_budget(
        float(ACTIVATION_COPIES) * per_image * n,
        f"the vars of a batch of {n} images (the largest: {largest} per image; "
        "a smaller --batch or --input-size fits less)",
    )
